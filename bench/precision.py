"""Mixed precision of local training (`train.precision`): its speed, and what it does to results.

Speed (imports only torch, numpy and our training code, so it runs on a GPU machine without
Flower): examples/s of fedapp's training loop (`tasks.training.train_classifier`) on
FEMNIST-shaped rows for the FEMNIST models, per precision and batch size, plain and (bf16)
under DP-SGD.

Effect on results (needs the project's own environment): the same federated job per precision
with the in-process engine, same seeds and client sampling: the final test metrics, their
paired difference to fp32, and the largest per-round gap along the way. Each run is a
single-threaded CPU subprocess (`bench.common.run_inline_job`).

    .venv/bin/python bench/precision.py                                 # CPU: speed and effect
    .venv/bin/python bench/precision.py --effect-only --tasks femnist --rounds 10 --seeds 0
    .venv/bin/python bench/precision.py --effect-only --summarize-only --tasks credit femnist \
        --rounds 10 --seeds 0 1 2            # the report over every finished run
    python bench/precision.py --device cuda --speed-only --examples 5120   # a GPU machine

Writes bench/results/precision[_<device>].json and .md; runs stay under
bench/results/runs_precision/ (not committed).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import femnist_rows, time_training  # noqa: E402
from tasks.models import MODELS  # noqa: E402
from tasks.training import PRECISIONS, resolve_device  # noqa: E402

METRIC = {"femnist": "test_accuracy"}  # other (binary, table) tasks: test_roc_auc


def speed(args, device: torch.device) -> list[dict]:
    data = femnist_rows(args.rows)
    rows = []
    for model in args.models:
        for batch in args.batches:
            steps = max(args.examples // batch, 5)
            for precision in args.precisions:
                row = {"model": model, "batch": batch, "precision": precision}
                row["plain"] = time_training(
                    model, batch, steps, data, device, False, args.repeats, precision
                )
                if not args.no_dp and precision != "fp16":  # fp16 is refused under DP-SGD
                    row["dp"] = time_training(
                        model, batch, steps, data, device, True, args.repeats, precision
                    )
                dp = row.get("dp", {}).get("examples_per_s")
                print(
                    f"{model:9s} batch {batch:4d} {precision}: "
                    f"{row['plain']['examples_per_s']:9,.0f} ex/s"
                    + (f", DP-SGD {dp:9,.0f} ex/s" if dp else ""),
                    flush=True,
                )
                rows.append(row)
    return rows


def effect(args) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    from bench.common import completed, run_inline_job

    runs = args.out / "runs_precision"
    todo, cells = [], []
    for task in args.tasks:
        for seed in args.seeds:
            for precision in args.precisions:
                name = f"{task}-{precision}-s{seed}"
                ovr = [
                    f"task={task}",
                    f"seed={seed}",
                    f"rounds={args.rounds}",
                    f"train.precision={precision}",
                    "device=cpu",
                ]
                cells.append((task, seed, precision, runs / name))
                if not completed(runs / name / "results.json", args.rounds):
                    todo.append((ovr, runs / name))

    if args.summarize_only:
        todo = []  # tabulate what finished; missing cells are left out (the seeds column says)

    def work(item):
        ovr, out = item
        out.mkdir(parents=True, exist_ok=True)
        ok = run_inline_job(ovr, out, out / "inline.log", ROOT)
        print(f"[bench] {out.name}: {'ok' if ok else 'FAILED (see inline.log)'}", flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(work, todo))

    found: dict[tuple, dict] = {}
    for task, seed, precision, path in cells:
        res = completed(path / "results.json", args.rounds)
        if res is None:
            print(f"[bench] {path.name}: no completed run, left out", flush=True)
            continue
        metric = METRIC.get(task, "test_roc_auc")
        curve = [r[metric] for r in res["rounds"] if r["round"] > 0]
        train_s = [
            float(np.sum([c.get("train_time_s", 0.0) for c in r.get("clients", [])]))
            for r in res["rounds"]
            if r["round"] > 0
        ]
        skipped = [
            c.get("train_skipped_steps", 0.0)
            for r in res["rounds"]
            for c in r.get("clients", [])
            if c.get("phase") == "train"
        ]
        found[(task, seed, precision)] = {
            "metric": metric,
            "final": res["final"][metric],
            "curve": curve,
            "train_s_per_round": float(np.median(train_s)),
            "skipped_steps": float(np.sum(skipped)),
        }
    out = []
    for task in args.tasks:
        for precision in args.precisions:
            seeds = [s for s in args.seeds if (task, s, precision) in found]
            if not seeds:
                continue
            cell = [found[(task, s, precision)] for s in seeds]
            paired = [s for s in seeds if (task, s, "fp32") in found]
            ref = [found[(task, s, "fp32")] for s in paired]
            mine = [found[(task, s, precision)] for s in paired]
            out.append(
                {
                    "task": task,
                    "precision": precision,
                    "metric": cell[0]["metric"],
                    "seeds": seeds,
                    "final": [c["final"] for c in cell],
                    "final_minus_fp32": [
                        m["final"] - r["final"] for m, r in zip(mine, ref, strict=True)
                    ],
                    "max_round_gap_to_fp32": [
                        float(np.max(np.abs(np.subtract(m["curve"], r["curve"]))))
                        for m, r in zip(mine, ref, strict=True)
                    ],
                    "train_s_per_round": [c["train_s_per_round"] for c in cell],
                    "skipped_steps": [c["skipped_steps"] for c in cell],
                }
            )
    return out


def _ms(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    sd = f" ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else ""
    return f"{np.mean(values):.{digits}f}{sd}"


def markdown(res: dict) -> str:
    lines = ["# Mixed precision of local training (`train.precision`)", ""]
    if res.get("speed"):
        lines += [
            f"## Speed on {res['device_name']} ({res['device']}, {res['threads']} CPU threads), "
            "examples/s (median of repeats)",
            "",
            f"Command: `{res.get('speed_command') or res['command']}`",
            "",
            "| model | batch | precision | plain | vs fp32 | DP-SGD | vs fp32 |",
            "|---|---|---|---|---|---|---|",
        ]
        base = {(r["model"], r["batch"]): r for r in res["speed"] if r["precision"] == "fp32"}
        for r in res["speed"]:
            ref = base.get((r["model"], r["batch"]))
            plain = r["plain"]["examples_per_s"]
            ratio = plain / ref["plain"]["examples_per_s"] if ref else None
            dp = r.get("dp", {}).get("examples_per_s")
            ref_dp = ref.get("dp", {}).get("examples_per_s") if ref else None
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['precision']} | {plain:,.0f} | "
                f"{f'{ratio:.2f}x' if ratio else '-'} | "
                f"{f'{dp:,.0f}' if dp else '-'} | {f'{dp / ref_dp:.2f}x' if dp and ref_dp else '-'} |"
            )
        lines.append("")
    if res.get("effect"):
        lines += [
            f"## Effect on results: {res.get('effect_rounds')} rounds, in-process engine, CPU, one thread",
            "",
            f"Command: `{res.get('effect_command') or res['command']}`",
            "",
            "Final test metric (mean ± sd over seeds), its paired difference to fp32, the largest "
            "gap to fp32 at any round, the clients' summed training seconds per round (median), "
            "and fp16 steps skipped for overflowing gradients (all clients, all rounds).",
            "",
            "| task | metric | precision | final | − fp32 (paired) | max round gap | train s / round | skipped steps | seeds |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["effect"]:
            lines.append(
                f"| {r['task']} | {r['metric']} | {r['precision']} | {_ms(r['final'])} | "
                f"{_ms(r['final_minus_fp32']) if r['precision'] != 'fp32' else '-'} | "
                f"{_ms(r['max_round_gap_to_fp32']) if r['precision'] != 'fp32' else '-'} | "
                f"{_ms(r['train_s_per_round'], 2)} | {sum(r['skipped_steps']):.0f} | "
                f"{','.join(map(str, r['seeds']))} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="speed: auto, cpu, cuda or cuda:<index>")
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--models", nargs="+", default=["cnn_small", "leaf_cnn"], choices=sorted(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[10, 32, 128])
    p.add_argument("--rows", type=int, default=2000, help="speed: training rows (random)")
    p.add_argument("--examples", type=int, default=640, help="speed: examples per timed call")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a ClientApp gets 1)")
    p.add_argument("--no-dp", action="store_true")
    p.add_argument("--speed-only", action="store_true", help="no federated runs (no Flower needed)")
    p.add_argument("--effect-only", action="store_true", help="no speed measurement")
    p.add_argument("--tasks", nargs="+", default=["credit"], help="effect: tasks to run")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="effect: runs at once")
    p.add_argument(
        "--summarize-only", action="store_true", help="effect: start no run, tabulate finished ones"
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if "fp32" not in args.precisions:
        args.precisions = ["fp32", *args.precisions]  # the reference every row is compared to
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    res: dict = {
        "command": "python bench/precision.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": args.threads,
    }
    stem = "precision" if device.type == "cpu" else f"precision_{device.type}"
    old = args.out / f"{stem}.json"
    if (args.speed_only or args.effect_only) and old.exists():
        # a partial invocation keeps the other part of the existing report
        kept = json.loads(old.read_text())
        part = "effect" if args.speed_only else "speed"
        if part in kept:
            for key in (part, f"{part}_command", f"{part}_rounds"):
                if key in kept:
                    res[key] = kept[key]
    if not args.effect_only:
        res["speed"] = speed(args, device)
        res["speed_command"] = res["command"]
    if not args.speed_only:
        res["effect"] = effect(args)
        res["effect_command"], res["effect_rounds"] = res["command"], args.rounds
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(res))
    print(markdown(res), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
