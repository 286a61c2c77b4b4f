"""FEMNIST: 62-class handwriting, federated by writer (LEAF), with local and Hugging Face sources.

Every source goes through the same flwr-datasets path: a `FederatedDataset` over a table with
the Hugging Face schema of `flwrlabs/femnist` (`image`, `writer_id`, `character`). Local LEAF
data (the npz subset or raw JSON shards) is converted once to such a parquet file (cached),
keeping LEAF's own per-writer train/test split in an extra `split` column.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Features,
    Image,
    Value,
)
from flwr_datasets import FederatedDataset
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import TensorDataset

from tasks.base import DataError
from tasks.hf_images import HFImageTask
from tasks.models import MODELS, with_extractors
from tasks.partitioning import make_partitioner

CLASSES = (
    [str(d) for d in range(10)] + [chr(c) for c in range(65, 91)] + [chr(c) for c in range(97, 123)]
)
FEATURES = Features(
    {
        "image": Image(),
        "writer_id": Value("string"),
        "character": ClassLabel(names=CLASSES),
        "split": Value("string"),
    }
)
CACHE_ENV = "FEDAPP_CACHE_DIR"


# ------------------------------------------------------------------------------------------
# Local sources -> parquet with the HF schema
# ------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fedapp"
    path = Path(root) / "femnist"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _write_parquet_atomic(ds: Dataset, out: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".parquet.tmp")
    os.close(fd)
    ds.to_parquet(tmp)
    os.replace(tmp, out)  # atomic: concurrent clients never read a half-written file


def _table_to_dataset(
    x: np.ndarray, y: np.ndarray, writer: np.ndarray, split: np.ndarray
) -> Dataset:
    if x.ndim != 3 or x.shape[1:] != (28, 28):
        raise DataError(f"FEMNIST images must be 28x28, got array of shape {x.shape}")
    if len({len(x), len(y), len(writer), len(split)}) != 1:
        raise DataError("FEMNIST arrays x, y, writer, split have different lengths")
    y = np.asarray(y).astype(np.int64)
    if y.min() < 0 or y.max() >= len(CLASSES):
        raise DataError(f"FEMNIST labels must lie in 0..61, found {y.min()}..{y.max()}")
    bad = set(np.unique(split)) - {"train", "test"}
    if bad:
        raise DataError(f"FEMNIST split column has unknown values {sorted(bad)}")
    return Dataset.from_dict(
        {
            "image": list(np.asarray(x, dtype=np.uint8)),
            "writer_id": [str(w) for w in writer],
            "character": y.tolist(),
            "split": [str(s) for s in split],
        },
        features=FEATURES,
    )


def leaf_npz_to_parquet(npz_path: Path) -> Path:
    """Convert the LEAF npz subset (x uint8 28x28, y, writer, split) to a cached parquet file."""
    out = cache_dir() / f"npz-{_fingerprint([npz_path])}.parquet"
    if out.exists():
        return out
    try:
        d = np.load(npz_path, allow_pickle=False)
        missing = {"x", "y", "writer", "split"} - set(d.files)
    except (OSError, ValueError) as exc:
        raise DataError(f"{npz_path}: not a readable .npz file ({exc})") from exc
    if missing:
        raise DataError(
            f"{npz_path}: missing arrays {sorted(missing)}; expected x, y, writer, split"
        )
    _write_parquet_atomic(_table_to_dataset(d["x"], d["y"], d["writer"], d["split"]), out)
    return out


def _read_json(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a valid LEAF JSON shard ({exc})") from exc


def leaf_json_to_parquet(root: Path) -> Path:
    """Convert a LEAF FEMNIST folder (`train/*.json[.gz]`, `test/*.json[.gz]`) to parquet."""
    files = {
        s: sorted((root / s).glob("*.json")) + sorted((root / s).glob("*.json.gz"))
        for s in ("train", "test")
    }
    if not files["train"]:
        raise DataError(
            f"{root}: no LEAF shards in {root / 'train'} (expected *.json or *.json.gz)"
        )
    out = cache_dir() / f"leaf-{_fingerprint(files['train'] + files['test'])}.parquet"
    if out.exists():
        return out
    xs, ys, ws, ss = [], [], [], []
    for split, paths in files.items():
        for path in paths:
            shard = _read_json(path)
            if "user_data" not in shard:
                raise DataError(f"{path}: no 'user_data' key; is this a LEAF shard?")
            for writer, data in shard["user_data"].items():
                x = np.asarray(data["x"], dtype=np.float32).reshape(-1, 28, 28)
                xs.append(np.rint(x * 255.0).astype(np.uint8))  # LEAF stores k/255, lossless
                ys.append(np.asarray(data["y"], dtype=np.int64))
                ws.extend([writer] * len(x))
                ss.extend([split] * len(x))
    ds = _table_to_dataset(np.concatenate(xs), np.concatenate(ys), np.asarray(ws), np.asarray(ss))
    _write_parquet_atomic(ds, out)
    return out


def hold_out_per_writer(ds: Dataset, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, test): `fraction` of each writer's samples held out, at least one if >= 2."""
    writers = np.asarray(ds["writer_id"])
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    order = np.argsort(writers, kind="stable")
    bounds = np.flatnonzero(np.r_[True, writers[order][1:] != writers[order][:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        idx = order[a:b].copy()
        rng.shuffle(idx)
        k = int(round(fraction * len(idx)))
        k = max(k, 1) if len(idx) >= 2 else 0
        test_idx.extend(idx[:k].tolist())
        train_idx.extend(idx[k:].tolist())
    return sorted(train_idx), sorted(test_idx)


def make_splitter(test_fraction: float, seed: int):
    """flwr-datasets preprocessor: DatasetDict(train) -> DatasetDict(train, test) by writer."""

    def split(dd: DatasetDict) -> DatasetDict:
        ds = dd["train"]
        if "split" in ds.column_names:  # LEAF's own per-writer split
            flags = np.asarray(ds["split"])
            train = ds.select(np.flatnonzero(flags == "train"))
            test = ds.select(np.flatnonzero(flags == "test"))
        else:
            tr, te = hold_out_per_writer(ds, test_fraction, seed)
            train, test = ds.select(tr), ds.select(te)
        if len(train) == 0 or len(test) == 0:
            raise DataError("FEMNIST source has an empty train or test split")
        return DatasetDict({"train": train, "test": test})

    return split


# ------------------------------------------------------------------------------------------
# Tensors
# ------------------------------------------------------------------------------------------
def normalize_polarity(images: np.ndarray) -> np.ndarray:
    """uint8 (n,28,28) -> float32 (n,1,28,28) in [0,1] with ink high and background low.

    LEAF stores white background (255) and black ink; EMNIST-style sources the reverse. The
    polarity is decided per image from its border, where there is (almost) only background.
    """
    x = images.astype(np.float32) / 255.0
    if x.size == 0:
        return x.reshape(0, 1, 28, 28)
    border = np.concatenate([x[:, 0, :], x[:, -1, :], x[:, :, 0], x[:, :, -1]], axis=1).mean(axis=1)
    x[border > 0.5] = 1.0 - x[border > 0.5]
    return x[:, None, :, :]


def to_tensor_dataset(ds: Dataset) -> TensorDataset:
    """HF rows with `image` and `character` -> TensorDataset(x float (n,1,28,28), y long)."""
    if len(ds) == 0:
        return TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
    for col in ("image", "character"):
        if col not in ds.column_names:
            raise DataError(f"FEMNIST data lacks column '{col}' (has {ds.column_names})")
    images = np.stack([np.asarray(im.convert("L"), dtype=np.uint8) for im in ds["image"]])
    x = torch.from_numpy(normalize_polarity(images))
    y = torch.as_tensor(np.asarray(ds["character"], dtype=np.int64))
    return TensorDataset(x, y)


# ------------------------------------------------------------------------------------------
# Task
# ------------------------------------------------------------------------------------------
class FemnistTask(HFImageTask):
    """FEMNIST behind the common task interface."""

    name = "femnist"
    label_column = "character"

    def __init__(self, cfg: DictConfig, data_dir: Path) -> None:
        super().__init__(cfg, data_dir)
        self.num_classes = int(self.task_cfg.num_classes)
        if str(self.task_cfg.model) not in MODELS:
            raise DataError(f"task.model={self.task_cfg.model} unknown; choose {sorted(MODELS)}")

    # -- source ---------------------------------------------------------------------------
    def local_source(self) -> Path:
        """Absolute path of the configured local source, checked to exist."""
        path = Path(str(self.task_cfg.local_path)).expanduser()
        if not path.is_absolute():
            path = self.data_dir / path
        if not path.exists():
            raise DataError(
                f"FEMNIST source {path} does not exist. Point task.local_path at the LEAF npz, "
                "a LEAF JSON folder (train/, test/) or a parquet file, or set FEDAPP_DATA_DIR."
            )
        return path

    def local_parquet(self) -> Path:
        path = self.local_source()
        if path.is_dir():
            return leaf_json_to_parquet(path)
        if path.suffix == ".npz":
            return leaf_npz_to_parquet(path)
        if path.suffix == ".parquet":
            return path
        raise DataError(
            f"{path}: unsupported FEMNIST file type (use .npz, .parquet or a LEAF folder)"
        )

    def build_fds(self) -> FederatedDataset:
        partitioner = make_partitioner(
            self.cfg.partition, natural_id="writer_id", label="character", seed=self.seed
        )
        splitter = make_splitter(float(self.task_cfg.hf_test_fraction), self.seed)
        if self.task_cfg.source == "huggingface":
            return FederatedDataset(
                dataset=str(self.task_cfg.hf_dataset),
                partitioners={"train": partitioner},
                preprocessor=splitter,
                seed=self.seed,
            )
        if self.task_cfg.source == "local":
            return FederatedDataset(
                dataset="parquet",
                data_files={"train": str(self.local_parquet())},
                partitioners={"train": partitioner},
                preprocessor=splitter,
                seed=self.seed,
            )
        raise DataError(f"task.source={self.task_cfg.source}: use 'local' or 'huggingface'")

    def to_tensors(self, ds: Dataset) -> TensorDataset:
        return to_tensor_dataset(ds)

    def make_model(self) -> nn.Module:
        model = MODELS[str(self.task_cfg.model)](
            self.num_classes, norm=str(self.task_cfg.get("norm") or "none")
        )
        return with_extractors(model, bool(self.task_cfg.get("fenda", False)))
