"""Round time, start-up time and memory against federation size at fixed clients per round.

FEMNIST's 31,225 images split uniformly (partition=iid) into 100, 1,000 or 10,000 clients;
FedAvg with 20 clients per round and 10 evaluated, one local step each (`train.max_steps=1`:
the same work per client at every size, so that what grows is the federation and not the
clients' data), `--rounds` rounds, served by
min(N, `--supernodes`) SuperNodes (the rest are virtual clients on them, with the same results
as one SuperNode each). Each engine runs as a child process whose whole process tree (for
`fedapp-run`: SuperLink, simulation, Ray) is sampled for resident memory every 0.25 s.

    .venv/bin/python bench/scale.py                          # both engines, 100 / 1k / 10k
    .venv/bin/python bench/scale.py --engines inline --sizes 100 10000

- round time: the median `wall_s` of rounds 2..R (round 1 pays the first data loads);
- start-up: the run's wall time minus its rounds (processes, discovery, statistics, the
  initial evaluation, the last write);
- memory per idle client: (peak RSS at the largest size - at the smallest) / the clients added.

Writes bench/results/scale.json and scale.md. The target (issue 19): round time at 10,000
clients within 1.5x of 100.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RUNS = RESULTS / "runs_scale"


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def run(engine: str, size: int, rounds: int, supernodes: int) -> dict:
    out = RUNS / f"{engine}-{size}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    nodes = min(size, supernodes)
    overrides = [
        "task=femnist",
        "partition=iid",
        f"partition.num_partitions={size}",
        f"rounds={rounds}",
        "clients_per_round=20",
        "eval_clients_per_round=10",
        "train.max_steps=1",
        f"simulation.num_supernodes={nodes}",
        "seed=0",
    ]
    if engine == "flower":
        cmd = [sys.executable, "-m", "fedapp.cli.launch", *overrides, "--output-dir", str(out)]
    else:
        cmd = [sys.executable, "-m", "fedapp.cli.inline", *overrides, "--nodes", str(nodes)]
        cmd += ["--output-dir", str(out)]
    t0 = time.perf_counter()
    with (RUNS / f"{engine}-{size}.log").open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        watched, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, tree_rss(watched))
            time.sleep(0.25)
    wall = time.perf_counter() - t0
    results = json.loads((out / "results.json").read_text())
    status = results["meta"].get("status")
    fed = [r for r in results["rounds"] if r["round"] >= 1]
    later = [r["wall_s"] for r in fed if r["round"] >= 2]
    row = {
        "engine": engine,
        "clients": size,
        "supernodes": nodes,
        "status": status,
        "rounds": len(fed),
        "round_s": statistics.median(later) if later else None,
        "round_s_all": [r["wall_s"] for r in fed],
        "startup_s": wall - sum(r["wall_s"] for r in fed),
        "run_wall_s": wall,
        "peak_rss_mb": peak / 2**20,
        "test_accuracy": fed[-1]["test_accuracy"] if fed else None,
        "command": " ".join(cmd[1:]),
    }
    print(
        f"[scale] {engine:6s} {size:6d} clients ({nodes} SuperNodes): {status}, round "
        f"{row['round_s']:.2f} s, start-up {row['startup_s']:.1f} s, peak {row['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    return row


def markdown(report: dict) -> str:
    lines = [
        "# Federation size: round time, start-up and memory",
        "",
        f"FEMNIST split iid into N clients; FedAvg, 20 clients per round (10 evaluated), one local "
        f"step each, "
        f"{report['rounds']} rounds; SuperNodes = min(N, {report['supernodes']}). "
        f"{report['cpus']} CPUs. Command: `{report['command']}`",
        "",
        "| engine | clients | status | round (median, s) | vs smallest | start-up (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for engine, rows in report["engines"].items():
        base = rows[0]["round_s"]
        for r in rows:
            lines.append(
                f"| {engine} | {r['clients']:,} | {r['status']} | {r['round_s']:.2f} | "
                f"{r['round_s'] / base:.2f}x | {r['startup_s']:.1f} | {r['peak_rss_mb']:.0f} |"
            )
        if len(rows) > 1:
            per = report["memory_per_idle_client_kb"][engine]
            text = f"{per:.1f} KB" if per > 0 else f"none measured ({per:.1f} KB: within noise)"
            lines.append(f"| {engine} | memory per idle client | | | | | {text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[100, 1000, 10000])
    p.add_argument(
        "--engines", nargs="+", default=["inline", "flower"], choices=["inline", "flower"]
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--supernodes", type=int, default=100)
    p.add_argument("--summarize-only", action="store_true", help="rewrite scale.md from scale.json")
    args = p.parse_args(argv)
    if args.summarize_only:
        report = json.loads((RESULTS / "scale.json").read_text())
        (RESULTS / "scale.md").write_text(markdown(report))
        return 0
    report = {
        "rounds": args.rounds,
        "supernodes": args.supernodes,
        "cpus": os.cpu_count(),
        "command": "python bench/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "engines": {},
        "memory_per_idle_client_kb": {},
    }
    sizes = sorted(args.sizes)
    for engine in args.engines:
        rows = [run(engine, size, args.rounds, args.supernodes) for size in sizes]
        report["engines"][engine] = rows
        if len(rows) > 1:
            added = rows[-1]["clients"] - rows[0]["clients"]
            extra = (rows[-1]["peak_rss_mb"] - rows[0]["peak_rss_mb"]) * 1024
            report["memory_per_idle_client_kb"][engine] = extra / added
            ratio = rows[-1]["round_s"] / rows[0]["round_s"]
            report.setdefault("round_time_ratio", {})[engine] = ratio
            print(
                f"[scale] {engine}: round time at {sizes[-1]:,} = {ratio:.2f}x that at {sizes[0]:,}",
                flush=True,
            )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "scale.md").write_text(markdown(report))
    print(f"[scale] wrote {RESULTS / 'scale.json'} and scale.md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
