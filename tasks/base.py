"""The one small interface every task implements (data, model, train, evaluate)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from tasks.metrics import cross_entropy, majority_accuracy
from tasks.training import (
    TrainHook,
    TrainSettings,
    evaluate_classifier,
    predict_logits,
    resolve_device,
    train_classifier,
)


class DataError(ValueError):
    """Input data is missing or malformed; the message names the file and what to do."""


@dataclass
class ClientData:
    """One client's local data: a training set and a held-out validation set.

    `train` and `val` are whatever the task's `train`/`evaluate` take (a TensorDataset for
    images, raw rows for tables whose features depend on federated statistics).
    """

    train: Any
    val: Any
    label_counts: np.ndarray  # histogram of training labels (length = num_classes)

    @property
    def num_train(self) -> int:
        return len(self.train)


def holdout_positions(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(held-out positions, remaining positions): a seeded split, stratified by label when
    every class has at least two rows, each side non-empty."""
    labels = np.asarray(labels)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"server validation fraction must be in (0, 1), got {fraction}")
    if len(labels) < 2:
        raise DataError(
            "the central test set has fewer than 2 rows; cannot carve a server validation set"
        )
    from sklearn.model_selection import train_test_split

    pos = np.arange(len(labels))
    counts = np.unique(labels, return_counts=True)[1]
    n_val = min(max(1, round(fraction * len(labels))), len(labels) - 1)
    stratify = (
        labels if counts.min() >= 2 and len(counts) <= n_val <= len(labels) - len(counts) else None
    )
    val, rest = train_test_split(pos, train_size=n_val, random_state=seed, stratify=stratify)
    return np.sort(val), np.sort(rest)


