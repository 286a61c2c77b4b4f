"""Local-training throughput and aggregation time, without Flower (runs on a bare GPU machine).

Times fedapp's own training loop (`tasks.training.train_classifier`, plain and with the DP-SGD
hook of `tasks.dp_sgd`) on FEMNIST-shaped rows (1x28x28, 62 classes) for the two FEMNIST models
(cnn_small 1.2M and LEAF's CNN 6.6M parameters) at several batch sizes, and the server's
aggregation kernels for the same models. It imports only torch, numpy, (optionally) Opacus and
our `tasks.training`, `tasks.dp_sgd`, `tasks.models`, `strategies.aggregation`; where Flower is
installed it also times every strategy's `aggregate_train` through `bench/aggregation_speed.py`.

    .venv/bin/python bench/throughput.py                   # this machine's default device
    python bench/throughput.py --device cuda --rows 20000  # a GPU machine (no Flower needed)

Writes bench/results/throughput[_<device>].json and .md. Rows are random (throughput does not
depend on their content). `--loader dataloader` also times the same loop fed by a row-by-row
DataLoader, the path every table and image task took before the tensor-batch fast path.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from strategies.aggregation import weighted_aggregate  # noqa: E402
from tasks.models import MODELS  # noqa: E402
from tasks.training import TrainSettings, resolve_device, train_classifier  # noqa: E402

# The reference points: LEAF CNN (6.6M) on one H100, examples/s by batch size, and
# Opacus' slowdown at batch 10.
H100_ANCHORS = {"leaf_cnn": {10: 5_500, 32: 17_500, 128: 63_000}, "opacus_slowdown_b10": 3.8}


class RowByRow(Dataset):
    """The rows of a TensorDataset behind a plain Dataset: training then collates batches
    with a DataLoader row by row (the path before `tasks.training.TensorBatches`)."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def femnist_rows(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 62, (n,), generator=g)
    )


def dp_hook(seed: int):
    """fedapp's DP-SGD hook (noise 1.0, clip 1.0), or None where Opacus is missing."""
    try:
        import opacus  # noqa: F401 (the hook imports it in `wrap`)

        from tasks.dp_sgd import DPSGDHook
    except ImportError:
        return None
    return DPSGDHook(noise_multiplier=1.0, max_grad_norm=1.0, seed=seed)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(
    model_name, batch, steps, data, device, dp: bool, repeats: int, precision: str = "fp32"
) -> dict:
    """examples/s of `steps` local steps (median of `repeats`, after one warm-up call)."""
    rates, seconds = [], []
    for rep in range(repeats + 1):
        torch.manual_seed(rep)
        model = MODELS[model_name](62)
        hooks = []
        if dp:
            hook = dp_hook(rep)
            if hook is None:
                return {"skipped": "Opacus is not installed"}
            hooks = [hook]
        work = TrainSettings(
            local_epochs=1000,
            max_steps=steps,
            batch_size=batch,
            lr=0.01,
            seed=rep,
            precision=precision,
        )
        sync(device)
        t0 = time.perf_counter()
        out = train_classifier(model, data, work, device=device, hooks=hooks)
        sync(device)
        wall = time.perf_counter() - t0
        if rep == 0:
            continue  # warm-up: allocator, cuDNN autotuning, Opacus' hooks
        rates.append(out["train_samples_seen"] / wall)
        seconds.append(wall)
    return {
        "examples_per_s": float(np.median(rates)),
        "examples_per_s_all": rates,
        "seconds_all": seconds,
        "steps": steps,
    }


