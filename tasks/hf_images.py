"""Image tasks whose data is a Hugging Face table behind a flwr-datasets `FederatedDataset`.

Both image tasks (FEMNIST, vehicle-damage photos) keep their data this way, so partitioning,
client train/validation splits, node files and the server's test set are written once here;
a subclass says how to build its `FederatedDataset` and how rows become tensors.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

import numpy as np
from datasets import Dataset, concatenate_datasets, load_dataset
from flwr_datasets import FederatedDataset
from omegaconf import DictConfig
from torch.utils.data import TensorDataset

from tasks.base import ClientData, DataError, Task


class HFImageTask(Task):
    """Common data plumbing of image tasks; subclasses implement `build_fds` and `to_tensors`."""

    label_column = "label"
    min_rows_for_val = 2  # a client with fewer rows keeps them all for training

    def __init__(self, cfg: DictConfig, data_dir: Path) -> None:
        super().__init__(cfg, data_dir)
        self.seed = int(cfg.seed)
        self._fds: FederatedDataset | None = None
        self._test: TensorDataset | None = None

    @abstractmethod
    def build_fds(self) -> FederatedDataset:
        """The task's FederatedDataset with a "train" (partitioned) and a "test" split."""

    @abstractmethod
    def to_tensors(self, ds: Dataset) -> TensorDataset:
        """Rows -> TensorDataset(images, labels)."""

    @property
    def fds(self) -> FederatedDataset:
        if self._fds is None:
            self._fds = self.build_fds()
        return self._fds

    def num_partitions(self) -> int:
        return int(self.fds.partitioners["train"].num_partitions)

    def _client_data(self, part: Dataset) -> ClientData:
        frac = float(self.task_cfg.client_val_fraction)
        if frac > 0 and len(part) >= self.min_rows_for_val:
            split = part.train_test_split(test_size=frac, seed=self.seed)
            train, val = self.to_tensors(split["train"]), self.to_tensors(split["test"])
        else:
            train, val = self.to_tensors(part), self.to_tensors(part.select([]))
        if len(train) == 0:
            raise DataError("client partition is empty; use fewer partitions or a larger alpha")
        counts = np.bincount(train.tensors[1].numpy(), minlength=self.num_classes)
        return ClientData(train=train, val=val, label_counts=counts)

    def load_partition(self, partition_id: int) -> ClientData:
        n = self.num_partitions()
        if not 0 <= partition_id < n:
            raise DataError(
                f"partition-id {partition_id} is out of range: partition={self.cfg.partition.name} "
                f"has {n} clients"
            )
        return self._client_data(self.fds.load_partition(partition_id, "train"))

    def load_node_data(self, path: Path) -> ClientData:
        path = Path(path)
        if not path.exists():
            raise DataError(f"node data-path {path} does not exist")
        return self._client_data(load_dataset("parquet", data_files={"train": str(path)})["train"])

    def export_partitions(self, partition_ids: list[int], path: Path) -> int:
        part = concatenate_datasets([self.fds.load_partition(j, "train") for j in partition_ids])
        path.parent.mkdir(parents=True, exist_ok=True)
        part.to_parquet(str(path))
        return len(part)

    def load_central_test(self) -> TensorDataset:
        if self._test is None:
            self._test = self.to_tensors(self.fds.load_split("test"))
        return self._test

    def load_centralized_train(self) -> TensorDataset:
        return self.to_tensors(self.fds.load_split("train"))

    def train_labels(self) -> np.ndarray:
        # The label column only: decoding every training image just to count classes costs seconds.
        return np.asarray(self.fds.load_split("train")[self.label_column])
