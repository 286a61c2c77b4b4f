"""Heterogeneous federations: the tiered scheduler against synchronous FedAvg, FedAvg with a
deadline, FedProx, q-FedAvg, FedAsync, FedBuff and TiFL, on the same splits, seeds and device profiles.

Protocol, per task x profile x seed (profiles in conf/hetero: compute, network, both; each with
10% dropout; virtual clock, so simulated seconds are reproducible):
1. synchronous FedAvg runs `--rounds` rounds; its simulated duration T is the time budget;
2. every other strategy runs until the clock passes T (at most `--round-factor` x rounds);
   FedAvg-with-deadline drops replies later than half of FedAvg's median round duration.
Reported: time to target (the first simulated second at which the metric reaches
`--target-frac` x synchronous FedAvg's final value in the same task/profile/seed), the
speed-up over synchronous FedAvg (ratio of those times), the final metric at the budget, bytes
carried by the clock (training, probes, heartbeats, late replies) and the aggregation success
rate (rounds that made a new model from at least `quorum` of their clients).

    .venv/bin/python bench/hetero.py --tasks credit --jobs 2                  # ~1.5 h on 2 cores
    .venv/bin/python bench/hetero.py --tasks femnist --profiles both --seeds 0 --jobs 2
    .venv/bin/python bench/hetero.py --summarize-only --tasks credit femnist
    .venv/bin/python bench/hetero.py --tasks credit --strategies fedavg fedasync fedbuff tiered \
        --round-factor 50 --jobs 2 --keep-from old_hetero.json   # rerun four, keep the others

Writes bench/results/hetero.{json,md} and hetero_<task>.png; runs stay under
bench/results/runs_hetero/ (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import fmt_mean_sd, run_inline_job  # noqa: E402

BASELINE = "fedavg"
STRATEGIES = [
    "fedavg",
    "fedavg_deadline",
    "fedprox",
    "qfedavg",
    "fedasync",
    "fedbuff",
    "tifl",
    "tiered",
]
PROFILES = ["compute", "network", "both"]
TASKS = {
    # Credit default (UCI Taiwan), 30 IID clients, 10 in training at a time, one local epoch.
    "credit": {
        "overrides": [
            "task=credit",
            "partition=iid",
            "partition.num_partitions=30",
            "clients_per_round=10",
            "train.local_epochs=1",
        ],
        "metric": "test_roc_auc",
    },
    # FEMNIST, natural split by writer (201 clients), 20 in training at a time.
    "femnist": {
        "overrides": ["task=femnist", "partition=natural", "clients_per_round=20"],
        "metric": "test_accuracy",
    },
}


def _name(task, profile, strategy, seed):
    return f"{task}-{profile}-{strategy}-s{seed}"


def _load(path: Path) -> dict | None:
    if not path.exists():
        return None
    res = json.loads(path.read_text())
    ok = res.get("final") is not None and res["meta"].get("status") in ("completed", "degraded")
    return res if ok else None


def _run(args, task, profile, strategy, seed, extra) -> dict | None:
    runs = args.out / "runs_hetero"
    out = runs / _name(task, profile, strategy, seed)
    res = _load(out / "results.json") if args.reuse else None
    if res is not None:
        return res
    out.mkdir(parents=True, exist_ok=True)
    ovr = [
        *TASKS[task]["overrides"],
        f"hetero={profile}",
        f"strategy={strategy}",
        f"seed={seed}",
        "eval_clients_per_round=0",
        "checkpoint=false",
        *extra,
    ]
    t0 = time.perf_counter()
    ok = run_inline_job(ovr, out, out / "inline.log", ROOT)
    print(
        f"[bench] {out.name}: {'ok' if ok else 'FAILED (see inline.log)'} "
        f"{time.perf_counter() - t0:.0f}s",
        flush=True,
    )
    return _load(out / "results.json") if ok else None


def execute(args) -> None:
    cells = [(t, p, s) for t in args.tasks for p in args.profiles for s in args.seeds]
    # 1. synchronous FedAvg sets each cell's time budget
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        base = dict(
            zip(
                cells,
                pool.map(
                    lambda c: _run(args, *c[:2], BASELINE, c[2], [f"rounds={args.rounds}"]), cells
                ),
                strict=True,
            )
        )
    # 2. everyone else within that budget
    todo = []
    for cell, res in base.items():
        if res is None:
            continue
        budget = res["final"]["total_sim_time_s"]
        durations = np.diff([r["sim_time_s"] for r in res["rounds"]])
        deadline = 0.5 * float(np.median(durations))
        for s in args.strategies:
            if s == BASELINE:
                continue
            # a whole number of seconds (the key is an int); the summary cuts every curve at `budget`
            extra = [
                f"rounds={args.rounds * args.round_factor}",
                f"sim_time_budget_s={math.ceil(budget)}",
            ]
            if s == "fedavg_deadline":
                extra.append(f"strategy.deadline_s={deadline:.3f}")
            todo.append((cell, s, extra))
    print(f"[bench] {len(todo)} runs after the FedAvg baselines", flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda j: _run(args, j[0][0], j[0][1], j[1], j[0][2], j[2]), todo))


def time_to(rounds: list[dict], metric: str, target: float) -> float | None:
    """First simulated second at which `metric` reached `target` (None: never)."""
    for r in rounds:
        v = r.get(metric)
        if v is not None and v >= target:
            return float(r["sim_time_s"])
    return None


def summarize(args) -> dict:
    runs = args.out / "runs_hetero"
    cells = []
    for task in args.tasks:
        metric = TASKS[task]["metric"]
        for profile in args.profiles:
            for seed in args.seeds:
                base = _load(runs / _name(task, profile, BASELINE, seed) / "results.json")
                if base is None:
                    continue
                target = args.target_frac * base["rounds"][-1][metric]
                t_base = time_to(base["rounds"], metric, target)
                budget = base["final"]["total_sim_time_s"]
                for s in args.strategies:
                    res = _load(runs / _name(task, profile, s, seed) / "results.json")
                    if res is None:
                        continue
                    rounds = [r for r in res["rounds"] if r["sim_time_s"] <= budget * 1.0001]
                    fed = [r for r in rounds if r["round"] > 0]
                    t = time_to(rounds, metric, target)
                    cells.append(
                        {
                            "task": task,
                            "profile": profile,
                            "seed": seed,
                            "strategy": s,
                            "target": target,
                            "time_to_target_s": t,
                            "speedup": (t_base / t) if (t and t_base) else None,
                            "final": rounds[-1][metric],
                            "final_minus_fedavg": rounds[-1][metric] - base["rounds"][-1][metric],
                            "rounds": len(fed),
                            "sim_time_s": rounds[-1]["sim_time_s"],
                            "bytes": (res["final"]["clock_bytes_up"] or 0)
                            + (res["final"]["clock_bytes_down"] or 0),
                            "success_rate": (
                                float(np.mean([bool(r["aggregation_success"]) for r in fed]))
                                if fed
                                else None
                            ),
                            "curve": [(r["sim_time_s"], r[metric]) for r in rounds],
                        }
                    )
    return {
        "rounds": args.rounds,
        "round_factor": args.round_factor,
        "target_frac": args.target_frac,
        "cells": cells,
    }


def keep_cells(args, summary: dict, earlier: dict) -> dict:
    """`summary` plus the cells of `earlier` whose (task, strategy) this run did not produce
    (marked `kept`: measured against that run's FedAvg baselines and round cap)."""
    ran = {(c["task"], c["strategy"]) for c in summary["cells"]}
    kept = [
        {**c, "kept": True}
        for c in earlier["cells"]
        if (c["task"], c["strategy"]) not in ran
        and c["strategy"] != BASELINE
        or (c["task"] not in {t for t, _ in ran})
    ]
    for c in kept:
        if c["task"] not in args.tasks:
            args.tasks.append(c["task"])
        if c["strategy"] not in args.strategies:
            args.strategies.append(c["strategy"])
    args.strategies.sort(key=lambda s: STRATEGIES.index(s) if s in STRATEGIES else len(STRATEGIES))
    return {
        **summary,
        "cells": summary["cells"] + kept,
        "kept_from": {"round_factor": earlier.get("round_factor"), "cells": len(kept)},
        # strategies re-run here: their kept cells (other tasks) are from their code of then
        "rerun": sorted({s for _, s in ran if s != BASELINE}),
    }


def write_report(args, summary: dict) -> None:
    (args.out / "hetero.json").write_text(json.dumps(summary, indent=1))
    cells = summary["cells"]
    lines = [
        "# Heterogeneous federations: simulated time, accuracy, bytes, aggregation success",
        "",
        f"`bench/hetero.py`: in-process engine, virtual clock, CPU. Synchronous FedAvg runs "
        f"{summary['rounds']} rounds; every other strategy gets the same simulated time. Target = "
        f"{summary['target_frac']:g} x synchronous FedAvg's final value (same task, profile and "
        "seed). Mean ± sd over seeds; speed-up = FedAvg's time to target / the strategy's "
        "(— when the target was not reached in the budget); bytes in MB through the clock; "
        "success = share of rounds that made a new model from at least `quorum` (0.5) of "
        "their clients. Asynchronous strategies stop at the budget (or after "
        f"{summary['round_factor']} x {summary['rounds']} logged rounds). Matched concurrency: "
        "FedAsync, FedBuff and tiered all keep `clients_per_round` trainings in flight "
        "(credit: 10 of 30 clients; FedAsync/FedBuff start a fresh client the moment one "
        "lands, tiered splits the 10 slots over its tiers and refills a slot when its client "
        "lands, fails or misses its window); FedBuff's buffer K = 10 (its shipped default, "
        "capped at the concurrency).",
        "",
    ]
    if "kept_from" in summary:
        lines += [
            "Rows marked * are kept from an earlier run of this script (`--keep-from`, round "
            f"cap {summary['kept_from']['round_factor']} x rounds, its own FedAvg baselines); "
            "the others were measured in this run.",
            "",
        ]
        if any(c.get("kept") and c["strategy"] in summary.get("rerun", []) for c in cells):
            lines += [
                "Rows marked † are kept for a strategy this run re-ran on other tasks only: "
                "they were measured with its code of then, which may have changed since "
                "(git log of the strategy's module).",
                "",
            ]
    profiles = list(dict.fromkeys([*args.profiles, *(c["profile"] for c in cells)]))
    for task in args.tasks:
        metric = TASKS[task]["metric"]
        for profile in profiles:
            pc = [c for c in cells if c["task"] == task and c["profile"] == profile]
            if not pc:
                continue
            seeds = sorted({c["seed"] for c in pc})
            lines += [
                f"## {task} / {profile}: {metric} (seeds {seeds})",
                "",
                "| strategy | time to target (s) | speed-up vs FedAvg | final | final - FedAvg | "
                "rounds | MB | success |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for s in args.strategies:
                sc = [c for c in pc if c["strategy"] == s]
                if not sc:
                    continue
                reached = [c["time_to_target_s"] for c in sc]
                missed = sum(t is None for t in reached)
                ttt = fmt_mean_sd(reached, 0) + (f" ({missed} missed)" if missed else "")
                star = "*" if any(c.get("kept") for c in sc) else ""
                if star and s in summary.get("rerun", []):
                    star = "*†"
                lines.append(
                    f"| {s}{star} | {ttt} | {fmt_mean_sd([c['speedup'] for c in sc], 2)} | "
                    f"{fmt_mean_sd([c['final'] for c in sc])} | "
                    f"{fmt_mean_sd([c['final_minus_fedavg'] for c in sc])} | "
                    f"{fmt_mean_sd([c['rounds'] for c in sc], 0)} | "
                    f"{fmt_mean_sd([c['bytes'] / 1e6 for c in sc], 1)} | "
                    f"{fmt_mean_sd([c['success_rate'] for c in sc], 2)} |"
                )
            lines.append("")
    (args.out / "hetero.md").write_text("\n".join(lines))
    plot(args, summary)


def plot(args, summary) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task in args.tasks:
        profiles = [
            p
            for p in args.profiles
            if any(c["task"] == task and c["profile"] == p for c in summary["cells"])
        ]
        if not profiles:
            continue
        fig, axes = plt.subplots(1, len(profiles), figsize=(5 * len(profiles), 4), squeeze=False)
        for ax, profile in zip(axes[0], profiles, strict=True):
            seed = min(c["seed"] for c in summary["cells"] if c["task"] == task)
            for s in args.strategies:
                c = next(
                    (
                        c
                        for c in summary["cells"]
                        if (c["task"], c["profile"], c["strategy"], c["seed"])
                        == (task, profile, s, seed)
                    ),
                    None,
                )
                if c is None:
                    continue
                t, v = zip(*c["curve"], strict=True)
                ax.plot(t, v, label=s, lw=2 if s in ("tiered", BASELINE) else 1)
                ax.axhline(c["target"], color="grey", ls=":", lw=1)
            ax.set_title(f"{task} / {profile} (seed {seed})")
            ax.set_xlabel("simulated seconds")
            ax.set_ylabel(TASKS[task]["metric"])
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out / f"hetero_{task}.png", dpi=110)
        plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["credit"], choices=list(TASKS))
    p.add_argument("--profiles", nargs="+", default=PROFILES)
    p.add_argument("--strategies", nargs="+", default=STRATEGIES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=20, help="synchronous FedAvg's rounds")
    p.add_argument("--round-factor", type=int, default=8, help="cap on others' rounds, x rounds")
    p.add_argument("--target-frac", type=float, default=0.97)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--reuse", action="store_true", help="skip runs already completed")
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument(
        "--keep-from",
        type=Path,
        help="an earlier hetero.json: its cells of strategies (and tasks) not run now are kept "
        "in the report, marked as from that run",
    )
    args = p.parse_args()
    if BASELINE not in args.strategies:
        args.strategies = [BASELINE, *args.strategies]
    if not args.summarize_only:
        execute(args)
    summary = summarize(args)
    if args.keep_from is not None:
        summary = keep_cells(args, summary, json.loads(args.keep_from.read_text()))
    write_report(args, summary)
    print((args.out / "hetero.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