def time_aggregation(model_name: str, clients: int, repeats: int) -> dict:
    """Seconds of the weighted mean every averaging strategy computes (FedAvg, FedProx, trust,
    contribution: `weighted_aggregate`) and of the coordinate-wise median and trimmed mean
    (FedMedian, FedTrimmedAvg, Bulyan's last step) over `clients` replies."""
    rng = np.random.default_rng(0)
    glob = [p.detach().numpy() for p in MODELS[model_name](62).state_dict().values()]
    replies = [
        [a + 0.01 * rng.standard_normal(a.shape).astype(a.dtype) for a in glob]
        for _ in range(clients)
    ]
    weights = np.full(clients, 1.0 / clients)
    clip = np.ones(clients)

    def timed(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    def stacked(op):
        return [op(np.stack([r[i] for r in replies])) for i in range(len(glob))]

    k = max(int(0.2 * clients), 1)
    return {
        "parameters": int(sum(a.size for a in glob)),
        "clients": clients,
        "weighted_mean_s": timed(lambda: weighted_aggregate(glob, replies, weights, clip)),
        "coordinate_median_s": timed(lambda: stacked(lambda s: np.median(s, axis=0))),
        "trimmed_mean_s": timed(
            lambda: stacked(lambda s: np.sort(s, axis=0)[k : clients - k].mean(axis=0))
        ),
    }


def per_strategy(models: list[str], clients: int, repeats: int) -> dict:
    """Every strategy's `aggregate_train` (reply screening included), where Flower is present."""
    try:
        from bench.aggregation_speed import DEFAULT_STRATEGIES, time_strategy
    except ImportError as err:
        return {"skipped": f"Flower is not installed here ({err}); run on a machine with the venv"}
    out = {}
    for model in models:
        out[model] = {}
        for name in DEFAULT_STRATEGIES:
            t = time_strategy(name, clients, model, repeats)
            out[model][name] = float(np.median(t))
            print(
                f"  aggregate_train {name:14s} {model:9s} {clients} clients: {np.median(t):.3f} s",
                flush=True,
            )
    return out


def markdown(res: dict) -> str:
    lines = [
        f"# Throughput on {res['device_name']} ({res['device']}, {res['threads']} CPU threads)",
        "",
        f"Command: `{res['command']}`",
        "",
        "## Local training, examples/s (median of repeats)",
        "",
        "| model | batch | loader | plain | DP-SGD | DP slowdown | H100 anchor (plain) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in res["training"]:
        plain, dp = row["plain"].get("examples_per_s"), row.get("dp", {}).get("examples_per_s")
        anchor = H100_ANCHORS.get(row["model"], {}).get(row["batch"], "")
        lines.append(
            f"| {row['model']} | {row['batch']} | {row['loader']} | "
            f"{plain:,.0f} | {f'{dp:,.0f}' if dp else row.get('dp', {}).get('skipped', '-')} | "
            f"{f'{plain / dp:.1f}x' if dp else '-'} | {anchor} |"
        )
    lines += ["", "## Aggregation kernels (seconds, one round)", ""]
    lines += [
        "| model | parameters | clients | weighted mean | coord. median | trimmed mean |",
        "|---|---|---|---|---|---|",
    ]
    for row in res["aggregation"]:
        lines.append(
            f"| {row['model']} | {row['parameters']:,} | {row['clients']} | {row['weighted_mean_s']:.3f} | "
            f"{row['coordinate_median_s']:.3f} | {row['trimmed_mean_s']:.3f} |"
        )
    strat = res["per_strategy"]
    if "skipped" in strat:
        lines += ["", f"Per-strategy `aggregate_train`: skipped ({strat['skipped']})."]
    else:
        names = list(next(iter(strat.values())))
        lines += ["", f"## Per-strategy `aggregate_train` (seconds, {res['clients']} clients)", ""]
        if res.get("per_strategy_command"):
            lines += [f"Re-timed with `{res['per_strategy_command']}`.", ""]
        lines += ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for model, row in strat.items():
            lines.append(f"| {model} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<index>")
    p.add_argument("--models", nargs="+", default=["cnn_small", "leaf_cnn"], choices=sorted(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[10, 32, 128])
    p.add_argument("--rows", type=int, default=4000, help="training rows (random)")
    p.add_argument(
        "--examples", type=int, default=2560, help="examples per timed call (CPU); x10 on a GPU"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a ClientApp gets 1)")
    p.add_argument("--no-dp", action="store_true")
    p.add_argument("--loader", choices=["fast", "dataloader", "both"], default="fast")
    p.add_argument("--clients", type=int, default=20, help="replies per aggregation")
    p.add_argument("--no-per-strategy", action="store_true", help="skip the Flower strategies")
    p.add_argument(
        "--per-strategy-only",
        action="store_true",
        help="re-time only the Flower strategies, into the existing report",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    stem = "throughput" if device.type == "cpu" else f"throughput_{device.type}"
    if args.per_strategy_only:
        res = json.loads((args.out / f"{stem}.json").read_text())
        res["per_strategy"] = per_strategy(args.models, args.clients, args.repeats)
        res["per_strategy_command"] = "python bench/throughput.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2))
        (args.out / f"{stem}.md").write_text(markdown(res))
        return 0
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    data = femnist_rows(args.rows)
    examples = args.examples * (10 if device.type == "cuda" else 1)
    loaders = ["fast", "dataloader"] if args.loader == "both" else [args.loader]
    training = []
    for model in args.models:
        for batch in args.batches:
            for loader in loaders:
                rows = data if loader == "fast" else RowByRow(data)
                steps = max(examples // batch, 5)
                row = {"model": model, "batch": batch, "loader": loader}
                row["plain"] = time_training(model, batch, steps, rows, device, False, args.repeats)
                if not args.no_dp and loader == "fast":
                    row["dp"] = time_training(model, batch, steps, data, device, True, args.repeats)
                dp = row.get("dp", {}).get("examples_per_s")
                print(
                    f"{model:9s} batch {batch:4d} {loader:10s}: {row['plain']['examples_per_s']:9,.0f} ex/s"
                    + (
                        f", DP-SGD {dp:9,.0f} ex/s ({row['plain']['examples_per_s'] / dp:.1f}x slower)"
                        if dp
                        else ""
                    ),
                    flush=True,
                )
                training.append(row)
    aggregation = []
    for model in args.models:
        row = {"model": model, **time_aggregation(model, args.clients, args.repeats)}
        print(
            f"aggregation {model:9s} {args.clients} clients: weighted mean {row['weighted_mean_s']:.3f} s, "
            f"median {row['coordinate_median_s']:.3f} s, trimmed mean {row['trimmed_mean_s']:.3f} s",
            flush=True,
        )
        aggregation.append(row)
    strategies = (
        {"skipped": "--no-per-strategy"}
        if args.no_per_strategy
        else per_strategy(args.models, args.clients, args.repeats)
    )
    res = {
        "command": "python bench/throughput.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "threads": args.threads,
        "rows": args.rows,
        "clients": args.clients,
        "h100_anchors": H100_ANCHORS,
        "training": training,
        "aggregation": aggregation,
        "per_strategy": strategies,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(res))
    print(f"wrote {args.out / stem}.json and .md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
