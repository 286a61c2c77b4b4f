"""bench/throughput.py runs where only PyTorch is installed (the GPU machine has no Flower)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Every library a bare PyTorch machine lacks is shadowed by a package whose import fails.
MISSING = ("flwr", "ray", "hydra", "omegaconf", "sklearn", "datasets", "flwr_datasets", "pandas")


def test_throughput_bench_runs_without_flower(tmp_path):
    args = ["--models", "cnn_small", "--batches", "4", "--rows", "64", "--examples", "24"]
    args += ["--repeats", "1", "--clients", "3", "--device", "cpu", "--out", str(tmp_path)]
    shadow = tmp_path / "missing"
    for name in MISSING:
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed')\n"
        )
    env = {**os.environ, "PYTHONPATH": str(shadow)}
    proc = subprocess.run(
        [sys.executable, "bench/throughput.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "throughput.json").read_text())
    (row,) = res["training"]
    assert row["plain"]["examples_per_s"] > 0 and row["plain"]["steps"] == 6
    assert row["dp"]["examples_per_s"] > 0  # Opacus is installed here; only Flower is blocked
    (agg,) = res["aggregation"]
    assert agg["parameters"] > 1_000_000 and agg["weighted_mean_s"] > 0
    assert "Flower is not installed" in res["per_strategy"]["skipped"]
    assert "| cnn_small | 4 | fast |" in (tmp_path / "throughput.md").read_text()
