"""Deployment costs on a credit federation of 3 SuperNodes: real processes on loopback.

- `tls`: the same run with TLS and SuperNode authentication (`fedapp-federation`'s default)
  and with `--insecure`: wall time, every byte on the loopback interface during the run
  (`/proc/net/dev`, so TLS records, handshakes, heartbeats and the `flwr` CLI are counted;
  nothing else should be running), the model bytes the run itself counted, and the final
  ROC-AUC (which must be the same: TLS changes the transport, not the numbers).
- `fault`: one SuperNode is SIGKILLed when round 1 has been logged and restarted 3 s later
  (a new Flower node id, the same file and partition id): seconds from the kill until the
  server saw that client fail, from the restart until the server recognised it as the same
  client, the wall time of the rounds, and whether the run completed.

    .venv/bin/python bench/deployment.py --seeds 0 1          # both experiments
    .venv/bin/python bench/deployment.py --only fault --seeds 0

Writes bench/results/deployment.{json,md}; runs stay under bench/results/runs_deployment/.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import fmt_mean_sd  # noqa: E402
from fedapp.checks import compose  # noqa: E402
from fedapp.cli.federation import (  # noqa: E402
    export_operator_files,
    node_config_line,
    run_federation,
    start_supernode,
)
from fedapp.cli.launch import (  # noqa: E402
    prepare_run,
    run_status,
    stop_process_group,
    submit,
    superlink,
)
from fedapp.core.config import PROJECT_ROOT, parse_overrides  # noqa: E402

OUT = ROOT / "bench" / "results"
RUNS = OUT / "runs_deployment"
NODES = 3
BASE = (
    "task=credit partition=iid partition.num_partitions=3 clients_per_round=3 "
    "eval_clients_per_round=3 train.local_epochs=1"
)


def loopback_bytes() -> int:
    """Bytes received on `lo` so far (on loopback every byte sent is received once)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[0])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def tls_run(seed: int, secure: bool, rounds: int) -> dict:
    out = RUNS / f"tls-{'on' if secure else 'off'}-s{seed}"
    before, start = loopback_bytes(), time.monotonic()
    outcome = run_federation(
        NODES, f"{BASE} rounds={rounds} seed={seed}", out, insecure=not secure, timeout=3600
    )
    wall, wire = time.monotonic() - start, loopback_bytes() - before
    res = json.loads((out / "results.json").read_text())
    final = res["final"]
    return {
        "seed": seed,
        "tls": secure,
        "status": outcome.run_status,
        "wall_s": wall,
        "mean_round_s": final["mean_round_s"],
        "loopback_bytes": wire,
        "model_bytes": final["total_bytes_up"] + final["total_bytes_down"],
        "roc_auc": res["rounds"][-1].get("test_roc_auc"),
    }


def killed_node_run(out: Path, overrides: str, nodes: int = NODES) -> dict:
    """A federation of `nodes` SuperNodes (insecure, on loopback; each with only its own file,
    the server with only its test file) in which node 1 is SIGKILLed once round 1 has been
    logged and restarted 3 s later with a new Flower node id, the same file and the same
    partition id. Returns the run's results.json, its final status as the SuperLink reports
    it, its wall time and the kill and restart times (Unix seconds). Shared by this bench and
    tests/test_deployment.py."""
    out.mkdir(parents=True, exist_ok=True)
    ovr = parse_overrides(overrides)
    rounds = int(compose(ovr).rounds)
    files, test = export_operator_files(ovr, nodes, out)
    ovr = [*ovr, f"task.test_file={test}"]
    flwr_home, env, run_cfg = prepare_run(compose(ovr), ovr, test.parent, out)
    procs: dict[str, object] = {}
    events: dict[str, float] = {}
    port_box: list[int] = []

    def node(i: int, tag: str):
        return start_supernode(
            port_box[0],
            flwr_home / f"sn-{i}-{tag}",
            env,
            out / "nodes" / f"node-{i}" / f"supernode-{tag}.log",
            node_config_line(i, nodes, files[i], None),
        )

    def chaos() -> None:
        log = out / "flwr_run.log"
        while f"round 1/{rounds}" not in (log.read_text() if log.exists() else ""):
            time.sleep(0.1)
        procs["1-old"].send_signal(signal.SIGKILL)
        events["killed"] = time.time()
        time.sleep(3)
        procs["1-new"] = node(1, "new")
        events["restarted"] = time.time()

    try:
        with superlink(flwr_home, out / "superlink.log", env, simulation=False) as port:
            port_box.append(port)
            for i in range(nodes):
                procs[f"{i}-old"] = node(i, "old")
            threading.Thread(target=chaos, daemon=True).start()
            start = time.monotonic()
            _, run_id = submit(PROJECT_ROOT, run_cfg, env, None, 3600, out / "flwr_run.log")
            wall = time.monotonic() - start
            status = run_status(env, run_id)
    finally:
        for p in procs.values():
            stop_process_group(p)
    return {
        "results": json.loads((out / "results.json").read_text()),
        "status": status,
        "wall_s": wall,
        **events,
    }


