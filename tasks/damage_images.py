"""Insurance claims from photos: vehicle-damage severity (minor / moderate / severe), VDS-2.5k.

The JPEGs are read straight from the dataset's tar, checked against `labels.csv` (path, split,
label, sha256), resized once to `task.image_size` and cached as a parquet table with an HF
`image` column, so partitioning goes through flwr-datasets like every other task. The dataset's
own `val` split is the server's test set; its `train` split is partitioned over clients (the
photos carry no source or insurer id, so the default split is Dirichlet over labels).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, concatenate_datasets
from flwr_datasets import FederatedDataset
from omegaconf import DictConfig
from PIL import Image as PILImage
from torch import nn
from torch.utils.data import TensorDataset

from tasks.base import ClientData, DataError, Task
from tasks.femnist import _fingerprint, _write_parquet_atomic, cache_dir
from tasks.partitioning import make_partitioner
from tasks.training import TrainSettings, train_classifier

CLASSES = ["minor", "moderate", "severe"]


class DamageCNN(nn.Module):
    """Three conv blocks (GroupNorm: no batch statistics to average across clients) + linear."""

    def __init__(self, num_classes: int = 3, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            block(3, width), block(width, 2 * width), block(2 * width, 4 * width)
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_table(tar_path: Path, labels_csv: Path, size: int) -> Path:
    """Decode, verify and resize every labelled photo once; cache as parquet (HF schema)."""
    for p in (tar_path, labels_csv):
        if not p.is_file():
            raise DataError(
                f"{p}: file not found (set FEDAPP_DATA_DIR or task.tar_path/task.labels_path)"
            )
    out = (
        cache_dir().parent / "damage" / f"vds-{size}-{_fingerprint([tar_path, labels_csv])}.parquet"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        return out
    labels = pd.read_csv(labels_csv, dtype=str)
    missing = {"path_in_tar", "split", "label", "sha256"} - set(labels.columns)
    if missing:
        raise DataError(f"{labels_csv}: missing columns {sorted(missing)}")
    bad = sorted(set(labels["label"]) - set(CLASSES))
    if bad:
        raise DataError(f"{labels_csv}: unknown labels {bad}; expected {CLASSES}")
    images, ys, splits = [], [], []
    with tarfile.open(tar_path) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for row in labels.itertuples(index=False):
            member = members.get(row.path_in_tar)
            if member is None:
                raise DataError(
                    f"{tar_path}: {row.path_in_tar} listed in {labels_csv.name} is not in the tar"
                )
            blob = tar.extractfile(member).read()  # type: ignore[union-attr]
            if hashlib.sha256(blob).hexdigest() != row.sha256:
                raise DataError(
                    f"{tar_path}: {row.path_in_tar} does not match its sha256 in {labels_csv.name}"
                )
            img = (
                PILImage.open(io.BytesIO(blob))
                .convert("RGB")
                .resize((size, size), PILImage.BILINEAR)
            )
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            images.append({"bytes": buf.getvalue(), "path": None})
            ys.append(CLASSES.index(row.label))
            splits.append(row.split)
    features = Features(
        {"image": Image(), "label": ClassLabel(names=CLASSES), "split": Value("string")}
    )
    _write_parquet_atomic(
        Dataset.from_dict({"image": images, "label": ys, "split": splits}, features=features), out
    )
    return out


def _split(dd: DatasetDict) -> DatasetDict:
    ds = dd["train"]
    flags = np.asarray(ds["split"])
    return DatasetDict(
        {
            "train": ds.select(np.flatnonzero(flags == "train")),
            "test": ds.select(np.flatnonzero(flags == "val")),
        }
    )


def to_tensors(ds: Dataset) -> TensorDataset:
    if len(ds) == 0:
        return TensorDataset(torch.zeros(0, 3, 1, 1), torch.zeros(0, dtype=torch.long))
    x = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in ds["image"]])
    x = (x - 0.5) / 0.25  # fixed normalisation: no pooled statistics needed
    return TensorDataset(
        torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.as_tensor(ds["label"])
    )


class FlipDataset(torch.utils.data.Dataset):
    """Random horizontal flips for training (photos of cars are left-right symmetric)."""

    def __init__(self, base: TensorDataset, seed: int) -> None:
        self.base, self.gen = base, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.base[i]
        if torch.rand(1, generator=self.gen).item() < 0.5:
            x = torch.flip(x, dims=[2])
        return x, y


class DamageImagesTask(Task):
    name = "insurance_image"
    num_classes = 3

    def __init__(self, cfg: DictConfig, data_dir: Path) -> None:
        super().__init__(cfg, data_dir)
        self.seed = int(cfg.seed)
        self._fds: FederatedDataset | None = None
        self._test: TensorDataset | None = None

    def _path(self, key: str) -> Path:
        p = Path(str(self.task_cfg[key])).expanduser()
        return p if p.is_absolute() else self.data_dir / p

    @property
    def fds(self) -> FederatedDataset:
        if self._fds is None:
            if self.cfg.partition.name == "natural":
                raise DataError(
                    "insurance_image has no natural client id: use partition=dirichlet or iid"
                )
            table = build_table(
                self._path("tar_path"), self._path("labels_path"), int(self.task_cfg.image_size)
            )
            partitioner = make_partitioner(
                self.cfg.partition, natural_id="label", label="label", seed=self.seed
            )
            self._fds = FederatedDataset(
                dataset="parquet",
                data_files={"train": str(table)},
                partitioners={"train": partitioner},
                preprocessor=_split,
                seed=self.seed,
            )
        return self._fds

    def num_partitions(self) -> int:
        return int(self.fds.partitioners["train"].num_partitions)

    def _client_data(self, part: Dataset) -> ClientData:
        frac = float(self.task_cfg.client_val_fraction)
        if frac > 0 and len(part) >= 5:
            split = part.train_test_split(test_size=frac, seed=self.seed)
            train, val = to_tensors(split["train"]), to_tensors(split["test"])
        else:
            train, val = to_tensors(part), to_tensors(part.select([]))
        if len(train) == 0:
            raise DataError("client partition is empty; use fewer partitions or a larger alpha")
        return ClientData(train, val, np.bincount(train.tensors[1].numpy(), minlength=3))

    def load_partition(self, partition_id: int) -> ClientData:
        if not 0 <= partition_id < self.num_partitions():
            raise DataError(
                f"partition-id {partition_id} is out of range: {self.num_partitions()} clients"
            )
        return self._client_data(self.fds.load_partition(partition_id, "train"))

    def load_node_data(self, path: Path) -> ClientData:
        from datasets import load_dataset

        return self._client_data(load_dataset("parquet", data_files={"train": str(path)})["train"])

    def export_partitions(self, partition_ids: list[int], path: Path) -> int:
        part = concatenate_datasets([self.fds.load_partition(j, "train") for j in partition_ids])
        path.parent.mkdir(parents=True, exist_ok=True)
        part.to_parquet(str(path))
        return len(part)

    def load_central_test(self) -> TensorDataset:
        if self._test is None:
            self._test = to_tensors(self.fds.load_split("test"))
        return self._test

    def load_centralized_train(self) -> TensorDataset:
        return to_tensors(self.fds.load_split("train"))

    def train_labels(self) -> np.ndarray:
        # The label column only: decoding every training image just to count classes costs seconds.
        return np.asarray(self.fds.load_split("train")["label"])

    def make_model(self) -> nn.Module:
        return DamageCNN(self.num_classes, int(self.task_cfg.width))

    def train(
        self, model: nn.Module, data: ClientData, settings: TrainSettings, prep=None
    ) -> dict[str, float]:
        return train_classifier(
            model, FlipDataset(data.train, settings.seed), settings, device=self.device
        )
