"""Tasks: one module per learning problem, all behind `tasks.base.Task`."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from tasks.base import ClientData, DataError, Task

__all__ = ["ClientData", "DataError", "Task", "get_task", "TASKS"]


def __getattr__(name: str):
    # The package imports nothing heavy itself: `tasks.training`, `tasks.dp_sgd` and
    # `tasks.models` need only torch (bench/throughput.py runs where Hydra and Flower are not).
    if name in ("ClientData", "DataError", "Task"):
        from tasks import base

        return getattr(base, name)
    raise AttributeError(f"module 'tasks' has no attribute {name!r}")


def _femnist():
    from tasks.femnist import FemnistTask

    return FemnistTask


def _tabular():
    from tasks.tabular import TabularTask

    return TabularTask


def _damage_images():
    from tasks.damage_images import DamageImagesTask

    return DamageImagesTask


# task.kind -> task class (imported lazily: torchvision or pandas only when needed)
TASKS = {"femnist": _femnist, "tabular": _tabular, "damage_images": _damage_images}


@lru_cache(maxsize=4)
def _cached(cfg_yaml: str, data_dir: str) -> Task:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(cfg_yaml)
    return TASKS[str(cfg.task.kind)]()(cfg, Path(data_dir))


def get_task(cfg: DictConfig, data_dir: Path) -> Task:
    """Return the task of kind `cfg.task.kind` (cached per config, so a Ray actor reuses it)."""
    from omegaconf import OmegaConf

    from tasks.base import DataError

    kind = str(cfg.task.get("kind", cfg.task.name))
    if kind not in TASKS:
        raise DataError(
            f"unknown task kind '{kind}' (task={cfg.task.name}); available: {', '.join(sorted(TASKS))}"
        )
    return _cached(OmegaConf.to_yaml(cfg, resolve=True), str(data_dir))
