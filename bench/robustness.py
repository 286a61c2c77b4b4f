"""Robustness to unreliable and malicious clients: FedAvg, Flower's robust aggregators and the
trust strategy side by side, on the same splits, seeds and attackers.

For every task x seed: a clean run per strategy (no attackers), then every attack x fraction
x strategy. Runs use the in-process engine (`fedapp.cli.inline`: same ServerApp, strategies and
ClientApp as `fedapp-run`, no SuperLink/Ray start-up) in `--jobs` parallel processes, each
single-threaded on CPU, so a run's numbers do not depend on how many run beside it.

    .venv/bin/python bench/robustness.py --tasks credit --jobs 2                 # ~40 min, 2 cores
    .venv/bin/python bench/robustness.py --tasks femnist --fractions 0 0.3 --jobs 15
    .venv/bin/python bench/robustness.py --summarize-only                        # tables from runs
    .venv/bin/python bench/robustness.py --tasks credit --strategies trust --reuse --merge
        # re-run one strategy; the other strategies' cells are kept from robustness.json
    .venv/bin/python bench/robustness.py --tasks femnist --strategies trust_m --attacks gaussian \
        --fractions 0 0.3 --merge        # a variant (VARIANTS: trust with server momentum)
    .venv/bin/python bench/robustness.py --tasks femnist --strategies bulyan --attacks scaled \
        --fractions 0.3 --seeds 1 2 --add-seeds   # seeds 1-2 join the published seed-0 cell

Writes bench/results/robustness.{json,md} and robustness_<task>.png; runs stay under
bench/results/runs_robustness/ (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import completed, fmt_mean_sd, run_inline_job  # noqa: E402

STRATEGIES = ["fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "trust"]
# variants a table can hold beside the shipped strategies (`--strategies trust_m`): a strategy
# with overrides of its settings, its cells under the variant's name
VARIANTS = {"trust_m": ("trust", ["strategy.server_momentum=0.9"])}
ATTACKS = ["label_flip", "gaussian", "scaled", "free_rider", "crash", "inflate"]
TASKS = {
    # FEMNIST, natural split by writer (201 clients, 20 per round).
    "femnist": {
        "overrides": ["task=femnist", "partition=natural", "clients_per_round=20"],
        "metric": "test_accuracy",
    },
    # Credit default (UCI Taiwan, 30k rows), 20 IID clients, all of them every round.
    "credit": {
        "overrides": [
            "task=credit",
            "partition=iid",
            "partition.num_partitions=20",
            "clients_per_round=20",
        ],
        "metric": "test_roc_auc",
    },
}
EXTRA = ["test_accuracy", "test_roc_auc", "test_balanced_accuracy", "test_f1"]


def run_name(task: str, strategy: str, attack: str, fraction: float, seed: int) -> str:
    tag = "clean" if fraction == 0 else f"{attack}{fraction:g}"
    return f"{task}-{tag}-{strategy}-s{seed}"


def plan(args) -> list[tuple[str, list[str], str]]:
    jobs = []
    for task in args.tasks:
        base = [*TASKS[task]["overrides"], f"rounds={args.rounds}", "eval_clients_per_round=0"]
        base.append("checkpoint=false")
        for seed in args.seeds:
            for fraction in args.fractions:
                attacks = ["none"] if fraction == 0 else args.attacks
                for attack in attacks:
                    for strategy in args.strategies:
                        shipped, extra = VARIANTS.get(strategy, (strategy, []))
                        ovr = [*base, f"strategy={shipped}", *extra, f"seed={seed}"]
                        if attack != "none":
                            ovr += [f"attack={attack}", f"attack.fraction={fraction}"]
                        name = run_name(task, strategy, attack, fraction, seed)
                        jobs.append((task, ovr, name, strategy))
    return jobs


def run_one(ovr: list[str], out: Path, log_path: Path) -> bool:
    return run_inline_job(ovr, out, log_path, ROOT)


def execute(args, jobs) -> None:
    runs = args.out / "runs_robustness"
    runs.mkdir(parents=True, exist_ok=True)
    todo = [
        (ovr, runs / name)
        for _, ovr, name, _ in jobs
        if not (args.reuse and completed(runs / name / "results.json", args.rounds))
    ]
    print(
        f"[bench] {len(jobs)} runs planned, {len(todo)} to run, {args.jobs} at a time", flush=True
    )
    t0 = time.perf_counter()
    done = 0

    def work(item):
        ovr, out = item
        out.mkdir(parents=True, exist_ok=True)
        ok = run_one(ovr, out, out / "inline.log")
        return out.name, ok

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for name, ok in pool.map(work, todo):
            done += 1
            elapsed = time.perf_counter() - t0
            print(
                f"[bench] {done}/{len(todo)} {name}: {'ok' if ok else 'FAILED (see inline.log)'}"
                f"  {elapsed / 60:.1f} min",
                flush=True,
            )


def summarize(args, jobs) -> dict:
    runs = args.out / "runs_robustness"
    cells: dict[tuple, dict] = {}
    for task, _ovr, name, label in jobs:
        res = completed(runs / name / "results.json", args.rounds)
        if res is None:
            continue
        cfg = res["config"]
        frac = float(cfg["attack"]["fraction"]) if cfg["attack"]["name"] != "none" else 0.0
        key = (task, cfg["attack"]["name"] if frac else "none", frac, label)
        cell = cells.setdefault(key, {"seeds": [], "final": {}, "attacker_weight": []})
        last = res["rounds"][-1]
        cell["seeds"].append(int(cfg["seed"]))
        for m in EXTRA:
            cell["final"].setdefault(m, []).append(last.get(m))
        cell["attacker_weight"].append([r.get("attacker_weight") for r in res["rounds"][1:]])
    out = []
    for (task, attack, frac, strategy), c in sorted(cells.items()):
        aw = [
            np.nanmean([w for w in run if w is not None])
            if any(w is not None for w in run)
            else None
            for run in c["attacker_weight"]
        ]
        out.append(
            {
                "task": task,
                "attack": attack,
                "fraction": frac,
                "strategy": strategy,
                "seeds": c["seeds"],
                "final": c["final"],
                "mean_attacker_weight": aw,
                "attacker_weight_by_round": c["attacker_weight"],
            }
        )
    if args.merge:
        out = merge_previous(args, out)
    return {"rounds": args.rounds, "cells": out}


def merge_previous(args, cells: list[dict]) -> list[dict]:
    """`--merge`: keep the published cells (robustness.json) of every (task, strategy) this
    invocation does not run, so re-running one strategy whose design changed (or adding an
    attack) does not drop the other strategies' measured cells. Cells of the strategies run here
    come only from their runs."""
    path = args.out / "robustness.json"
    if not path.exists():
        return cells
    data = json.loads(path.read_text())
    published = data["cells"]
    if args.add_seeds:
        if int(data.get("rounds", args.rounds)) != args.rounds:
            raise SystemExit(
                f"--add-seeds: {path} has {data['rounds']}-round cells, this run {args.rounds} "
                "rounds; seeds of different runs cannot share a cell (pass --rounds "
                f"{data['rounds']})"
            )
        kept = add_seeds(published, cells)
    else:
        ran = {(t, s) for t in args.tasks for s in args.strategies}
        kept = [c for c in published if (c["task"], c["strategy"]) not in ran] + cells
    return sorted(kept, key=lambda c: (c["task"], c["attack"], c["fraction"], c["strategy"]))


def _cell_key(c: dict) -> tuple:
    return (c["task"], c["attack"], float(c["fraction"]), c["strategy"])


PER_SEED = ("mean_attacker_weight", "attacker_weight_by_round")


def add_seeds(published: list[dict], cells: list[dict]) -> list[dict]:
    """`--add-seeds`: more seeds for cells whose strategy did not change. Every published cell is
    kept; a cell run here gains the seeds it ran (a seed run here replaces the published value
    of that seed), so a 1-seed cell becomes a 3-seed one without re-running seed 0. Seeds in
    increasing order."""
    new = {_cell_key(c): c for c in cells}
    out = []
    for old in published:
        fresh = new.pop(_cell_key(old), None)
        if fresh is None:
            out.append(old)
            continue
        rows = {}  # seed -> (final values by metric, per-seed fields)
        for c in (old, fresh):  # the fresh run last: it wins a seed both hold
            for i, seed in enumerate(c["seeds"]):
                rows[seed] = (
                    {m: v[i] for m, v in c["final"].items()},
                    {f: c[f][i] for f in PER_SEED},
                )
        seeds = sorted(rows)
        metrics = sorted({m for final, _ in rows.values() for m in final})
        out.append(
            {
                **{k: old[k] for k in ("task", "attack", "fraction", "strategy")},
                "seeds": seeds,
                "final": {m: [rows[s][0].get(m) for s in seeds] for m in metrics},
                **{f: [rows[s][1][f] for s in seeds] for f in PER_SEED},
            }
        )
    return out + list(new.values())


def shown(args, cells: list[dict], key: str, order: list[str]) -> list[str]:
    """Values of `key` (task or strategy) in the table: `order` first, then any merged in."""
    present = {c[key] for c in cells}
    return [v for v in dict.fromkeys(order) if v in present] + sorted(present - set(order))


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def write_report(args, summary: dict) -> None:
    cells = summary["cells"]
    (args.out / "robustness.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "# Robustness to unreliable and malicious clients",
        "",
        f"`bench/robustness.py`, in-process engine, {summary['rounds']} rounds, CPU. "
        "Final metric of the global model on the server test set after the last round "
        "(mean ± sd over seeds; [n seeds] where fewer runs finished); `w` = total aggregation weight given to the "
        "attack harness's clients, averaged over rounds (0 means they were shut out). "
        "`not run`: no run of that strategy in that cell since its design last changed (a "
        "strategy re-run with `--merge` keeps only the cells it ran).",
        "",
    ]
    variants = [v for v in VARIANTS if any(c["strategy"] == v for c in cells)]
    if variants:
        lines += [
            "Variants (not shipped defaults): "
            + "; ".join(
                f"`{v}` = `strategy={VARIANTS[v][0]} {' '.join(VARIANTS[v][1])}`" for v in variants
            )
            + ".",
            "",
        ]
    for task in shown(args, cells, "task", args.tasks):
        metric = TASKS[task]["metric"]
        tcells = [c for c in cells if c["task"] == task]
        if not tcells:
            continue
        strategies = shown(
            args, tcells, "strategy", list(dict.fromkeys(STRATEGIES + args.strategies))
        )
        clean = {c["strategy"]: c for c in tcells if c["attack"] == "none"}
        all_seeds = len({s for c in tcells for s in c["seeds"]})  # the task's, not this run's
        ref = _mean(clean["fedavg"]["final"][metric]) if "fedavg" in clean else None
        lines += [f"## {task}: {metric}", ""]
        if ref is not None:
            lines.append(
                f"Clean FedAvg: {ref:.3f}. Seeds: {sorted(set(s for c in tcells for s in c['seeds']))}."
            )
            lines.append("")
        lines.append("| attack | fraction | " + " | ".join(strategies) + " |")
        lines.append("|---|---|" + "---|" * len(strategies))
        settings = sorted(
            {(c["attack"], c["fraction"]) for c in tcells},
            key=lambda x: (x[0] != "none", x[0], x[1]),
        )
        for attack, frac in settings:
            row = [attack, f"{frac:g}"]
            for s in strategies:
                c = next(
                    (
                        c
                        for c in tcells
                        if (c["attack"], c["fraction"], c["strategy"]) == (attack, frac, s)
                    ),
                    None,
                )
                if c is None:
                    row.append("not run")
                    continue
                cell = fmt_mean_sd(c["final"][metric])
                if len(c["seeds"]) < all_seeds:
                    cell += f" [{len(c['seeds'])} seed{'s' if len(c['seeds']) > 1 else ''}]"
                w = _mean(c["mean_attacker_weight"])
                if attack != "none" and w is not None:
                    cell += f" (w {w:.2f})"
                row.append(cell)
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    (args.out / "robustness.md").write_text("\n".join(lines))
    plot(args, summary)


def plot(args, summary) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task in args.tasks:
        tcells = [c for c in summary["cells"] if c["task"] == task]
        if not tcells:
            continue
        metric = TASKS[task]["metric"]
        # every strategy and attack in the cells (merged ones too), not only those run here
        strategies = shown(
            args, tcells, "strategy", list(dict.fromkeys(STRATEGIES + args.strategies))
        )
        color = {s: f"C{i % 10}" for i, s in enumerate(strategies)}
        attacks = [a for a in ATTACKS if any(c["attack"] == a for c in tcells)]
        fig, axes = plt.subplots(
            2, max(len(attacks), 1), figsize=(4 * max(len(attacks), 1), 7), squeeze=False
        )
        top = max((c["fraction"] for c in tcells), default=0)
        for j, attack in enumerate(attacks):
            ax = axes[0][j]
            for s in strategies:
                c = next(
                    (
                        c
                        for c in tcells
                        if (c["attack"], c["fraction"], c["strategy"]) == (attack, top, s)
                    ),
                    None,
                )
                if c is None:
                    continue
                series = np.array(
                    [
                        [np.nan if w is None else w for w in run]
                        for run in c["attacker_weight_by_round"]
                    ],
                    dtype=float,
                )
                if np.all(np.isnan(series)):
                    continue
                ax.plot(
                    np.arange(1, series.shape[1] + 1),
                    np.nanmean(series, axis=0),
                    label=s,
                    color=color[s],
                )
            ax.axhline(top, color="grey", ls=":", lw=1)
            ax.set_title(f"{attack} {top:g}: weight to attackers")
            ax.set_xlabel("round")
            ax.set_ylim(-0.02, 1.0)
            ax = axes[1][j]
            for s in strategies:
                pts = []
                for c in tcells:
                    if c["strategy"] == s and (c["attack"] == attack or c["attack"] == "none"):
                        pts.append((c["fraction"], _mean(c["final"][metric])))
                pts = sorted(p for p in pts if p[1] is not None)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=s, color=color[s])
            ax.set_title(f"{attack}: final {metric}")
            ax.set_xlabel("fraction of attacking clients")
        # one legend for every panel's lines (a strategy keeps its colour across panels)
        seen = {}
        for ax in axes.flat:
            for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
                seen.setdefault(label, h)
        axes[1][0].legend(list(seen.values()), list(seen), fontsize=7)
        fig.suptitle(f"{task}: robustness ({summary['rounds']} rounds)")
        fig.tight_layout()
        fig.savefig(args.out / f"robustness_{task}.png", dpi=110)
        plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["credit"], choices=list(TASKS))
    p.add_argument("--strategies", nargs="+", default=STRATEGIES)
    p.add_argument("--attacks", nargs="+", default=ATTACKS)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--reuse", action="store_true", help="skip runs already completed")
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep robustness.json's cells of the strategies and tasks not run here",
    )
    p.add_argument(
        "--add-seeds",
        action="store_true",
        help="keep every published cell and add the seeds run here to their cells (for "
        "strategies whose design did not change); implies --merge",
    )
    args = p.parse_args()
    args.merge = args.merge or args.add_seeds
    jobs = plan(args)
    if not args.summarize_only:
        execute(args, jobs)
    write_report(args, summarize(args, jobs))
    print(f"[bench] wrote {args.out / 'robustness.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
