"""The event store's cost and the board's speed (issue 35).

1. Write cost per round: the default job (femnist, fedavg, 201 clients, 20 per round) run in
   process with `EventStore.record` timed on every call the recorder makes, against the
   run's own mean round time (`wall_s`); and a 10,000-client federation (20 replies a round,
   and the worst case of all 10,000 replying every round) replayed through the store as the
   recorder calls it, against the 10,000-client inline round time of bench/scale.py.
2. Load times: a 300-round run (20 clients a round, 201 nodes, DP ledger) and a
   10,000-client run (3 rounds in which all 10,000 clients report, 10,000 nodes) written
   into a fresh SQLite store through `EventStore.record`; each API endpoint (first page)
   timed in process (median of 5), and each page in headless Chromium until it has drawn
   its data (when Chromium is installed).
3. Database size per round of both.

    nice -n 10 .venv/bin/python bench/board.py [--rounds 3]

Writes bench/results/board.json and board.md. Targets: write cost < 2% of the round time;
pages and API < 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from fedapp.features import events as ev  # noqa: E402

OUT = ROOT / "bench" / "results"
SCALE = ROOT / "bench" / "results" / "scale.json"


def _timed_record(calls: list[float]):
    orig = ev.EventStore.record

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return orig(self, *a, **k)
        finally:
            calls.append(time.perf_counter() - t0)

    return orig, timed


def write_cost(rounds: int, work: Path) -> list[dict]:
    """The default job, run in process with every `EventStore.record` call timed."""
    from fedapp.cli.inline import run_inline

    calls: list[float] = []
    orig, timed = _timed_record(calls)
    ev.EventStore.record = timed
    db = work / "write-201.db"
    try:
        run = run_inline(f"rounds={rounds} events_db={ev.sqlite_url(db)}", work / "run-201")
    finally:
        ev.EventStore.record = orig
    res = json.loads((run / "results.json").read_text())
    fed = [r["wall_s"] for r in res["rounds"] if r["round"] > 0]
    per_round = calls[1 : 1 + rounds]  # the calls after rounds 1..R (0: the initial model)
    return [
        _row(
            "default job, live (fedapp-inline)",
            res["meta"]["num_clients"],
            f"rounds={rounds}",
            statistics.mean(fed),
            "this run's mean wall_s",
            per_round,
            calls[-1],
            db,
        )
    ]


def replay_cost(work: Path, clients: int, per_round: int, rounds: int) -> dict:
    """A federation of `clients` with `per_round` replies a round, written through the store
    as the recorder does (the cumulative results dict after every round; `nodes` every round
    up to 1,000 clients, else at the end), against the 10,000-client inline round time that
    bench/scale.py measured (the live 10,000-client run is not repeated here)."""
    scale = json.loads(SCALE.read_text())
    ref = next(c for c in scale["engines"]["inline"] if c["clients"] == 10000)
    db = work / f"replay-{clients}-{per_round}.db"
    store = ev.EventStore(ev.sqlite_url(db), work / f"replay-{clients}-{per_round}")
    full = _synthetic(rounds, per_round, clients, False, rounds)
    calls = []
    for r in range(rounds + 1):
        part = dict(full, rounds=full["rounds"][: r + 1])
        if clients > 1000 and r != rounds:
            part = {k: v for k, v in part.items() if k != "nodes"}
        t0 = time.perf_counter()
        store.record(part, best={"round": r, "test_accuracy": 0.5}, final=r == rounds)
        calls.append(time.perf_counter() - t0)
    assert not store.failed
    return _row(
        f"{clients:,} clients, {per_round:,} replies a round (replay)",
        clients,
        f"{rounds} rounds",
        ref["round_s"],
        "bench/results/scale.json inline 10,000-client round_s",
        calls[1:rounds],
        calls[-1],
        db,
    )


def _row(name, clients, overrides, round_s, round_from, per_round, final, db) -> dict:
    write = statistics.mean(per_round)
    return {
        "run": name,
        "clients": clients,
        "overrides": overrides,
        "rounds": len(per_round),
        "mean_round_s": round_s,
        "round_time_from": round_from,
        "write_s_per_round": write,
        "write_s_max": max(per_round),
        "write_s_final": final,
        "write_share_of_round": write / round_s,
        "db_bytes": sum(p.stat().st_size for p in db.parent.glob(db.name + "*")),
    }


def _synthetic(rounds: int, clients_per_round: int, num_clients: int, dp: bool, rnd: int) -> dict:
    rows = []
    for r in range(rnd + 1):
        cl = []
        if r:
            for k in range(clients_per_round):
                p = (r * clients_per_round + k) % num_clients
                c = {
                    "phase": "train",
                    "partition_id": p,
                    "node_id": 1000 + p,
                    "status": "ok",
                    "num-examples": 150,
                    "train_loss": 1.0,
                    "train_steps": 15.0,
                    "train_time_s": 0.1,
                    "weight": 1 / clients_per_round,
                }
                if dp:
                    c.update(dp_epsilon=0.05 * r, dp_target_epsilon=8.0, dp_noise_multiplier=1.1)
                cl.append(c)
        rows.append(
            {
                "round": r,
                "test_accuracy": 0.5 + r / (4 * rounds),
                "test_loss": 2 - r / rounds,
                "client_accuracy": 0.5,
                "train_loss": 1.0,
                "num_sampled": clients_per_round,
                "num_replies": clients_per_round,
                "num_failures": 0,
                "aggregated": True,
                "bytes_up": 10**7,
                "bytes_down": 10**7,
                "wall_s": 2.6,
                "elapsed_s": 2.6 * r,
                "sim_time_s": 2.6 * r,
                "dp_epsilon": 0.05 * r if dp else None,
                "clients": cl,
            }
        )
    nodes = {
        str(p): {
            "partition_id": p,
            "node_id": 1000 + p,
            "joined_s": 0.0,
            "last_seen_s": 1.0,
            "replies": 1,
            "failures": 0,
            "rejoins": 0,
            "connected": True,
        }
        for p in range(num_clients)
    }
    return {
        "meta": {
            "status": "running" if rnd < rounds else "completed",
            "run_id": 1,
            "num_clients": num_clients,
        },
        "config": {
            "task": {"name": "femnist"},
            "strategy": {"name": "fedavg"},
            "privacy": {"name": "sample_dp" if dp else "none"},
            "rounds": rounds,
        },
        "rounds": rows,
        "nodes": nodes,
        "final": None,
    }


def build(url: str, out_dir: Path, rounds: int, cpr: int, n: int, dp: bool) -> None:
    store = ev.EventStore(url, out_dir)
    full = _synthetic(rounds, cpr, n, dp, rounds)
    for r in range(rounds + 1):
        part = dict(full, rounds=full["rounds"][: r + 1])
        part["meta"] = dict(full["meta"], status="running" if r < rounds else "completed")
        if n > 1000 and r not in (0, rounds):
            part = {k: v for k, v in part.items() if k != "nodes"}  # as the recorder does
        store.record(part, best={"round": r, "test_accuracy": 0.5}, final=r == rounds)
    assert not store.failed


def load_times(work: Path) -> dict:
    from fastapi.testclient import TestClient

    from fedapp.cli.board.app import create_app

    url = ev.sqlite_url(work / "load.db")
    specs = {"300 rounds": (300, 20, 201, True), "10,000 clients": (3, 10000, 10000, True)}
    ids, sizes = {}, {}
    for name, spec in specs.items():
        before = (work / "load.db").stat().st_size if (work / "load.db").exists() else 0
        t0 = time.perf_counter()
        build(url, work / name.replace(" ", "_").replace(",", ""), *spec)
        sizes[name] = {
            "build_s": time.perf_counter() - t0,
            "rounds": spec[0],
            "bytes": (work / "load.db").stat().st_size - before,
        }
        with ev.engine_for(url).connect() as conn:
            ids[name] = conn.execute(ev.select(ev.runs.c.id).order_by(ev.runs.c.id.desc())).scalar()
    app = create_app(url)
    client = TestClient(app)
    api: dict[str, dict[str, float]] = {}
    for name, rid in ids.items():
        paths = [
            "/api/runs",
            "/api/runs/{id}",
            "/api/runs/{id}/rounds?limit=1000",
            "/api/runs/{id}/clients?limit=50",
            "/api/runs/{id}/ledger?limit=50",
            "/api/runs/{id}/nodes?kind=!joined&limit=50",
            "/api/runs/{id}/audit?limit=50",
            "/api/runs/{id}/versions?limit=20",
            "/api/audit?limit=100",
        ]
        api[name] = {}
        for p in paths:
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                r = client.get(p.replace("{id}", str(rid)))
                ts.append(time.perf_counter() - t0)
                assert r.status_code == 200, (p, r.text)
            api[name][p] = statistics.median(ts)
    pages = browser_times(app, ids)
    return {"db": sizes, "api_s": api, "page_s": pages}


def browser_times(app, ids: dict[str, int]) -> dict | str:
    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_bin:
        return "headless Chromium not installed: page times not measured"
    from tests.test_board_browser import Served, browser

    out: dict[str, dict[str, float]] = {}
    driver = browser()
    try:
        with Served(app) as base:
            for name, rid in ids.items():
                out[name] = {}
                for page in ("/", "/runs/{id}", "/versions", "/audit"):
                    ts = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        driver.get(base + page.replace("{id}", str(rid)))
                        deadline = time.monotonic() + 30
                        while (
                            not driver.execute_script("return document.body.dataset.loaded")
                            and time.monotonic() < deadline
                        ):
                            time.sleep(0.005)
                        ts.append(time.perf_counter() - t0)
                    out[name][page] = statistics.median(ts)
    finally:
        driver.quit()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedapp-bench-board-"))
    try:
        loads = load_times(work)
        print(json.dumps(loads, indent=1), flush=True)
        writes = write_cost(args.rounds, work)
        writes.append(replay_cost(work, 10000, 20, 30))
        writes.append(replay_cost(work, 10000, 10000, 5))
        print(writes, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "command": "python bench/board.py " + " ".join(sys.argv[1:]),
        "cpus": os.cpu_count(),
        "write": writes,
        **loads,
        "max_write_share": max(w["write_share_of_round"] for w in writes),
        "max_api_s": max(v for d in loads["api_s"].values() for v in d.values()),
        "max_page_s": max(v for d in loads["page_s"].values() for v in d.values())
        if isinstance(loads["page_s"], dict)
        else None,
        "db_kib_per_round": {k: v["bytes"] / 1024 / v["rounds"] for k, v in loads["db"].items()},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "board.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "board.md").write_text(markdown(result))
    print((OUT / "board.md").read_text())


def markdown(r: dict) -> str:
    lines = [
        "# The event store and fedapp-board (bench/board.py)",
        "",
        f"`{r['command']}` on {r['cpus']} CPUs. Targets: store writes < 2% of a round; pages and API < 1 s.",
        "",
        "## Write cost per round (`EventStore.record` timed on each call the recorder makes)",
        "",
        "| run | clients | round time (s) | write per round (ms) | max (ms) | final write (ms) | share of round |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in r["write"]:
        lines.append(
            f"| {w['run']} | {w['clients']} | {w['mean_round_s']:.2f} | {w['write_s_per_round'] * 1000:.1f} | {w['write_s_max'] * 1000:.1f} | {w['write_s_final'] * 1000:.1f} | {w['write_share_of_round']:.2%} |"
        )
    lines += [
        "",
        "Round time of each row: "
        + "; ".join(f"{w['run']}: {w['round_time_from']}" for w in r["write"])
        + ".",
    ]
    lines += [
        "",
        "## Database size (synthetic runs written through the store)",
        "",
        "| run | rounds | size (MiB) | per round (KiB) |",
        "|---|---|---|---|",
    ]
    for k, v in r["db"].items():
        lines.append(
            f"| {k} | {v['rounds']} | {v['bytes'] / 2**20:.2f} | {r['db_kib_per_round'][k]:.1f} |"
        )
    lines += [
        "",
        "## API response time (in process, median of 5, first page)",
        "",
        "| run | endpoint | ms |",
        "|---|---|---|",
    ]
    for k, d in r["api_s"].items():
        for p, s in d.items():
            lines.append(f"| {k} | `{p}` | {s * 1000:.1f} |")
    lines += ["", "## Page load in headless Chromium (until the data is drawn, median of 3)", ""]
    if isinstance(r["page_s"], dict):
        lines += ["| run | page | ms |", "|---|---|---|"]
        for k, d in r["page_s"].items():
            for p, s in d.items():
                lines.append(f"| {k} | `{p}` | {s * 1000:.0f} |")
    else:
        lines.append(r["page_s"])
    lines += [
        "",
        f"Largest write share: {r['max_write_share']:.2%}; slowest API call: {r['max_api_s'] * 1000:.0f} ms; slowest page: "
        + (f"{r['max_page_s'] * 1000:.0f} ms." if r["max_page_s"] is not None else "not measured."),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
