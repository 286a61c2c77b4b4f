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


def _run_without_flower(tmp_path, script: str, args: list[str]) -> None:
    shadow = tmp_path / "missing"
    for name in MISSING:
        (shadow / name).mkdir(parents=True, exist_ok=True)
        (shadow / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed')\n"
        )
    env = {**os.environ, "PYTHONPATH": str(shadow)}
    proc = subprocess.run(
        [sys.executable, script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_throughput_bench_runs_without_flower(tmp_path):
    args = ["--models", "cnn_small", "--batches", "4", "--rows", "64", "--examples", "24"]
    args += ["--repeats", "1", "--clients", "3", "--device", "cpu", "--out", str(tmp_path)]
    _run_without_flower(tmp_path, "bench/throughput.py", args)
    res = json.loads((tmp_path / "throughput.json").read_text())
    (row,) = res["training"]
    assert row["plain"]["examples_per_s"] > 0 and row["plain"]["steps"] == 6
    assert row["dp"]["examples_per_s"] > 0  # Opacus is installed here; only Flower is blocked
    (agg,) = res["aggregation"]
    assert agg["parameters"] > 1_000_000 and agg["weighted_mean_s"] > 0
    assert "Flower is not installed" in res["per_strategy"]["skipped"]
    assert "| cnn_small | 4 | fast |" in (tmp_path / "throughput.md").read_text()


def test_precision_bench_speed_runs_without_flower(tmp_path):
    args = ["--speed-only", "--models", "cnn_small", "--batches", "4", "--rows", "64"]
    args += ["--examples", "20", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path)]
    _run_without_flower(tmp_path, "bench/precision.py", args)
    res = json.loads((tmp_path / "precision.json").read_text())
    assert [r["precision"] for r in res["speed"]] == ["fp32", "bf16", "fp16"]
    assert all(r["plain"]["examples_per_s"] > 0 and r["plain"]["steps"] == 5 for r in res["speed"])
    assert "dp" in res["speed"][1] and "dp" not in res["speed"][2]  # fp16 is refused under DP
    assert "effect" not in res
    assert "| cnn_small | 4 | bf16 |" in (tmp_path / "precision.md").read_text()