class Task(ABC):
    """A learning problem: how its data is partitioned and loaded, its model, its metrics."""

    name: str = ""
    num_classes: int = 2
    # True when the task needs federated preprocessing statistics (one round of sums and
    # counts before training, see `client_stats` / `aggregate_stats`).
    needs_stats: bool = False
    # The metric a site judges a model by (`evaluate`'s key): per-site evaluation
    # (fedapp.features.sites) reports it; tables say "roc_auc".
    headline_metric: str = "accuracy"

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

    node_file_suffix: str = ".parquet"  # format of a SuperNode's own data file

    @abstractmethod
    def export_partitions(self, partition_ids: list[int], path: Path) -> int:
        """Write the union of these partitions to `path` in the format `load_node_data` reads.

        Returns the number of rows written. Used to give each local SuperNode its own file.
        """

    @abstractmethod
    def load_central_test(self) -> Dataset:
        """The held-out test set the server evaluates the global model on."""

    def central_test_split(self, fraction: float, seed: int) -> tuple[Any, Any]:
        """(server validation rows, test rows): a stratified, seeded `fraction` of the central
        test set held out for the operator, and the rest, on which test metrics are then
        reported, so that no row is both tuned on and reported on. fraction 0: (None, the
        whole test set). The task itself is not changed (it is shared between runs).

        For strategies that score updates on operator-held data (the contribution strategy's
        leave-one-out dimension). The split depends on the seed only, so every strategy in a
        comparison is tested on the same rows.
        """
        if not fraction:
            return None, self.load_central_test()
        val_pos, test_pos = holdout_positions(self.test_labels(), fraction, seed)
        return self.central_test_subset(val_pos), self.central_test_subset(test_pos)

    def test_labels(self) -> np.ndarray:
        """Labels of the central test set."""
        return self.dataset_labels(self.load_central_test())

    def dataset_labels(self, dataset: Any) -> np.ndarray:
        """Labels of a dataset of this task (TensorDataset(x, y) by default)."""
        return dataset.tensors[1].numpy()

    def central_test_subset(self, positions: np.ndarray) -> Any:
        """The rows of the central test set at `positions`."""
        full = self.load_central_test()
        index = torch.as_tensor(positions)
        return TensorDataset(*(t[index] for t in full.tensors))

    @abstractmethod
    def load_centralized_train(self) -> Dataset:
        """Union of all clients' training data (for the centralized upper bound only)."""

    # --- model ------------------------------------------------------------------------------
    @abstractmethod
    def make_model(self) -> nn.Module:
        """A freshly initialised model (seed torch before calling for reproducible init)."""

    def natural_ids(self, partition_id: int) -> list[str]:
        """The natural id(s) behind a partition (a hospital, a state...), for per-client
        settings such as privacy levels; [] when the partition has none."""
        return []

    # --- federated preprocessing (tasks whose features need global statistics) ----------------
    def client_stats(self, data: ClientData, clip: float | None = None) -> dict[str, list[float]]:
        """Sufficient statistics of one client's training rows (never the rows themselves);
        with `clip`, every value is clipped to [-clip, clip] first (bounded contributions, for
        differential privacy)."""
        return {}

    def screen_stats(self, stats: dict[str, list[float]]) -> str | None:
        """Why one client's statistics must be left out (None: they can be used)."""
        return None

    def aggregate_stats(self, stats: list[dict[str, list[float]]]) -> dict[str, list[float]]:
        """Combine clients' statistics into the preprocessing parameters (`prep.*` keys)."""
        return {}

    def with_labels(self, data: ClientData, mapping: np.ndarray) -> ClientData:
        """A copy of `data` whose training labels y become mapping[y] (the label-flip attack).

        The default handles TensorDataset(x, y); tasks with another row type override it.
        Validation labels are left alone: they are what the client reports metrics on.
        """
        x, y = data.train.tensors
        new_y = torch.as_tensor(np.asarray(mapping)[y.numpy()], dtype=y.dtype)
        train = TensorDataset(x, new_y)
        counts = np.bincount(new_y.numpy(), minlength=self.num_classes)
        return ClientData(train=train, val=data.val, label_counts=counts)

    def train_labels(self) -> np.ndarray:
        """Labels of all clients' training data (for the majority-class baseline)."""
        return self.load_centralized_train().tensors[1].numpy()

    def majority_accuracy(
        self, prep: dict[str, list[float]] | None, test_labels: np.ndarray | None = None
    ) -> float:
        """Accuracy on `test_labels` (default: the central test set) of always predicting the
        most frequent training class."""
        labels = self.test_labels() if test_labels is None else test_labels
        return majority_accuracy(
            np.bincount(self.train_labels(), minlength=self.num_classes), labels
        )

    # --- training / metrics (classification defaults) ---------------------------------------
    def train(
        self,
        model: nn.Module,
        data: ClientData,
        settings: TrainSettings,
        prep: dict[str, list[float]] | None = None,
        hooks: Sequence[TrainHook] = (),
    ) -> dict[str, float]:
        """Train `model` in place on the client's data; return scalar metrics. `hooks` come
        from the client-side units (fedapp/core/units.py)."""
        return train_classifier(
            model,
            self.train_dataset(data, settings, prep),
            settings,
            loss_fn=self.loss_fn(prep),
            device=self.device,
            hooks=hooks,
        )

    def train_dataset(
        self, data: ClientData, settings: TrainSettings, prep: dict[str, list[float]] | None
    ) -> Dataset:
        """What local training iterates over (augmented or featurized by some tasks)."""
        return data.train

    def loss_fn(self, prep: dict[str, list[float]] | None) -> nn.Module:
        return nn.CrossEntropyLoss()

    def eval_dataset(self, dataset: Any, prep: dict[str, list[float]] | None) -> Dataset:
        """A dataset of this task's rows as the model reads it (featurized by tables)."""
        return dataset

    eval_batch_size: int = 512

    def evaluate(self, model: nn.Module, dataset: Any, prep=None) -> dict[str, float]:
        """Loss, accuracy, balanced accuracy, precision, recall, F1, ROC-AUC, PR-AUC."""
        batch_size = int(self.task_cfg.get("eval_batch_size", self.eval_batch_size))
        return evaluate_classifier(
            model, self.eval_dataset(dataset, prep), self.num_classes, batch_size, self.device
        )

    def loss(self, model: nn.Module, dataset: Any, prep=None) -> float:
        """`evaluate(...)["loss"]`, bit for bit, without the confusion matrix and ranking
        metrics (NaN on no rows). For callers that score many models per round:
        contribution's leave-one-out and validation gain."""
        batch_size = int(self.task_cfg.get("eval_batch_size", self.eval_batch_size))
        logits, labels = predict_logits(
            model, self.eval_dataset(dataset, prep), batch_size, self.device
        )
        return cross_entropy(logits, labels) if len(labels) else float("nan")

    @property
    def device(self) -> torch.device:
        """Where this process trains and evaluates (`device=`, see `resolve_device`)."""
        return resolve_device(self.cfg.get("device", "auto"))
