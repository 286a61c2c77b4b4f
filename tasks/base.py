"""The one small interface every task implements (data, model, train, evaluate)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from tasks.training import TrainSettings, evaluate_classifier, train_classifier


class DataError(ValueError):
    """Input data is missing or malformed; the message names the file and what to do."""


@dataclass
class ClientData:
    """One client's local data: a training set and a held-out validation set."""

    train: TensorDataset
    val: TensorDataset
    label_counts: np.ndarray  # histogram of training labels (length = num_classes)

    @property
    def num_train(self) -> int:
        return len(self.train)


class Task(ABC):
    """A learning problem: how its data is partitioned and loaded, its model, its metrics."""

    name: str = ""

    def __init__(self, cfg: DictConfig, data_dir: Path) -> None:
        self.cfg = cfg
        self.task_cfg = cfg.task
        self.data_dir = Path(data_dir)

    # --- data -----------------------------------------------------------------------------
    @abstractmethod
    def num_partitions(self) -> int:
        """Number of clients the configured partitioner produces."""

    @abstractmethod
    def load_partition(self, partition_id: int) -> ClientData:
        """Data of simulated client `partition_id` (0-based)."""

    @abstractmethod
    def load_node_data(self, path: Path) -> ClientData:
        """Data of a deployed SuperNode that holds its own files at `path`."""

    @abstractmethod
    def export_partition(self, partition_id: int, path: Path) -> int:
        """Write partition `partition_id` to `path` in the format `load_node_data` reads.

        Returns the number of rows written. Used to give each local SuperNode its own files.
        """

    @abstractmethod
    def load_central_test(self) -> Dataset:
        """The held-out test set the server evaluates the global model on."""

    @abstractmethod
    def load_centralized_train(self) -> Dataset:
        """Union of all clients' training data (for the centralized upper bound only)."""

    # --- model ------------------------------------------------------------------------------
    @abstractmethod
    def make_model(self) -> nn.Module:
        """A freshly initialised model (seed torch before calling for reproducible init)."""

    # --- training / metrics (classification defaults) ---------------------------------------
    def train(
        self, model: nn.Module, data: ClientData, settings: TrainSettings
    ) -> dict[str, float]:
        """Train `model` in place on the client's data; return scalar metrics."""
        return train_classifier(model, data.train, settings, device=self.device)

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """Loss, accuracy (and task-specific metrics) of `model` on `dataset`."""
        return evaluate_classifier(
            model,
            dataset,
            batch_size=int(self.task_cfg.get("eval_batch_size", 512)),
            device=self.device,
        )

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
