"""Sample-level DP on FEMNIST (issue 33's hardest row): a small sweep of DP-friendly settings at
fixed epsilon (per writer, whole run, delta 1e-5), chosen on the writers' validation rows,
then the winner with 3 seeds at epsilon 8 and 3 (and once without DP), against non-DP FedAvg
at the same 30 rounds.

FEMNIST's writers hold ~180 training rows each, so subsampling amplifies little, and the
default model (cnn_small, 1.2M parameters) drowns a clipped gradient of norm 1 in noise of
norm ~100. What every setting here shares: the 28k-parameter tanh CNN (`task.model=cnn_dp`),
full-batch local steps (`train.batch_size` above every writer's rows: one Poisson batch of
all of them, q = 1), clipping norm 1, DP-Adam with 5 local epochs. That choice came from a
4-round probe without DP, `.venv/bin/fedapp-inline task=femnist rounds=4 seed=0
eval_clients_per_round=0 checkpoint=false privacy=none task.model=cnn_dp
train.batch_size=1000000 train.local_epochs=5` with `train.optimizer=adam train.lr=0.01`
(test accuracy 0.415 at round 4) or `train.optimizer=sgd train.lr=0.5` (0.217); SGD at lr 2
under DP (epsilon 8, `clients_per_round=100`, 3 rounds) stayed at 0.004. What the sweep varies (seed 0, epsilon 8): Adam's learning rate, clients per
round (more writers per round average more noise away, each writer then trains in more
rounds: the accountant plans for it) and the server's rule (FedAvg or FedAvgM, server
momentum that averages noise over rounds). By default only the first setting runs (a run
took 3 to 9 min on one core at 20 writers per round here, depending on what ran beside it);
`--grid` adds the others, and the chosen one is then the best of them.

Selection reads one number: the accuracy of the final model on every writer's validation
rows (`task.client_val_fraction`, pooled), computed here from final_model.pt; the central test
set is evaluated by every run, recorded, and never read by the selection. The selection is not
privacy-accounted (fedapp-tune is the accounted search): the epsilon of a final run is that
run's. The non-DP reference is FedAvg at the shipped defaults, 30 rounds, the same seeds, as
bench/femnist_baselines.py measured it (bench/results/femnist_baselines.json; the default job
is deterministic and unchanged since); the chosen setting also runs without DP.

    nice -n 10 .venv/bin/python bench/dp_femnist.py --jobs 2       # ~20 min on 2 cores
    nice -n 10 .venv/bin/python bench/dp_femnist.py --jobs 2 --grid   # the sweep: ~15 min more
    .venv/bin/python bench/dp_femnist.py --summarize-only

Writes bench/results/dp_femnist.{json,md}; runs stay under bench/results/runs_dp_femnist/
(ignored by git).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    completed,
    fmt_mean_sd,
    run_inline_job,
    run_pool,
    train_seconds,
)
from bench.dp_tuning import FULL  # noqa: E402  (a batch of every row: q = 1)

RESULTS = ROOT / "bench" / "results"
RUNS = RESULTS / "runs_dp_femnist"
ROUNDS = 30
SEEDS = [0, 1, 2]
GOALS = {"8": 0.60, "3": 0.45}  # the issue's: test accuracy at 30 rounds
# (name, overrides): every setting names each key it sets
COMMON = ["task.model=cnn_dp", f"train.batch_size={FULL}", "privacy.max_grad_norm=1.0"]
ADAM = ["train.optimizer=adam", "train.local_epochs=5"]
GRID: dict[str, list[str]] = {
    "adam-lr0.01-E5-k20": [*ADAM, "train.lr=0.01"],
}
# Not run yet (each ~15 min on one core of 2 with a benchmark beside it): Adam at lr 0.003, 50
# writers per round, FedAvgM's server momentum. `--grid` adds them.
MORE: dict[str, list[str]] = {
    "adam-lr0.003-E5-k20": [*ADAM, "train.lr=0.003"],
    "adam-lr0.01-E5-k50": [*ADAM, "train.lr=0.01", "clients_per_round=50"],
    "adam-lr0.01-E5-k20-avgm": [*ADAM, "train.lr=0.01", "strategy=fedavgm"],
}


def overrides(setting: str, eps: str, seed: int) -> list[str]:
    """One run: `setting` at target epsilon `eps` ('inf': without DP)."""
    common = [
        "task=femnist",
        f"rounds={ROUNDS}",
        f"seed={seed}",
        "eval_clients_per_round=0",
    ]
    extra = GRID[setting]
    strategy = [] if any(o.startswith("strategy=") for o in extra) else ["strategy=fedavg"]
    privacy = (
        ["privacy=none"]
        if eps == "inf"
        else [
            "privacy=sample_dp",
            f"privacy.target_epsilon={eps}",
        ]
    )
    shared = [o for o in COMMON if eps != "inf" or not o.startswith("privacy.")]
    return [*common, *strategy, *privacy, *shared, *extra]


def run_name(setting: str, eps: str, seed: int) -> str:
    return f"{setting}-eps{eps}-s{seed}"


def validation_accuracy(run_dir: Path) -> float | None:
    """Accuracy of the final model on every writer's validation rows, pooled (None for a run
    that kept no final_model.pt: the first one ran with checkpoint=false)."""
    if not (run_dir / "final_model.pt").exists():
        return None
    import torch
    from omegaconf import OmegaConf

    from fedapp.core.config import resolve_data_dir
    from tasks import get_task
    from tasks.training import predict_logits

    cfg = OmegaConf.load(run_dir / "config.yaml")
    task = get_task(cfg, resolve_data_dir(cfg))
    model = task.make_model()
    model.load_state_dict(torch.load(run_dir / "final_model.pt", map_location="cpu"))
    right = total = 0
    for p in range(task.num_partitions()):
        logits, y = predict_logits(model, task.eval_dataset(task.load_partition(p).val, {}))
        right += int((logits.argmax(axis=1) == y).sum())
        total += len(y)
    return right / max(total, 1)


def record(setting: str, eps: str, seed: int) -> dict[str, Any] | None:
    out = RUNS / run_name(setting, eps, seed)
    path = out / "trial.json"
    if path.exists():
        return json.loads(path.read_text())
    res = completed(out / "results.json", ROUNDS)
    if res is None:
        return None
    last = res["rounds"][-1]
    rec = {
        "setting": setting,
        "epsilon": eps,
        "seed": seed,
        "overrides": overrides(setting, eps, seed),
        "val_accuracy": validation_accuracy(out),
        "test_accuracy": last["test_accuracy"],
        "epsilon_spent": last.get("dp_epsilon"),
        "noise_multiplier": max(
            (c.get("dp_noise_multiplier") or 0.0 for r in res["rounds"] for c in r["clients"]),
            default=None,
        ),
        "train_s": train_seconds(res),
        "status": res["meta"]["status"],
    }
    path.write_text(json.dumps(rec, indent=1))
    return rec


def run_all(items: list[tuple[str, str, int]], jobs: int) -> None:
    todo = [i for i in items if record(*i) is None]
    if not todo:
        return
    RUNS.mkdir(parents=True, exist_ok=True)

    def work(item):
        out = RUNS / run_name(*item)
        if out.exists():
            import shutil

            shutil.rmtree(out)  # an interrupted attempt: its writers' ledgers belong to it
        out.mkdir(parents=True)
        return out.name, run_inline_job(overrides(*item), out, out / "inline.log", ROOT)

    run_pool(todo, jobs, work)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument("--grid", action="store_true", help="also the settings of MORE")
    args = p.parse_args()
    if args.grid:
        GRID.update(MORE)
    t0 = time.perf_counter()
    grid = [(s, "8", 0) for s in GRID]
    if not args.summarize_only:
        run_all(grid, args.jobs)
    trials = [r for r in (record(*i) for i in grid) if r is not None]
    if not trials:
        print("[dp_femnist] no finished grid trial")
        return 1
    best = max(trials, key=lambda r: r["val_accuracy"] or 0.0)["setting"]
    finals = [(best, eps, s) for eps in ("8", "3") for s in SEEDS]
    finals += [(best, "inf", 0)]  # what the setting reaches without DP (one seed)
    if not args.summarize_only:
        run_all(finals, args.jobs)
    wall = (time.perf_counter() - t0) / 60
    rows = {f"{s}|{e}|{k}": record(s, e, k) for s, e, k in finals}
    write(grid, trials, best, rows, wall if not args.summarize_only else None)
    return 0


def write(grid, trials, best, rows, wall) -> None:
    def acc(setting, eps, key="test_accuracy"):
        return [(rows.get(f"{setting}|{eps}|{s}") or {}).get(key) for s in SEEDS]

    base = json.loads((RESULTS / "femnist_baselines.json").read_text())
    fedavg = next(s for s in base["strategies"] if s["strategy"] == "fedavg")
    assert fedavg["seeds"] == SEEDS
    nodp = [float(v) for v in fedavg[f"acc_round_{ROUNDS}"]]
    summary = {}
    for eps in ("8", "3"):
        dp = acc(best, eps)
        summary[eps] = {
            "test_accuracy": dp,
            "epsilon_spent": acc(best, eps, "epsilon_spent"),
            "noise_multiplier": acc(best, eps, "noise_multiplier"),
            "goal": GOALS[eps],
            "met": bool(all(v is not None for v in dp) and np.mean(dp) >= GOALS[eps]),
        }
    data = {
        "rounds": ROUNDS,
        "seeds": SEEDS,
        "common": COMMON,
        "grid": {k: v for k, v in GRID.items()},
        "trials": trials,
        "best": best,
        "nodp_default": nodp,
        "nodp_best_setting": acc(best, "inf"),
        "summary": summary,
        "runs": rows,
        "wall_minutes": wall,
        "command": "nice -n 10 .venv/bin/python bench/dp_femnist.py --jobs 2",
    }
    (RESULTS / "dp_femnist.json").write_text(json.dumps(data, indent=1))
    lines = [
        "# Sample-level DP on FEMNIST: DP-friendly settings, chosen on validation rows",
        "",
        f"`{data['command']}` (`bench/dp_femnist.py`; see its docstring). FEMNIST's natural "
        f"split (201 writers), {ROUNDS} rounds, delta 1e-5, epsilon per writer for the whole "
        f"run. Every DP setting: `{' '.join(COMMON)}`.",
        "",
        "## Settings tried (seed 0, epsilon 8; selection on the writers' validation rows)",
        "",
        "| setting | overrides | validation accuracy | test accuracy | noise multiplier | "
        "epsilon spent |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(trials, key=lambda r: -(r["val_accuracy"] or 0.0)):
        val = f"{r['val_accuracy']:.3f}" if r["val_accuracy"] is not None else "-"
        lines.append(
            f"| {r['setting']}{' (chosen)' if r['setting'] == best else ''} | "
            f"`{' '.join(GRID[r['setting']])}` | {val} | "
            f"{r['test_accuracy']:.3f} | {r['noise_multiplier'] or 0:.2f} | "
            f"{r['epsilon_spent'] or 0:.2f} |"
        )
    missing = [s for s in GRID if s not in {r["setting"] for r in trials}]
    if missing:
        lines += ["", f"Failed or not run: {', '.join(missing)}."]
    left = [k for k in MORE if k not in GRID]
    if left:
        lines += [
            "",
            f"Not run (`--grid` adds them): {', '.join(left)}. With one setting there was no "
            "choice: it was picked from a 4-round probe without DP (bench/dp_femnist.py's "
            "docstring), not on these runs.",
        ]
    lines += [
        "",
        f"## The chosen setting ({best}), seeds {SEEDS}: test accuracy at round {ROUNDS}",
        "",
        "| epsilon | test accuracy | loss against non-DP FedAvg (shipped defaults) | goal | met "
        "| seeds run |",
        "|---|---|---|---|---|---|",
    ]
    for eps, s in summary.items():
        loss = [
            a - b if a is not None and b is not None else None
            for a, b in zip(nodp, s["test_accuracy"], strict=True)
        ]
        lines.append(
            f"| {eps} | {fmt_mean_sd(s['test_accuracy'])} | {fmt_mean_sd(loss)} | "
            f">= {s['goal']:.2f} | {'yes' if s['met'] else 'no'} | "
            f"{sum(v is not None for v in s['test_accuracy'])}/{len(SEEDS)} |"
        )
    lines += [
        f"| inf (the same setting, no DP; seed 0) | {fmt_mean_sd(acc(best, 'inf'))} | | | | |",
        f"| inf (shipped defaults: cnn_small, batch 10, lr 0.1; femnist_baselines.json) | "
        f"{fmt_mean_sd(nodp)} | | | | 3/3 |",
        "",
    ]
    if wall:  # this invocation's: runs finished earlier are reused, not timed again
        lines += [f"{wall:.0f} min wall for the runs this invocation made.", ""]
    (RESULTS / "dp_femnist.md").write_text("\n".join(lines))
    print(f"[dp_femnist] wrote {RESULTS / 'dp_femnist.md'}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
