"""Experiment trackers for users who already have one: `tracking=tensorboard` writes
per-round metrics, the run's parameters and the final model's digest as TensorBoard events
(`tensorboard --logdir <run folder>/tensorboard`); `tracking=mlflow` logs the same to an MLflow
tracking store (a SQLite store `mlflow.db` with artifacts in `mlartifacts/`, in the run folder, by
default, or any tracking URI: a server, a database), the final model as an artifact and the run's status. Optional extras
(`pip install -e ".[tensorboard]"`, `".[mlflow]"`); the base install needs none of them.

A tracker that fails while the run goes on is a warning, never a failed run; a tracker that
is asked for but not installed is a setup error naming what to install.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from fedapp.core.config import ConfigError
from fedapp.features.events import redact

LOG = logging.getLogger("fedapp.tracking")
TRACKERS = ("none", "tensorboard", "mlflow")


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _shown(config: dict[str, Any]) -> dict[str, Any]:
    """The run's parameters as a tracker gets them: where it is recorded left out, secrets
    hidden (fedapp.features.events.redact: keys that may name one, URL passwords)."""
    return redact({k: v for k, v in config.items() if k not in ("events_db", "tracking")})


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
        params = _flat(_shown(config))
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


class MLflowTracker:
    """One MLflow run per fedapp run: parameters (the flattened config), per-round metrics
    (step = round), final metrics, the final model and results.json as artifacts, the status
    as a tag and as the run's end state."""

    MAX_PARAM = 6000  # MLflow's limit on a parameter value's length

    def __init__(self, spec: dict[str, Any], out_dir: Path, config: dict[str, Any]) -> None:
        try:
            import mlflow
        except ImportError as err:
            raise ConfigError(
                "tracking=mlflow needs the mlflow package: "
                'pip install -e ".[mlflow]" (or tracking=none)'
            ) from err
        self.mlflow = mlflow
        here = Path(out_dir).resolve()
        # MLflow 3 keeps its file store in maintenance mode: a local SQLite store by default
        uri = spec.get("tracking_uri") or f"sqlite:///{here / 'mlflow.db'}"
        self.client = mlflow.MlflowClient(tracking_uri=str(uri))
        name = str(spec.get("experiment") or "fedapp")
        found = self.client.get_experiment_by_name(name)
        local = None if spec.get("tracking_uri") else (here / "mlartifacts").as_uri()
        exp = (
            found.experiment_id
            if found is not None
            else self.client.create_experiment(name, artifact_location=local)
        )
        self.run_id = self.client.create_run(exp, run_name=Path(out_dir).name).info.run_id
        params = [
            mlflow.entities.Param(k, json.dumps(v, default=str)[: self.MAX_PARAM])
            for k, v in sorted(_flat(_shown(config)).items())
        ]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def _metrics(self, values: dict[str, float], step: int, prefix: str) -> None:
        stamp = int(time.time() * 1000)
        metrics = [
            self.mlflow.entities.Metric(f"{prefix}{k}", v, stamp, step) for k, v in values.items()
        ]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def round(self, row: dict[str, Any]) -> None:
        self._metrics(_scalars(row), int(row["round"]), "")

    def finish(self, results: dict[str, Any], model: Path | None) -> None:
        final = results.get("final") or {}
        scalars = _scalars({k: v for k, v in final.items() if not isinstance(v, list | dict)})
        self._metrics(scalars, int(final.get("round") or 0), "final.")
        status = str((results.get("meta") or {}).get("status"))
        self.client.set_tag(self.run_id, "fedapp.status", status)
        if model is not None and model.is_file():
            self.client.log_artifact(self.run_id, str(model))
            self.client.set_tag(self.run_id, "fedapp.final_model_sha256", _sha256(model))
        results_file = model.parent / "results.json" if model is not None else None
        if results_file is not None and results_file.is_file():
            self.client.log_artifact(self.run_id, str(results_file))
        end = {"completed": "FINISHED", "degraded": "FINISHED", "interrupted": "KILLED"}
        end = end.get(status, "FAILED")
        self.client.set_terminated(self.run_id, status=end)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def open_trackers(cfg: Any, out_dir: Path, config: dict[str, Any]) -> list[Any]:
    """The trackers `tracking=` asks for (raises ConfigError for an unknown or missing one)."""
    spec = cfg.get("tracking") if cfg is not None else None
    name = (spec or {}).get("name", "none") if hasattr(spec or {}, "get") else "none"
    if name == "none":
        return []
    if name == "tensorboard":
        return [TensorBoardTracker(dict(spec), out_dir, config)]
    if name == "mlflow":
        return [MLflowTracker(dict(spec), out_dir, config)]
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
