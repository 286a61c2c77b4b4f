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
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from flwr_datasets import FederatedDataset
from PIL import Image as PILImage
from torch import nn
from torch.utils.data import TensorDataset

from tasks.base import ClientData, DataError
from tasks.femnist import _fingerprint, _write_parquet_atomic, cache_dir
from tasks.hf_images import HFImageTask
from tasks.partitioning import make_partitioner
from tasks.training import TrainSettings

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


class DamageImagesTask(HFImageTask):
    name = "insurance_image"
    num_classes = 3
    label_column = "label"
    min_rows_for_val = 5

    def _path(self, key: str) -> Path:
        p = Path(str(self.task_cfg[key])).expanduser()
        return p if p.is_absolute() else self.data_dir / p

    def build_fds(self) -> FederatedDataset:
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
        return FederatedDataset(
            dataset="parquet",
            data_files={"train": str(table)},
            partitioners={"train": partitioner},
            preprocessor=_split,
            seed=self.seed,
        )

    def to_tensors(self, ds: Dataset) -> TensorDataset:
        return to_tensors(ds)

    def make_model(self) -> nn.Module:
        return DamageCNN(self.num_classes, int(self.task_cfg.width))

    def train_dataset(self, data: ClientData, settings: TrainSettings, prep) -> FlipDataset:
        return FlipDataset(data.train, settings.seed)
