"""Tasks: one module per learning problem, all behind `tasks.base.Task`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from tasks.base import ClientData, DataError, Task

__all__ = ["ClientData", "DataError", "Task", "get_task", "TASKS"]


def _femnist():
    from tasks.femnist import FemnistTask

    return FemnistTask


TASKS = {"femnist": _femnist}


@lru_cache(maxsize=4)
def _cached(cfg_yaml: str, data_dir: str) -> Task:
    cfg = OmegaConf.create(cfg_yaml)
    return TASKS[cfg.task.name]()(cfg, Path(data_dir))


def get_task(cfg: DictConfig, data_dir: Path) -> Task:
    """Return the task named by `cfg.task.name` (cached per config, so a Ray actor reuses it)."""
    name = str(cfg.task.name)
    if name not in TASKS:
        raise DataError(f"unknown task '{name}'; available: {', '.join(sorted(TASKS))}")
    return _cached(OmegaConf.to_yaml(cfg, resolve=True), str(data_dir))
