"""Where a round's wall time goes: `fedapp-run` (Flower simulation) vs the in-process engine vs
pure local training of the same clients.

Runs the default job (FEMNIST, FedAvg, 20 clients per round, 10 evaluated) for `--rounds`
rounds under each engine, then splits every round (rounds.csv / results.json) into

- train compute: the clients' own `train_time_s`, summed, divided by the parallel workers
  (Ray's pool: CPUs // simulation.client_num_cpus; the in-process engine: 1);
- evaluation compute: the evaluated clients' `eval_time_s`, likewise;
- server-side evaluation (`server_eval_s`) and aggregation (`aggregate_s`);
- the rest: Flower, Ray and our glue (messages, serialization, model construction, data
  loading, waiting on the slowest worker).

The overhead ratio is the issue's: median round wall time / (train compute + server-side
evaluation). Round 1 (actor start-up, first data loads) is reported apart and left out of
the medians. `local` times the same clients' training in this process with no Flower at all
(model construction and data preparation included), which checks that `train_time_s` under
Ray is what the training costs on its own.

    .venv/bin/python bench/overhead.py --rounds 8                     # this checkout
    .venv/bin/python bench/overhead.py --label before --checkout ../old  # another checkout's code

Writes bench/results/overhead.json (one entry per label and engine; earlier labels are kept)
and overhead.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The code under test: this checkout, or the one `--checkout` names (local timing runs in a
# child process with that checkout first on the path).
sys.path.insert(0, os.environ.get("FEDAPP_BENCH_CHECKOUT", str(ROOT)))

RESULTS = ROOT / "bench" / "results"
RUNS = RESULTS / "runs_overhead"


def run_engine(engine: str, overrides: list[str], out: Path, checkout: Path) -> float:
    """Run one engine's job from `checkout` (its code first on PYTHONPATH); wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    module = {"flower": "fedapp.cli.launch", "inline": "fedapp.cli.inline"}[engine]
    cmd = [sys.executable, "-m", module, *overrides, "--output-dir", str(out)]
    t0 = time.perf_counter()
    with (out.parent / f"{out.name}.log").open("w") as log:
        rc = subprocess.call(cmd, cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0 or not (out / "results.json").exists():
        raise SystemExit(f"{engine} run failed (exit {rc}); see {out.parent / out.name}.log")
    return time.perf_counter() - t0


def workers(engine: str, cfg) -> int:
    if engine != "flower":
        return 1
    slots = (os.cpu_count() or 1) // max(int(cfg.simulation.client_num_cpus), 1)
    return max(min(slots, int(cfg.clients_per_round)), 1)


def split_rounds(results: dict, n_workers: int, server_eval_fallback: float | None) -> list[dict]:
    rows = []
    for r in results["rounds"]:
        if r["round"] < 1:
            continue
        train = [c for c in r["clients"] if c["phase"] == "train" and c["status"] == "ok"]
        evals = [c for c in r["clients"] if c["phase"] == "evaluate" and c["status"] == "ok"]
        train_s = sum(float(c.get("train_time_s") or 0.0) for c in train)
        eval_times = [c.get("eval_time_s") for c in evals]
        eval_s = (
            sum(float(t) for t in eval_times) if all(t is not None for t in eval_times) else None
        )
        server_eval = r.get("server_eval_s", server_eval_fallback)
        compute = train_s / n_workers + (server_eval or 0.0)
        accounted = compute + (eval_s or 0.0) / n_workers + float(r.get("aggregate_s") or 0.0)
        rows.append(
            {
                "round": r["round"],
                "wall_s": r["wall_s"],
                "train_compute_s": train_s / n_workers,
                "eval_compute_s": None if eval_s is None else eval_s / n_workers,
                "server_eval_s": server_eval,
                "aggregate_s": r.get("aggregate_s"),
                "rest_s": r["wall_s"] - accounted,
                "overhead_ratio": r["wall_s"] / compute if compute else None,
            }
        )
    return rows


def local_compute(overrides: list[str], flower_results: dict) -> dict:
    """The rounds' training clients trained here, one after another, with no Flower: the
    training loop alone and with model construction and data preparation; plus one server
    evaluation of the test set."""
    import torch

    from fedapp.core.config import compose, resolve_data_dir
    from tasks import get_task
    from tasks.training import TrainSettings

    cfg = compose(overrides)
    torch.set_num_threads(max(int(cfg.simulation.client_num_cpus), 1))
    task = get_task(cfg, resolve_data_dir(cfg))
    # What the ServerApp sends each round, read by the parser clients use (in every checkout)
    work = {key.replace("_", "-"): value for key, value in cfg.train.items()}
    settings = TrainSettings.from_config({**work, "seed": int(cfg.seed)})
    test = task.central_test_split(0.0, int(cfg.seed))[1]
    model = task.make_model()
    server_eval = {}
    # The ServerApp evaluates with torch's default threads under fedapp-run (its own process)
    # and with the ClientApp's one thread in the in-process engine (set by the first client).
    for threads in (os.cpu_count() or 1, max(int(cfg.simulation.client_num_cpus), 1)):
        torch.set_num_threads(threads)
        task.evaluate(model, test)  # warm-up
        t0 = time.perf_counter()
        task.evaluate(model, test)
        server_eval[threads] = time.perf_counter() - t0
    torch.set_num_threads(max(int(cfg.simulation.client_num_cpus), 1))
    rounds = []
    for r in flower_results["rounds"]:
        if r["round"] < 1:
            continue
        loop, total = 0.0, 0.0
        for c in r["clients"]:
            if c["phase"] != "train" or c["status"] != "ok":
                continue
            t0 = time.perf_counter()
            data = task.load_partition(int(c["partition_id"]))
            m = task.make_model()
            loop += task.train(m, data, settings)["train_time_s"]
            total += time.perf_counter() - t0
        rounds.append({"round": r["round"], "train_loop_s": loop, "with_setup_s": total})
    many, one = (
        server_eval[os.cpu_count() or 1],
        server_eval[max(int(cfg.simulation.client_num_cpus), 1)],
    )
    return {"server_eval_s": one, "server_eval_all_threads_s": many, "rounds": rounds}


def local_in_checkout(overrides: list[str], flower_results: dict, checkout: Path) -> dict:
    """`local_compute` in a child process that imports `checkout`'s code."""
    RUNS.mkdir(parents=True, exist_ok=True)
    src, dst = RUNS / "local-in.json", RUNS / "local-out.json"
    src.write_text(json.dumps(flower_results))
    env = {**os.environ, "FEDAPP_BENCH_CHECKOUT": str(checkout)}
    cmd = [sys.executable, __file__, "--local-from", str(src), "--local-to", str(dst), *overrides]
    subprocess.run(cmd, cwd=checkout, env=env, check=True)
    out = json.loads(dst.read_text())
    src.unlink()
    dst.unlink()
    return out


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(rows: list[dict]) -> dict:
    later = [r for r in rows if r["round"] > 1]
    keys = ("wall_s", "train_compute_s", "eval_compute_s", "server_eval_s", "aggregate_s", "rest_s")
    out = {f"median_{k}": median(r[k] for r in later) for k in keys}
    out["overhead_ratio"] = median(r["overhead_ratio"] for r in later)
    out["first_round_wall_s"] = rows[0]["wall_s"] if rows else None
    return out


def fmt(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [
        "# Round time: Flower simulation vs in-process engine vs local training",
        "",
        f"Default job: `{' '.join(report['overrides'])}`, {report['cpus']} CPUs. Medians over rounds 2..R "
        "(seconds per round). Ratio = wall / (train compute + server evaluation), the issue's "
        "definition; compute is divided by the parallel workers.",
        "",
        "| label | engine | workers | wall | train compute | eval compute | server eval | aggregate | rest | ratio | round 1 wall | run wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, engines in report["labels"].items():
        for engine, e in engines.items():
            if engine == "local":
                continue
            s = e["summary"]
            lines.append(
                f"| {label} | {engine} | {e['workers']} | {fmt(s['median_wall_s'])} | {fmt(s['median_train_compute_s'])} | "
                f"{fmt(s['median_eval_compute_s'])} | {fmt(s['median_server_eval_s'])} | {fmt(s['median_aggregate_s'], 3)} | "
                f"{fmt(s['median_rest_s'])} | {fmt(s['overhead_ratio'])}x | {fmt(s['first_round_wall_s'])} | {fmt(e['run_wall_s'], 0)} |"
            )
    for label, engines in report["labels"].items():
        if "local" in engines:
            loc = engines["local"]
            loops = median(r["train_loop_s"] for r in loc["rounds"] if r["round"] > 1)
            setup = median(r["with_setup_s"] for r in loc["rounds"] if r["round"] > 1)
            lines += [
                "",
                f"Local ({label}): the same clients trained one after another in one process: "
                f"training loop {fmt(loops)} s per round, {fmt(setup)} s with model construction and data "
                f"preparation; one server evaluation {fmt(loc['server_eval_s'])} s.",
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--label", default="current")
    p.add_argument("--checkout", type=Path, default=ROOT, help="the code to run (another worktree)")
    p.add_argument("--engines", default="flower,inline,local", help="comma-separated")
    p.add_argument("--summarize-only", action="store_true", help="recompute from the run folders")
    p.add_argument("--local-from", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--local-to", type=Path, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for the job")
    args = p.parse_args(argv)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.local_from:  # the child of `local_in_checkout`
        result = local_compute(args.overrides, json.loads(args.local_from.read_text()))
        args.local_to.write_text(json.dumps(result))
        return 0
    from fedapp.core.config import compose

    overrides = [f"rounds={args.rounds}", "seed=0", *args.overrides]
    cfg = compose(overrides)
    path = RESULTS / "overhead.json"
    report = json.loads(path.read_text()) if path.exists() else {"labels": {}}
    if args.summarize_only:
        for label in report["labels"]:
            summarize_label(report, label)
        path.write_text(json.dumps(report, indent=2))
        (RESULTS / "overhead.md").write_text(markdown(report))
        return 0
    report.update(
        overrides=overrides,
        cpus=os.cpu_count(),
        command="python bench/overhead.py " + " ".join(argv or sys.argv[1:]),
    )
    entry: dict = {}
    local = None
    flower_results = None
    for engine in [e for e in args.engines if e != "local"]:
        out = RUNS / f"{args.label}-{engine}"
        if out.exists():
            import shutil

            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"[overhead] {args.label}: {engine} ({args.rounds} rounds) ...", flush=True)
        wall = run_engine(engine, overrides, out, args.checkout.resolve())
        results = json.loads((out / "results.json").read_text())
        if results["meta"].get("status") != "completed":
            raise SystemExit(
                f"{engine} run did not complete: {results['meta'].get('status_detail')}"
            )
        if engine == "flower":
            flower_results = results
        entry[engine] = {
            "workers": workers(engine, cfg),
            "run_wall_s": wall,
            "results": str(out.relative_to(ROOT)),
        }
        entry[engine]["_results"] = results
    if "local" in args.engines:
        source = flower_results or next(iter(entry.values()))["_results"]
        print(f"[overhead] {args.label}: local training of the same clients ...", flush=True)
        local = local_in_checkout(overrides, source, args.checkout.resolve())
        entry["local"] = local
    report["labels"][args.label] = entry
    summarize_label(report, args.label)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    (RESULTS / "overhead.md").write_text(markdown(report))
    print(f"[overhead] wrote {path} and overhead.md", flush=True)
    return 0


def summarize_label(report: dict, label: str) -> None:
    """Split each engine's rounds (read from its run folder) and print the summary. Code
    without `server_eval_s` in its rounds (older checkouts) gets the local measurement with
    the thread count its ServerApp had."""
    entry = report["labels"][label]
    local = entry.get("local")
    for engine, e in entry.items():
        if engine == "local":
            continue
        results = json.loads((ROOT / e["results"] / "results.json").read_text())
        fallback = None
        if local:
            key = "server_eval_all_threads_s" if engine == "flower" else "server_eval_s"
            fallback = local.get(key, local["server_eval_s"])
        e.pop("_results", None)
        e["rounds"] = split_rounds(results, e["workers"], fallback)
        e["summary"] = summarize(e["rounds"])
        s = e["summary"]
        print(
            f"[overhead] {label} {engine}: median round {fmt(s['median_wall_s'])} s, train compute "
            f"{fmt(s['median_train_compute_s'])} s, server eval {fmt(s['median_server_eval_s'])} s, "
            f"rest {fmt(s['median_rest_s'])} s -> ratio {fmt(s['overhead_ratio'])}x",
            flush=True,
        )


if __name__ == "__main__":
    raise SystemExit(main())
