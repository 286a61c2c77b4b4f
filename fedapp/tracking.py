"""Experiment trackers for users who already have one: `tracking=tensorboard` writes
per-round metrics, the run's parameters and the final model's digest as TensorBoard events
(`tensorboard --logdir <run folder>/tensorboard`). An optional extra
(`pip install -e ".[tensorboard]"`); the base install needs none of it.

A tracker that fails while the run goes on is a warning, never a failed run; a tracker that
is asked for but not installed is a setup error naming what to install.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from fedapp.config import ConfigError

LOG = logging.getLogger("fedapp.tracking")
TRACKERS = ("none", "tensorboard")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in row.items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, int | float) and math.isfinite(float(v)) and k != "round":
            out[k] = float(v)
    return out


class TensorBoardTracker:
    def __init__(self, spec: dict[str, Any], out_dir: Path, config: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError(
                "tracking=tensorboard needs the tensorboard package: "
                'pip install -e ".[tensorboard]" (or tracking=none)'
            ) from err
        self.log_dir = Path(spec.get("log_dir") or Path(out_dir) / "tensorboard")
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        params = _flat(config)
        table = "\n".join(
            f"| {k} | {json.dumps(v, default=str)} |" for k, v in sorted(params.items())
        )
        self.writer.add_text("params", "| key | value |\n|---|---|\n" + table, 0)

    def round(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        for k, v in _scalars(row).items():
            self.writer.add_scalar(f"round/{k}", v, step)
        self.writer.flush()

    def finish(self, results: dict[str, Any], model: Path | None) -> None:
        final = results.get("final") or {}
        step = int(final.get("round") or 0)
        for k, v in _scalars(
            {k: v for k, v in final.items() if not isinstance(v, list | dict)}
        ).items():
            self.writer.add_scalar(f"final/{k}", v, step)
        status = (results.get("meta") or {}).get("status")
        text = f"status: {status}"
        if model is not None and model.is_file():
            digest = hashlib.sha256(model.read_bytes()).hexdigest()
            text += f"; final model {model} ({model.stat().st_size} bytes, sha256 {digest})"
        self.writer.add_text("final_model", text, step)
        self.writer.close()


def open_trackers(cfg: Any, out_dir: Path, config: dict[str, Any]) -> list[Any]:
    """The trackers `tracking=` asks for (raises ConfigError for an unknown or missing one)."""
    spec = cfg.get("tracking") if cfg is not None else None
    name = (spec or {}).get("name", "none") if hasattr(spec or {}, "get") else "none"
    if name == "none":
        return []
    if name == "tensorboard":
        return [TensorBoardTracker(dict(spec), out_dir, config)]
    raise ConfigError(f"tracking={name}: unknown tracker; use one of {', '.join(TRACKERS)}")


def call(trackers: list[Any], method: str, *args: Any) -> None:
    """Call `method` on every tracker; a failure is a warning (the run goes on)."""
    for t in list(trackers):
        try:
            getattr(t, method)(*args)
        except Exception as exc:
            LOG.warning(
                "[fedapp] tracker %s: %s failed (%s); the run goes on",
                type(t).__name__,
                method,
                exc,
            )
