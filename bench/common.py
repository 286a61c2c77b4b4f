"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def completed(path: Path, length: int, key: str = "round") -> dict | None:
    """results.json of a finished run of exactly `length` rounds (or epochs), else None."""
    if not path.exists():
        return None
    res = json.loads(path.read_text())
    steps = res.get("rounds") or res.get("epochs") or []
    done = (
        res.get("final") is not None
        and (res.get("meta") or {}).get("status", "completed") == "completed"
    )
    return res if done and steps and steps[-1][key] == length else None


def fmt_mean_sd(values: list[float | None], digits: int = 3) -> str:
    """'mean ± sd' over the non-missing values (sd only for two or more), '-' for none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    sd = f" ± {float(np.std(vals, ddof=1)):.{digits}f}" if len(vals) > 1 else ""
    return f"{float(np.mean(vals)):.{digits}f}{sd}"
