"""Non-IID label skew: contribution-aware aggregation against FedAvg, FedProx, FedNova and
SCAFFOLD, on the same Dirichlet splits and seeds.

Grid: task x split (Dirichlet alpha in --alphas, `iid`, and for FEMNIST `natural`) x number
of clients (--clients) x seed x strategy, all clients trained every round for the smaller
federations and `--per-round` of them otherwise. Reported per cell: the final metric (accuracy;
ROC-AUC for credit) on the central test set minus the `--server-val` share the operator keeps
as validation rows (the same rows for every strategy; only `contribution` reads them), the
metric after `--early` rounds (convergence speed), and the spread of
per-client accuracy of the final model on the clients' own validation rows (fairness: standard
deviation and the worst 10% mean), mean ± sd over seeds, and the majority class's accuracy on
the same test rows (the centralized model is in femnist_baselines.md / tabular_baselines.md).

The shipped reports were made with (add --reuse to skip runs already in the report):

    .venv/bin/python bench/contribution.py --tasks credit --rounds 20 --early 5 --jobs 2
    .venv/bin/python bench/contribution.py --tasks femnist --rounds 10 --early 3 --jobs 2 \
        --strategies fedavg fedprox fednova contribution
    .venv/bin/python bench/contribution.py --tasks femnist --rounds 10 --early 3 --jobs 2 \
        --strategies fedavg fedprox moon --only-splits dirichlet0.5 --clients 50 --reuse
    .venv/bin/python bench/contribution.py --tasks femnist --rounds 10 --early 3 --summarize-only

Each invocation adds its runs to the existing report; it must use the report's rounds, early
round and server share (it stops at once otherwise; `--fresh` starts over). Writes
bench/results/contribution_<task>.{json,md} (contribution.{json,md} for several tasks) and
contribution_<task>.png; runs stay under bench/results/runs_contribution/ (ignored by git).
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

STRATEGIES = [
    "fedavg",
    "fedprox",
    "fednova",
    "scaffold",
    "contribution_noval",
    "contribution_fixed",
    "contribution",
]
# Variants of a strategy config: the contribution strategy without its server-validation
# (leave-one-out) dimension shows what the operator's validation rows add.
VARIANTS = {
    "contribution_noval": ["strategy=contribution", "strategy.mix.marginal=0"],
    # the fixed temperature (0.25) instead of the one chosen each round on the server rows
    "contribution_fixed": ["strategy=contribution", "strategy.temperatures=[]"],
    # FedNova's step normalisation under the contribution weights
    "contribution_nova": ["strategy=contribution", "strategy.normalize_steps=true"],
    # contribution's weights under FedAvgM's server step (issue 34, goal 3)
    "contribution_m": ["strategy=contribution", "strategy.server_momentum=0.9"],
    # ... and under FedAdam's server step (Flower's FedAdam settings)
    "contribution_a": ["strategy=contribution", "strategy.server_optimizer=adam"],
    "contribution_fixed_noval": [
        "strategy=contribution",
        "strategy.temperatures=[]",
        "strategy.mix.marginal=0",
    ],
}
TASKS = {
    "credit": {"overrides": ["task=credit", "train.local_epochs=1"], "metric": "test_roc_auc"},
    # at most 50 local steps (500 images) per round, so that 10 Dirichlet clients holding
    # ~4k images each cost what 20 natural writers do
    "femnist": {"overrides": ["task=femnist", "train.max_steps=50"], "metric": "test_accuracy"},
}


def splits(task: str, alphas: list[float]) -> list[str]:
    out = [f"dirichlet{a:g}" for a in alphas] + ["iid"]
    return out + (["natural"] if task == "femnist" else [])


def split_overrides(split: str, clients: int, min_size: int = 10) -> list[str]:
    if split == "natural":
        return ["partition=natural"]
    if split == "iid":
        return ["partition=iid", f"partition.num_partitions={clients}"]
    alpha = split.removeprefix("dirichlet")
    return [
        "partition=dirichlet",
        f"partition.alpha={alpha}",
        f"partition.num_partitions={clients}",
        # Dirichlet 0.1 over 100 credit clients cannot give every client 10 rows (the
        # default) nor even 1: such cells need --min-partition-size 0
        f"partition.min_partition_size={min_size}",
    ]


def plan(args) -> list[tuple[dict, list[str], str]]:
    jobs = []
    for task in args.tasks:
        for split in splits(task, args.alphas):
            if args.only_splits and split not in args.only_splits:
                continue
            for clients in [0] if split == "natural" else args.clients:
                per_round = clients if 0 < clients <= args.per_round else args.per_round
                for seed in args.seeds:
                    for strategy in args.strategies:
                        ovr = [
                            *TASKS[task]["overrides"],
                            *split_overrides(split, clients, args.min_partition_size),
                            f"clients_per_round={per_round}",
                            f"eval_clients_per_round={per_round}",
                            f"rounds={args.rounds}",
                            *VARIANTS.get(strategy, [f"strategy={strategy}"]),
                            # every strategy is tested on the same rows; only contribution
                            # reads the carved-out validation rows
                            f"server_val_fraction={args.server_val}",
                            f"seed={seed}",
                            "checkpoint=false",
                        ]
                        key = {
                            "task": task,
                            "split": split,
                            "clients": clients,
                            "seed": seed,
                            "strategy": strategy,
                        }
                        name = f"{task}-{split}-c{clients}-{strategy}-s{seed}"
                        jobs.append((key, ovr, name))
    return jobs


def execute(args, jobs, reported: dict[tuple, dict]) -> None:
    """Run the planned jobs; with --reuse, skip those in `reported` (the existing report's
    records) or already finished in the runs folder."""
    runs = args.out / "runs_contribution"
    runs.mkdir(parents=True, exist_ok=True)
    todo = [
        (o, runs / n)
        for key, o, n in jobs
        if not (
            args.reuse
            and (
                tuple(key[f] for f in ("task", "split", "clients", "strategy", "seed")) in reported
                or completed(runs / n / "results.json", args.rounds)
            )
        )
    ]
    print(
        f"[bench] {len(jobs)} runs planned, {len(todo)} to run, {args.jobs} at a time", flush=True
    )
    t0 = time.perf_counter()

    def work(item):
        ovr, out = item
        out.mkdir(parents=True, exist_ok=True)
        return out.name, run_inline_job(ovr, out, out / "inline.log", ROOT)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for i, (name, ok) in enumerate(pool.map(work, todo), 1):
            status = "ok" if ok else "FAILED (see inline.log)"
            print(
                f"[bench] {i}/{len(todo)} {name}: {status}  {(time.perf_counter() - t0) / 60:.1f} min",
                flush=True,
            )


def fairness(rnd: dict) -> tuple[float | None, float | None]:
    """(sd, mean of the worst 10%) of per-client validation accuracy in a round's evaluation."""
    accs = [
        c["eval_accuracy"]
        for c in rnd["clients"]
        if c["phase"] == "evaluate" and c["status"] == "ok"
    ]
    if len(accs) < 2:
        return None, None
    accs = np.sort(accs)
    return float(np.std(accs)), float(np.mean(accs[: max(1, len(accs) // 10)]))


FIELDS = ("final", "early", "fair_sd", "worst10", "curves")


def earlier_report(args) -> tuple[dict[tuple, dict], dict[str, float | None]]:
    """(per-seed records, majority accuracy per task) of the report already in --out, when it
    was made with the same rounds, early round and server share: runs are kept out of git, the
    report is the record, so a later invocation adds cells (or seeds) to it instead of dropping
    what it did not rerun. Stops when the report was made with other settings."""
    path = args.out / f"{report_name(args)}.json"
    if args.fresh or not path.exists():
        return {}, {}
    old = json.loads(path.read_text())
    if (old.get("rounds"), old.get("early"), old.get("server_val")) != (
        args.rounds,
        args.early,
        args.server_val,
    ):
        # writing this report would drop every run it holds (runs are not in git): refuse
        raise SystemExit(
            f"[bench] {path} was made with rounds={old.get('rounds')}, early={old.get('early')}, "
            f"server_val={old.get('server_val')}; this invocation has rounds={args.rounds}, "
            f"early={args.early}, server_val={args.server_val}. Pass the report's settings to add "
            "to it, or --fresh to replace it, or --out elsewhere."
        )
    out = {}
    for cell in old["cells"]:
        for i, seed in enumerate(cell["seeds"]):
            key = (cell["task"], cell["split"], cell["clients"], cell["strategy"], seed)
            out[key] = {f: cell[f][i] for f in FIELDS}
    return out, dict(old.get("majority_accuracy") or {})


def summarize(args, jobs, earlier: dict[tuple, dict], majority: dict[str, float | None]) -> dict:
    runs = args.out / "runs_contribution"
    records, majority = dict(earlier), dict(majority)
    for key, _, name in jobs:
        res = completed(runs / name / "results.json", args.rounds)
        if res is None:
            continue
        metric = TASKS[key["task"]]["metric"]
        rounds = res["rounds"]
        sd, worst = fairness(rounds[-1])
        records[(key["task"], key["split"], key["clients"], key["strategy"], key["seed"])] = {
            "final": rounds[-1][metric],
            "early": rounds[min(args.early, len(rounds) - 1)][metric],
            "fair_sd": sd,
            "worst10": worst,
            "curves": [r[metric] for r in rounds],
        }
        majority[key["task"]] = rounds[-1].get("majority_accuracy")
    cells: dict[tuple, dict] = {}
    for (task, split, clients, strategy, seed), rec in sorted(records.items()):
        cell = cells.setdefault(
            (task, split, clients, strategy), {**{f: [] for f in FIELDS}, "seeds": []}
        )
        cell["seeds"].append(seed)
        for f in FIELDS:
            cell[f].append(rec[f])
    return {
        "majority_accuracy": majority,
        "server_val": args.server_val,
        "rounds": args.rounds,
        "early": args.early,
        "cells": [
            {"task": t, "split": s, "clients": c, "strategy": st, **v}
            for (t, s, c, st), v in sorted(cells.items())
        ],
    }


def paired_gain(cell: dict, cells: list[dict], metric: str = "final") -> list[float]:
    """cell's metric minus FedAvg's in the same task/split/size, seed by seed."""
    ref = next(
        (
            c
            for c in cells
            if c["strategy"] == "fedavg"
            and (c["task"], c["split"], c["clients"])
            == (cell["task"], cell["split"], cell["clients"])
        ),
        None,
    )
    if ref is None:
        return []
    base = dict(zip(ref["seeds"], ref[metric], strict=True))
    return [v - base[s] for s, v in zip(cell["seeds"], cell[metric], strict=True) if s in base]


BASELINES = ("fedavg", "fedprox", "fednova")
# issue 34, goal 3: the peers the shipped contribution must beat by a point under label skew
OPTIMIZER_PEERS = ("fedavg", "fedavgm", "fedadam")


def last_rounds_mean(cell: dict, k: int = 3) -> list[float]:
    """Per seed, the metric averaged over the last k rounds: a reading less sensitive to the
    round-to-round swings of a model that has not converged (FEMNIST's natural split)."""
    return [float(np.mean(curve[-k:])) for curve in cell["curves"]]


def margin_over_baselines(
    cell: dict, cells: list[dict], last: int = 0, baselines: tuple[str, ...] = BASELINES
) -> list[float]:
    """Seed by seed: cell's final metric minus the best final metric of `baselines` (FedAvg,
    FedProx and FedNova) in the same task/split/size (seeds where all of them ran); with
    `last` > 0 the metric is the mean over the last `last` rounds instead."""
    same = [
        c
        for c in cells
        if c["strategy"] in baselines
        and (c["task"], c["split"], c["clients"]) == (cell["task"], cell["split"], cell["clients"])
    ]
    if len(same) < len(baselines):
        return []

    def value(c: dict) -> list[float]:
        return last_rounds_mean(c, last) if last else c["final"]

    by_seed = [dict(zip(c["seeds"], value(c), strict=True)) for c in same]
    return [
        v - max(b[seed] for b in by_seed)
        for seed, v in zip(cell["seeds"], value(cell), strict=True)
        if all(seed in b for b in by_seed)
    ]


def target_table(cells: list[dict], baselines: tuple[str, ...] = BASELINES) -> list[str]:
    """The issue's target: contribution beats FedAvg, FedProx and FedNova (or `baselines`)
    under skew, no worse on IID. Margin = contribution minus the best of them, seed by seed."""
    rows = []
    for c in cells:
        if not c["strategy"].startswith("contribution"):
            continue
        m = margin_over_baselines(c, cells, baselines=baselines)
        if m:
            m3 = margin_over_baselines(c, cells, last=3, baselines=baselines)
            rows.append(
                f"| {c['split']} | {c['clients'] or 'natural'} | {c['strategy']} | "
                f"{fmt_mean_sd(m)} | {sum(x > 0 for x in m)}/{len(m)} | "
                f"{fmt_mean_sd(m3)} | {sum(x > 0 for x in m3)}/{len(m3)} |"
            )
    if not rows:
        return []
    names = {"fedavg": "FedAvg", "fedprox": "FedProx", "fednova": "FedNova"}
    names |= {"fedavgm": "FedAvgM", "fedadam": "FedAdam"}
    peers = [names.get(b, b) for b in baselines]
    return [
        f"Against the best of {', '.join(peers[:-1])} and {peers[-1]} (per seed: final metric "
        "minus the best of them in that seed; the same for the metric averaged over the last 3 "
        "rounds, which is less sensitive to round-to-round swings):",
        "",
        "| split | clients | strategy | margin over the best baseline | seeds it wins | "
        "margin, last-3-round mean | seeds it wins |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def report_name(args) -> str:
    return "contribution" if len(args.tasks) > 1 else f"contribution_{args.tasks[0]}"


def write_report(args, summary) -> None:
    name = report_name(args)
    (args.out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "# Label skew: contribution-aware aggregation vs FedAvg, FedProx, FedNova, SCAFFOLD",
        "",
        f"`bench/contribution.py`, in-process engine, {summary['rounds']} rounds, CPU. Final metric "
        f"of the global model on the server test set, the same after {summary['early']} rounds, and "
        "the spread of per-client validation accuracy of the final model (sd; mean of the worst 10%); "
        f"mean ± sd over seeds. The server test set is the central test set minus the "
        f"{summary['server_val']:.0%} the operator keeps as validation rows (the same rows for every "
        "strategy; only the contribution variants read them). `contribution` is the shipped "
        "configuration: temperature chosen each round on those rows among 0.1, 0.25, 1 and FedAvg's "
        "weights; `contribution_fixed` keeps temperature 0.25; `_noval` variants drop the "
        "leave-one-out (`marginal`) dimension; `contribution_nova` adds FedNova's step "
        "normalisation under the contribution weights.",
        "",
    ]
    for task in args.tasks:
        tc = [c for c in summary["cells"] if c["task"] == task]
        if not tc:
            continue
        metric = TASKS[task]["metric"]
        lines += [
            f"## {task}: {metric}",
            "",
            f"Majority class accuracy on the same test rows: {summary['majority_accuracy'].get(task, float('nan')):.3f}.",
            "",
            "| split | clients | strategy | final | final − FedAvg (paired) | after early rounds | "
            "early − FedAvg | client acc. sd | worst 10% | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in tc:
            lines.append(
                f"| {c['split']} | {c['clients'] or 'natural'} | {c['strategy']} | {fmt_mean_sd(c['final'])} | "
                f"{fmt_mean_sd(paired_gain(c, tc)) if c['strategy'] != 'fedavg' else '-'} | "
                f"{fmt_mean_sd(c['early'])} | "
                f"{fmt_mean_sd(paired_gain(c, tc, 'early')) if c['strategy'] != 'fedavg' else '-'} | "
                f"{fmt_mean_sd(c['fair_sd'])} | {fmt_mean_sd(c['worst10'])} | "
                f"{len(c['final'])} |"
            )
        lines.append("")
        lines += target_table(tc)
        lines += target_table(tc, OPTIMIZER_PEERS)
    (args.out / f"{name}.md").write_text("\n".join(lines))
    plot(args, summary)


def plot(args, summary) -> None:
    """Convergence curves: one panel per (split, clients), splits as rows and federation sizes as
    columns; mean over seeds with a band of ± one sd where there are several seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task in args.tasks:
        tc = [c for c in summary["cells"] if c["task"] == task]
        if not tc:
            continue
        split_rows = sorted({c["split"] for c in tc})
        size_cols = sorted({c["clients"] for c in tc}, key=lambda k: (k == 0, k))  # natural last
        strategies = sorted({c["strategy"] for c in tc})
        colour = {st: f"C{i}" for i, st in enumerate(strategies)}
        fig, axes = plt.subplots(
            len(split_rows),
            len(size_cols),
            figsize=(3.6 * len(size_cols), 2.8 * len(split_rows)),
            squeeze=False,
        )
        for r, split in enumerate(split_rows):
            for col, clients in enumerate(size_cols):
                ax = axes[r][col]
                here = [c for c in tc if (c["split"], c["clients"]) == (split, clients)]
                if not here:
                    ax.axis("off")
                    continue
                for c in here:
                    length = min(len(x) for x in c["curves"])
                    ys = np.array([x[:length] for x in c["curves"]])
                    mean, sd = ys.mean(axis=0), ys.std(axis=0)
                    ax.plot(mean, color=colour[c["strategy"]], label=c["strategy"], lw=1.2)
                    if len(ys) > 1:
                        ax.fill_between(
                            range(length),
                            mean - sd,
                            mean + sd,
                            color=colour[c["strategy"]],
                            alpha=0.12,
                            lw=0,
                        )
                seeds = max(len(c["seeds"]) for c in here)
                ax.set_title(
                    f"{split}, {clients or 'natural'} clients ({seeds} seed(s))", fontsize=9
                )
                ax.set_xlabel("round", fontsize=8)
                ax.set_ylabel(TASKS[task]["metric"], fontsize=8)
                ax.tick_params(labelsize=7)
        handles = [plt.Line2D([], [], color=colour[st], label=st) for st in strategies]
        fig.legend(handles=handles, loc="upper center", ncol=len(strategies), fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (2.8 * len(split_rows))))
        fig.savefig(args.out / f"contribution_{task}.png", dpi=100)
        plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["credit"], choices=list(TASKS))
    p.add_argument("--strategies", nargs="+", default=STRATEGIES)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5, 1.0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument(
        "--only-splits",
        nargs="+",
        default=None,
        help="e.g. dirichlet0.1 iid natural (default: all)",
    )
    p.add_argument("--per-round", type=int, default=20, help="clients per round (all when fewer)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--early", type=int, default=5)
    p.add_argument(
        "--server-val",
        type=float,
        default=0.1,
        help="share of the central test set held by the operator as validation rows (all runs)",
    )
    p.add_argument(
        "--min-partition-size",
        type=int,
        default=10,
        help="partition.min_partition_size of the Dirichlet splits (10: the config's default)",
    )
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="skip runs already in the report or finished in the runs folder",
    )
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="report only the runs found now (default: add them to the existing report's cells)",
    )
    args = p.parse_args()
    jobs = plan(args)
    # read once, before any run: a report made with other settings stops the bench now
    earlier, majority = earlier_report(args)
    if not args.summarize_only:
        execute(args, jobs, earlier)
    summary = summarize(args, jobs, earlier, majority)
    write_report(args, summary)
    print((args.out / f"{report_name(args)}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
