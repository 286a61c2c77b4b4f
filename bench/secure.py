"""Encrypted aggregation and compressed updates: final metric, bytes up and down per round, client
and server seconds per round, against plain FedAvg on the same splits and seeds.

Modes: plain, ckks (TenSEAL CKKS; the server adds ciphertexts), fp16, int8, topk at 1% and
10% (error feedback), and ckks with sample-level DP (epsilon 8). Every run goes through the
in-process engine in single-threaded subprocesses. Client seconds per round = the mean over a
round's clients of local training plus encryption (`train_time_s` + `crypto_s`); server seconds
= the round's screening, decoding and aggregation (`aggregate_s`).

    .venv/bin/python bench/secure.py --tasks credit --jobs 2
    .venv/bin/python bench/secure.py --tasks femnist --seeds 0 --jobs 2 \
        --modes plain ckks fp16 int8 topk1 topk10
    .venv/bin/python bench/secure.py --summarize-only --tasks credit femnist

Writes bench/results/secure.{json,md}; runs stay under bench/results/runs_secure/.
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

TASKS = {
    # UCI credit default, 20 IID clients, all of them each round, ROC-AUC
    "credit": {
        "overrides": [
            "task=credit",
            "partition=iid",
            "partition.num_partitions=20",
            "clients_per_round=20",
            "rounds=10",
        ],
        "metric": "test_roc_auc",
    },
    # FEMNIST, natural split (201 writers), 20 per round
    "femnist": {
        "overrides": ["task=femnist", "partition=natural", "clients_per_round=20", "rounds=10"],
        "metric": "test_accuracy",
    },
}
MODES = {
    "plain": [],
    "ckks": ["secure=ckks"],
    "fp16": ["compression=fp16"],
    "int8": ["compression=int8"],
    "topk1": ["compression=topk", "compression.ratio=0.01"],
    "topk10": ["compression=topk", "compression.ratio=0.1"],
    "ckks_dp8": ["secure=ckks", "privacy=sample_dp", "privacy.target_epsilon=8"],
}


def plan(args):
    jobs = []
    for task in args.tasks:
        for mode in args.modes:
            for seed in args.seeds:
                ovr = [
                    *TASKS[task]["overrides"],
                    *MODES[mode],
                    "strategy=fedavg",
                    f"seed={seed}",
                    "eval_clients_per_round=0",
                    "checkpoint=false",
                ]
                jobs.append(
                    ({"task": task, "mode": mode, "seed": seed}, ovr, f"{task}-{mode}-s{seed}")
                )
    return jobs


def _rounds(task: str) -> int:
    return int(next(o for o in TASKS[task]["overrides"] if o.startswith("rounds=")).split("=")[1])


def execute(args, jobs) -> None:
    runs = args.out / "runs_secure"
    runs.mkdir(parents=True, exist_ok=True)
    todo = [
        (o, runs / n)
        for k, o, n in jobs
        if not (args.reuse and completed(runs / n / "results.json", _rounds(k["task"])))
    ]
    print(f"[bench] {len(jobs)} runs planned, {len(todo)} to run", flush=True)
    t0 = time.perf_counter()

    def work(item):
        ovr, out = item
        out.mkdir(parents=True, exist_ok=True)
        return out.name, run_inline_job(ovr, out, out / "inline.log", ROOT)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for i, (name, ok) in enumerate(pool.map(work, todo), 1):
            print(
                f"[bench] {i}/{len(todo)} {name}: {'ok' if ok else 'FAILED'}  "
                f"{(time.perf_counter() - t0) / 60:.1f} min",
                flush=True,
            )


def per_round(res: dict) -> dict:
    fed = [r for r in res["rounds"] if r["round"] > 0]

    def client_s(r):
        cs = [c for c in r["clients"] if c["phase"] == "train" and c["status"] == "ok"]
        return float(np.mean([c.get("train_time_s", 0) + c.get("crypto_s", 0) for c in cs]))

    return {
        "bytes_up": float(np.mean([r["bytes_up"] for r in fed])),
        "bytes_down": float(np.mean([r["bytes_down"] for r in fed])),
        "client_s": float(np.mean([client_s(r) for r in fed])),
        "server_s": float(np.mean([r.get("aggregate_s", 0.0) for r in fed])),
        "round_s": float(np.mean([r["wall_s"] for r in fed])),
    }


def summarize(args, jobs) -> dict:
    runs = args.out / "runs_secure"
    records = {}
    for key, _, name in jobs:
        res = completed(runs / name / "results.json", _rounds(key["task"]))
        if res is None:
            continue
        records[(key["task"], key["mode"], key["seed"])] = {
            "final": res["rounds"][-1][TASKS[key["task"]]["metric"]],
            **per_round(res),
            "dp_epsilon": res["rounds"][-1].get("dp_epsilon"),
        }
    cells = []
    for task in args.tasks:
        for mode in args.modes:
            recs = {s: records.get((task, mode, s)) for s in args.seeds}
            recs = {s: r for s, r in recs.items() if r}
            if not recs:
                continue
            base = {s: records.get((task, "plain", s)) for s in recs}
            cell = {"task": task, "mode": mode, "seeds": sorted(recs)}
            for field in ("final", "bytes_up", "bytes_down", "client_s", "server_s", "round_s"):
                cell[field] = [recs[s][field] for s in sorted(recs)]
            cell["diff"] = [recs[s]["final"] - base[s]["final"] for s in recs if base.get(s)]
            cell["up_ratio"] = [
                base[s]["bytes_up"] / recs[s]["bytes_up"] for s in recs if base.get(s)
            ]
            cell["round_ratio"] = [
                recs[s]["round_s"] / base[s]["round_s"] for s in recs if base.get(s)
            ]
            cell["dp_epsilon"] = recs[sorted(recs)[0]]["dp_epsilon"]
            cells.append(cell)
    return {"cells": cells, "metrics": {t: TASKS[t]["metric"] for t in args.tasks}}


def write_report(args, summary: dict) -> None:
    (args.out / "secure.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "# Encrypted aggregation and compressed updates",
        "",
        "`bench/secure.py`: FedAvg, in-process engine, CPU, single-threaded runs. diff = final "
        "metric minus plain's, paired by seed; up x = plain's bytes up / this mode's; round x = "
        "this mode's wall seconds per round / plain's. Client s = mean per client and round of "
        "training plus encryption; server s = screening, decoding and aggregation per round. "
        "Mean ± sd over seeds.",
        "",
    ]
    for task in args.tasks:
        tc = [c for c in summary["cells"] if c["task"] == task]
        if not tc:
            continue
        m = summary["metrics"][task]
        lines += [
            f"## {task}: {m}",
            "",
            f"| mode | {m} | diff | MB up / round | up x | MB down / round | client s | server s | round x | seeds |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in tc:
            lines.append(
                f"| {c['mode']} | {fmt_mean_sd(c['final'], 4)} | {fmt_mean_sd(c['diff'], 4)} | "
                f"{fmt_mean_sd([b / 1e6 for b in c['bytes_up']], 2)} | {fmt_mean_sd(c['up_ratio'], 2)} | "
                f"{fmt_mean_sd([b / 1e6 for b in c['bytes_down']], 2)} | {fmt_mean_sd(c['client_s'], 2)} | "
                f"{fmt_mean_sd(c['server_s'], 2)} | {fmt_mean_sd(c['round_ratio'], 2)} | {len(c['seeds'])} |"
            )
        lines.append("")
    (args.out / "secure.md").write_text("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["credit"], choices=list(TASKS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args()
    jobs = plan(args)
    if not args.summarize_only:
        execute(args, jobs)
    write_report(args, summarize(args, jobs))
    print((args.out / "secure.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
