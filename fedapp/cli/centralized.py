"""Centralized baseline: `fedapp-centralized [overrides...]`.

Trains the task's model on the union of all clients' training data and evaluates it on the
same held-out test rows the federated runs use (without `server_val_fraction`'s rows). This is
the upper bound that every federated number is compared to; it writes results.json with the
same `config`/`final` layout.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedapp.checks import compose
from fedapp.core.config import resolve_data_dir, resolve_output_dir, to_dict
from fedapp.recorder import write_json_atomic
from tasks import ClientData, get_task
from tasks.training import TrainSettings


def train_centralized(
    overrides: str | Sequence[str] | None = None, output_dir: Path | str | None = None
) -> dict[str, Any]:
    cfg = compose(overrides)
    task = get_task(cfg, resolve_data_dir(cfg))
    out = resolve_output_dir(cfg, {"output-dir": str(output_dir) if output_dir else ""})
    torch.manual_seed(int(cfg.seed))
    model = task.make_model()
    train = task.load_centralized_train()
    # The federated runs' test rows: with server_val_fraction > 0 they report on the central
    # test set minus the operator's validation rows, and so does this baseline (it never
    # reads the validation rows).
    _, test = task.central_test_split(float(cfg.get("server_val_fraction") or 0.0), int(cfg.seed))
    pooled = ClientData(train=train, val=train, label_counts=np.zeros(0))
    # Centralized: the "federated" statistics are simply those of the pooled training rows.
    prep = task.aggregate_stats([task.client_stats(pooled)]) if task.needs_stats else {}
    c = cfg.centralized
    epochs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    test_metrics = _scalars(task.evaluate(model, test, prep))
    epochs.append({"epoch": 0, **{f"test_{k}": v for k, v in test_metrics.items()}, "wall_s": 0.0})
    # The clients' momentum, weight decay and precision; one epoch per step of this loop.
    local = TrainSettings.from_train_config(cfg.train, int(cfg.seed))
    for epoch in range(1, int(c.epochs) + 1):
        t = time.perf_counter()
        settings = replace(
            local,
            local_epochs=1,
            max_steps=0,
            batch_size=int(c.batch_size),
            lr=float(c.lr),
            seed=int(cfg.seed) * 1_000_003 + epoch,
        )
        fit = task.train(model, pooled, settings, prep)
        test_metrics = _scalars(task.evaluate(model, test, prep))
        row = {
            "epoch": epoch,
            "train_loss": fit["train_loss"],
            **{f"test_{k}": v for k, v in test_metrics.items()},
            "wall_s": time.perf_counter() - t,
        }
        epochs.append(row)
        print(
            f"[centralized] epoch {epoch}/{c.epochs}  test_acc={row['test_accuracy']:.4f}  "
            f"test_loss={row['test_loss']:.4f}  {row['wall_s']:.1f}s",
            flush=True,
        )
    best = max(epochs[1:], key=lambda r: r["test_accuracy"]) if len(epochs) > 1 else epochs[0]
    results = {
        "schema_version": 1,
        "meta": {
            "kind": "centralized",
            "train_examples": len(train),
            "test_examples": len(test),
            "majority_accuracy": task.majority_accuracy(prep),
        },
        "config": to_dict(cfg),
        "epochs": epochs,
        "final": {
            **epochs[-1],
            "best_epoch": best["epoch"],
            "best_test_accuracy": best["test_accuracy"],
            "total_wall_s": time.perf_counter() - t0,
        },
    }
    write_json_atomic(out / "results.json", results)
    print(f"[centralized] results in {out}", flush=True)
    return results


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "confusion"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedapp-centralized", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. centralized.epochs=5")
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)
    train_centralized(args.overrides, args.output_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