def fault_run(seed: int, rounds: int, round_timeout_s: float) -> dict:
    """Kill node 1 after round 1, restart it 3 s later; what the server saw and when."""
    run = killed_node_run(
        RUNS / f"fault-s{seed}",
        f"{BASE} rounds={rounds} seed={seed} round_timeout_s={round_timeout_s} min_replies=1",
    )
    res = run["results"]
    client = res["nodes"]["1"]
    t0 = res["meta"]["clients_started_unix"]  # the `nodes` times count from here
    return {
        "seed": seed,
        "status": run["status"],
        "run_status": res["meta"]["status"],
        "wall_s": run["wall_s"],
        "round_wall_s": [r["wall_s"] for r in res["rounds"][1:]],
        "killed_at_s": run["killed"] - t0,
        "failure_seen_at_s": client["last_failure_s"],
        "detect_s": (client["last_failure_s"] or np.nan) - (run["killed"] - t0),
        "restarted_at_s": run["restarted"] - t0,
        "rejoined_at_s": client["rejoined_s"],
        "recognise_s": (client["rejoined_s"] or np.nan) - (run["restarted"] - t0),
        "rejoins": client["rejoins"],
        "failures": client["failures"],
        "trained_after_restart": any(
            c["partition_id"] == 1 and c["phase"] == "train" and c["status"] == "ok"
            for r in res["rounds"]
            if r["round"] > 2
            for c in r["clients"]
        ),
        "config": {"rounds": rounds, "round_timeout_s": round_timeout_s},
        "note": "*_at_s: seconds since the ServerApp mapped its clients (meta.clients_started_unix)",
    }


def report(results: dict) -> str:
    lines = ["# Deployment: TLS cost and a killed SuperNode (credit, 3 SuperNodes, loopback)", ""]
    tls = results.get("tls", [])
    if tls:
        lines += [
            "## TLS + SuperNode authentication vs insecure",
            "",
            "| transport | runs | wall s | mean round s | loopback MB | model MB | ROC-AUC |",
            "|---|---|---|---|---|---|---|",
        ]
        for secure in (False, True):
            rows = [r for r in tls if r["tls"] == secure]
            if not rows:
                continue
            col = lambda k, scale=1.0, rs=rows: fmt_mean_sd([r[k] / scale for r in rs])  # noqa: E731
            lines.append(
                f"| {'TLS + auth' if secure else 'insecure'} | {len(rows)} | {col('wall_s')} | "
                f"{col('mean_round_s')} | {col('loopback_bytes', 1e6)} | {col('model_bytes', 1e6)}"
                f" | {col('roc_auc')} |"
            )
        lines.append("")
    faults = results.get("fault", [])
    if faults:
        lines += [
            "## A SuperNode SIGKILLed after round 1, restarted 3 s later",
            "",
            "| seed | status | kill -> failure seen (s) | restart -> recognised (s) | rejoins | "
            "trained again | round wall s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in faults:
            lines.append(
                f"| {r['seed']} | {r['run_status']} | {r['detect_s']:.1f} | "
                f"{r['recognise_s']:.1f} | {r['rejoins']} | {r['trained_after_restart']} | "
                f"{', '.join(f'{w:.0f}' for w in r['round_wall_s'])} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["tls", "fault"], default=None)
    parser.add_argument("--round-timeout-s", type=float, default=150.0)
    args = parser.parse_args()
    path = OUT / "deployment.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.only in (None, "tls"):
        results["tls"] = [tls_run(s, tls, args.rounds) for s in args.seeds for tls in (False, True)]
        path.write_text(json.dumps(results, indent=1))
    if args.only in (None, "fault"):
        results["fault"] = [
            fault_run(s, max(args.rounds, 4), args.round_timeout_s) for s in args.seeds
        ]
        path.write_text(json.dumps(results, indent=1))
    results["command"] = " ".join(sys.argv)
    path.write_text(json.dumps(results, indent=1))
    (OUT / "deployment.md").write_text(report(results))
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
