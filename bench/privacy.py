"""Sample-level differential privacy: utility, epsilon spent, membership-inference AUC and cost,
against the same runs without DP, on the same splits and seeds.

Grid: task x target epsilon (`--epsilons`; `inf` = privacy=none) x strategy x seed. Every run
goes through the in-process engine (single-threaded subprocesses, `--jobs` at a time), then
`fedapp-audit` attacks its final model. Reported per cell (mean ± sd over seeds): the task's
metric (ROC-AUC and PR-AUC for tables, accuracy for FEMNIST) and its drop from the same run
without DP, the largest epsilon any client spent, the best membership-inference AUC, and the
clients' training time relative to the run without DP. Under sample_dp the tabular features
always go through the signed-log transform (bounded statistics); the `inf_log` reference
(privacy=none with that transform) separates that change from the cost of DP itself.

    .venv/bin/python bench/privacy.py --tasks medical credit bankruptcy --jobs 2
    .venv/bin/python bench/privacy.py --tasks femnist --seeds 0 --jobs 2
    .venv/bin/python bench/privacy.py --summarize-only --tasks medical credit bankruptcy femnist

Writes bench/results/privacy.{json,md} and privacy_<task>.png (utility and MIA AUC against
epsilon); runs stay under bench/results/runs_privacy/ (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import completed, fmt_mean_sd, run_and_audit, run_pool  # noqa: E402

TASKS = {
    # natural splits: education levels, forecasting horizons, hospitals
    "credit": {"overrides": ["task=credit", "rounds=10"], "metric": "test_roc_auc"},
    "bankruptcy": {"overrides": ["task=bankruptcy", "rounds=10"], "metric": "test_roc_auc"},
    "medical": {"overrides": ["task=medical", "rounds=10"], "metric": "test_roc_auc"},
    # 201 writers, 20 per round, one local epoch of batch 10
    "femnist": {
        "overrides": ["task=femnist", "rounds=10", "clients_per_round=20"],
        "metric": "test_accuracy",
    },
}
EPSILONS = ["1", "3", "8", "inf", "inf_log"]
STRATEGIES = ["fedavg", "trust"]


def privacy_overrides(task: str, eps: str) -> list[str]:
    if eps == "inf":
        return ["privacy=none"]
    if eps == "inf_log":
        return ["privacy=none", "++task.schema.numeric_transform=signed_log"]
    return ["privacy=sample_dp", f"privacy.target_epsilon={eps}"]


def plan(args) -> list[tuple[dict, list[str], str]]:
    jobs = []
    for task in args.tasks:
        for eps in args.epsilons:
            if eps == "inf_log" and task == "femnist":
                continue  # no tabular transform
            for strategy in args.strategies:
                for seed in args.seeds:
                    ovr = [
                        *TASKS[task]["overrides"],
                        *privacy_overrides(task, eps),
                        f"strategy={strategy}",
                        f"seed={seed}",
                        "eval_clients_per_round=0",
                    ]
                    key = {"task": task, "epsilon": eps, "strategy": strategy, "seed": seed}
                    jobs.append((key, ovr, f"{task}-eps{eps}-{strategy}-s{seed}"))
    return jobs


def execute(args, jobs) -> None:
    runs = args.out / "runs_privacy"
    runs.mkdir(parents=True, exist_ok=True)
    rounds = {t: _rounds(TASKS[t]["overrides"]) for t in args.tasks}
    todo = [
        (o, runs / n, rounds[k["task"]])
        for k, o, n in jobs
        if not (
            args.reuse
            and (runs / n / "audit.json").exists()
            and completed(runs / n / "results.json", rounds[k["task"]]) is not None
        )
    ]
    print(f"[bench] {len(jobs)} runs planned, {len(todo)} to run", flush=True)

    def work(item):
        ovr, out, n_rounds = item
        return out.name, run_and_audit(ovr, out, ROOT, n_rounds, args.reuse)

    run_pool(todo, args.jobs, work)


def _rounds(overrides: list[str]) -> int:
    return int(next(o for o in overrides if o.startswith("rounds=")).split("=")[1])


def train_seconds(res: dict) -> float:
    """Total client training time of a run (what DP-SGD slows down)."""
    return float(
        sum(
            c.get("train_time_s", 0.0) or 0.0
            for r in res["rounds"]
            for c in r["clients"]
            if c["phase"] == "train" and c["status"] == "ok"
        )
    )


def summarize(args, jobs) -> dict:
    runs = args.out / "runs_privacy"
    records = {}
    for key, _, name in jobs:
        res = completed(runs / name / "results.json", _rounds(TASKS[key["task"]]["overrides"]))
        audit_path = runs / name / "audit.json"
        if res is None or not audit_path.exists():
            continue
        last = res["rounds"][-1]
        records[(key["task"], key["epsilon"], key["strategy"], key["seed"])] = {
            "metric": last[TASKS[key["task"]]["metric"]],
            "pr_auc": last.get("test_pr_auc"),
            "epsilon_spent": last.get("dp_epsilon"),
            "mia_auc": json.loads(audit_path.read_text())["mia_auc"],
            "train_s": train_seconds(res),
            "majority": last.get("majority_accuracy"),
        }
    cells = []
    for task in args.tasks:
        for strategy in args.strategies:
            base = {
                s: records.get((task, "inf", strategy, s)) for s in args.seeds
            }  # paired reference: the same seed without DP
            for eps in args.epsilons:
                recs = {s: records.get((task, eps, strategy, s)) for s in args.seeds}
                recs = {s: r for s, r in recs.items() if r is not None}
                if not recs:
                    continue
                drop = [base[s]["metric"] - r["metric"] for s, r in recs.items() if base.get(s)]
                slow = [r["train_s"] / base[s]["train_s"] for s, r in recs.items() if base.get(s)]
                cells.append(
                    {
                        "task": task,
                        "epsilon": eps,
                        "strategy": strategy,
                        "seeds": sorted(recs),
                        "metric": [recs[s]["metric"] for s in sorted(recs)],
                        "pr_auc": [recs[s]["pr_auc"] for s in sorted(recs)],
                        "drop": drop,
                        "epsilon_spent": [recs[s]["epsilon_spent"] for s in sorted(recs)],
                        "mia_auc": [recs[s]["mia_auc"] for s in sorted(recs)],
                        "time_ratio": slow,
                        "majority": recs[sorted(recs)[0]]["majority"],
                    }
                )
    return {"cells": cells, "metrics": {t: TASKS[t]["metric"] for t in args.tasks}}


def write_report(args, summary: dict) -> None:
    (args.out / "privacy.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "# Sample-level differential privacy: utility, epsilon, membership inference, cost",
        "",
        "`bench/privacy.py`: in-process engine, CPU, single-threaded runs. `inf` = no DP; "
        "`inf_log` = no DP with the signed-log feature transform that sample_dp imposes on "
        "tables. drop = metric without DP minus metric with DP, paired by seed. epsilon spent = "
        "the largest cumulative epsilon any client reported (delta = 1e-5). MIA AUC = best of "
        "fedapp-audit's attacks on the final model (0.5 = guessing). time = clients' training "
        "seconds relative to the run without DP. Mean ± sd over seeds.",
        "",
    ]
    for task in args.tasks:
        tc = [c for c in summary["cells"] if c["task"] == task]
        if not tc:
            continue
        metric = summary["metrics"][task]
        lines += [
            f"## {task}: {metric} (majority class accuracy {tc[0]['majority']:.3f})",
            "",
            f"| strategy | epsilon | {metric} | drop | PR-AUC | epsilon spent | MIA AUC | time | seeds |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in tc:
            lines.append(
                f"| {c['strategy']} | {c['epsilon']} | {fmt_mean_sd(c['metric'])} | "
                f"{fmt_mean_sd(c['drop']) if c['epsilon'] != 'inf' else '-'} | "
                f"{fmt_mean_sd(c['pr_auc'])} | {fmt_mean_sd(c['epsilon_spent'], 2)} | "
                f"{fmt_mean_sd(c['mia_auc'])} | "
                f"{fmt_mean_sd(c['time_ratio'], 1) if c['epsilon'] != 'inf' else '1'}x | "
                f"{len(c['seeds'])} |"
            )
        lines.append("")
    (args.out / "privacy.md").write_text("\n".join(lines))
    plot(args, summary)


def plot(args, summary) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task in args.tasks:
        tc = [c for c in summary["cells"] if c["task"] == task and c["epsilon"] != "inf_log"]
        if not tc:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        for i, strategy in enumerate(sorted({c["strategy"] for c in tc})):
            cs = sorted(
                (c for c in tc if c["strategy"] == strategy),
                key=lambda c: math.inf if c["epsilon"] == "inf" else float(c["epsilon"]),
            )
            xs = [str(c["epsilon"]) for c in cs]
            for ax, key in zip(axes, ("metric", "mia_auc"), strict=True):
                ys = [np.mean(c[key]) for c in cs]
                sd = [np.std(c[key]) for c in cs]
                ax.errorbar(xs, ys, yerr=sd, marker="o", capsize=3, label=strategy, color=f"C{i}")
        axes[0].set_ylabel(summary["metrics"][task])
        axes[1].set_ylabel("membership-inference AUC")
        axes[1].axhline(0.5, color="k", lw=0.7, ls=":")
        for ax in axes:
            ax.set_xlabel("target epsilon (inf: no DP)")
            ax.legend(fontsize=8)
        fig.suptitle(task)
        fig.tight_layout()
        fig.savefig(args.out / f"privacy_{task}.png", dpi=110)
        plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["medical"], choices=list(TASKS))
    p.add_argument("--epsilons", nargs="+", default=EPSILONS)
    p.add_argument("--strategies", nargs="+", default=STRATEGIES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--reuse", action="store_true", help="skip runs already audited")
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args()
    jobs = plan(args)
    if not args.summarize_only:
        execute(args, jobs)
    summary = summarize(args, jobs)
    write_report(args, summary)
    print((args.out / "privacy.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
