"""FEMNIST loaders on the real local LEAF data, plus the HF-schema and error paths."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from datasets import load_dataset

from fedapp.checks import compose
from tasks import DataError
from tasks.femnist import (
    FemnistTask,
    hold_out_per_writer,
    leaf_json_to_parquet,
    leaf_npz_to_parquet,
    normalize_polarity,
)


def _task(data_dir: Path, overrides: str = "") -> FemnistTask:
    return FemnistTask(compose(overrides), data_dir)


@pytest.fixture(scope="module")
def natural(data_dir):
    return _task(data_dir)


def test_npz_source_has_201_writers_and_leaf_split(natural):
    assert natural.num_partitions() == 201
    test = natural.load_central_test()
    assert len(test) == 3209  # LEAF's own per-writer test split of the 201-writer subset
    assert len(natural.load_centralized_train()) == 28016
    x, y = test.tensors
    assert tuple(x.shape[1:]) == (1, 28, 28)
    assert int(y.min()) >= 0 and int(y.max()) <= 61
    assert len(np.unique(y.numpy())) == 62


def test_polarity_is_ink_high(natural):
    x = natural.load_central_test().tensors[0].numpy()
    border = np.concatenate([x[:, 0, 0, :], x[:, 0, -1, :]], axis=1)
    assert border.mean() < 0.02  # LEAF's white background (255) became 0
    assert x[:, 0, 8:20, 8:20].mean() > 0.15  # the ink is in the middle


def test_normalize_polarity_handles_both_conventions():
    img = np.zeros((1, 28, 28), np.uint8)
    img[0, 10:18, 12:16] = 255  # white ink on black (EMNIST convention)
    a = normalize_polarity(img)
    b = normalize_polarity(255 - img)  # LEAF convention
    np.testing.assert_allclose(a, b)
    assert a[0, 0, 12, 13] == 1.0 and a[0, 0, 0, 0] == 0.0


def test_natural_partition_is_one_writer_with_train_and_val(natural):
    fds = natural.fds
    for pid in (0, 100, 200):
        part = fds.load_partition(pid, "train")
        assert len(set(part["writer_id"])) == 1
        cd = natural.load_partition(pid)
        assert len(cd.train) + len(cd.val) == len(part)
        assert len(cd.val) >= 1
        assert cd.label_counts.sum() == len(cd.train) and len(cd.label_counts) == 62
    # every test writer also has training data (LEAF split is per writer)
    train_writers = set(fds.load_split("train")["writer_id"])
    assert set(fds.load_split("test")["writer_id"]) <= train_writers


def test_partition_out_of_range_is_a_clear_error(natural):
    with pytest.raises(DataError, match="out of range"):
        natural.load_partition(201)


def test_iid_and_dirichlet_partitioners(data_dir):
    iid = _task(data_dir, "partition=iid partition.num_partitions=10")
    assert iid.num_partitions() == 10
    sizes = [len(iid.fds.load_partition(i, "train")) for i in range(10)]
    assert sum(sizes) == 28016 and max(sizes) - min(sizes) <= 1
    dirich = _task(data_dir, "partition=dirichlet partition.num_partitions=10 partition.alpha=0.1")
    parts = [dirich.fds.load_partition(i, "train") for i in range(10)]
    assert sum(len(p) for p in parts) == 28016
    assert min(len(p) for p in parts) >= 10
    # alpha=0.1 gives label skew: some client is dominated by few classes
    top_share = max(np.bincount(p["character"], minlength=62).max() / len(p) for p in parts)
    assert top_share > 0.1  # under IID every class is < ~0.06 of a partition


def test_leaf_json_shards_load_through_the_same_path(data_dir, tmp_path):
    src = data_dir / "femnist" / "leaf_json" / "slz-ai__leaf-torch"
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        name = sorted((src / split).glob("*.json.gz"))[0].name
        shutil.copy(src / split / name, tmp_path / split / name)
    task = _task(data_dir, f"task.local_path={tmp_path}")
    n_train = len(task.load_centralized_train())
    with gzip.open(next((tmp_path / "train").iterdir()), "rt") as fh:
        raw = json.load(fh)
    assert n_train == sum(raw["num_samples"])
    assert task.num_partitions() == len(raw["users"])
    assert task.load_central_test().tensors[0].max() <= 1.0


def test_hf_schema_parquet_without_split_column(data_dir, tmp_path):
    # The Hugging Face flwrlabs/femnist table has only image, writer_id, character (one split).
    base = leaf_npz_to_parquet(data_dir / "femnist" / "femnist_leaf_201writers.npz")
    ds = load_dataset("parquet", data_files=str(base), split="train").select(range(3000))
    ds = ds.remove_columns(["split"])
    path = tmp_path / "hf_like.parquet"
    ds.to_parquet(str(path))
    task = _task(data_dir, f"task.local_path={path} task.hf_test_fraction=0.2")
    n_test, n_train = len(task.load_central_test()), len(task.load_centralized_train())
    assert n_test + n_train == 3000
    assert 0.15 < n_test / 3000 < 0.25


def test_hold_out_per_writer_is_a_partition():
    from datasets import Dataset

    ds = Dataset.from_dict({"writer_id": ["a"] * 10 + ["b"] * 3 + ["c"]})
    tr, te = hold_out_per_writer(ds, 0.2, seed=0)
    assert sorted(tr + te) == list(range(14)) and not set(tr) & set(te)
    writers = np.asarray(ds["writer_id"])
    assert set(writers[te]) == {"a", "b"}  # a single-sample writer keeps its sample for training


def test_bad_sources_raise_clear_errors(data_dir, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        _task(data_dir, f"task.local_path={tmp_path}/nope.npz").local_parquet()
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((2, 28, 28), np.uint8), y=np.array([0, 1]))
    with pytest.raises(DataError, match="missing arrays"):
        leaf_npz_to_parquet(bad)
    bad_labels = tmp_path / "labels.npz"
    np.savez(
        bad_labels,
        x=np.zeros((2, 28, 28), np.uint8),
        y=np.array([0, 99]),
        writer=np.array(["a", "a"]),
        split=np.array(["train", "test"]),
    )
    with pytest.raises(DataError, match="0..61"):
        leaf_npz_to_parquet(bad_labels)
    (tmp_path / "leaf" / "train").mkdir(parents=True)
    (tmp_path / "leaf" / "train" / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="x.json"):
        leaf_json_to_parquet(tmp_path / "leaf")
    with pytest.raises(DataError, match="unsupported"):
        (tmp_path / "a.csv").write_text("x")
        _task(data_dir, f"task.local_path={tmp_path}/a.csv").local_parquet()


def test_node_data_roundtrip(natural, tmp_path):
    path = tmp_path / "node.parquet"
    n = natural.export_partitions([3, 5], path)
    assert n == len(natural.fds.load_partition(3, "train")) + len(
        natural.fds.load_partition(5, "train")
    )
    cd = natural.load_node_data(path)
    assert len(cd.train) + len(cd.val) == n


def test_models_have_the_documented_sizes(data_dir):
    small = _task(data_dir).make_model()
    leaf = _task(data_dir, "task.model=leaf_cnn").make_model()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert 1.1e6 < count(small) < 1.3e6
    assert 6.5e6 < count(leaf) < 6.7e6


def test_label_flip_on_images(natural):
    data = natural.load_partition(3)
    flipped = natural.with_labels(data, np.arange(62)[::-1].copy())
    x0, y0 = data.train.tensors
    x1, y1 = flipped.train.tensors
    assert (y1.numpy() == 61 - y0.numpy()).all() and x1 is x0
    assert flipped.label_counts.sum() == data.label_counts.sum()
    assert flipped.label_counts[61 - int(y0[0])] > 0


def test_server_validation_rows_leave_the_test_set(data_dir):
    task = _task(data_dir)
    full = task.load_central_test()
    val, test = task.central_test_split(0.1, seed=0)
    assert len(val) == 321 and len(test) == 3209 - 321
    # the two parts together are the old test set, image for image
    images = lambda ds: sorted(x.numpy().tobytes() for x in ds.tensors[0])  # noqa: E731
    assert images(val) + images(test) != [] and sorted(images(val) + images(test)) == images(full)
    # stratified: frequent classes keep their share in both parts
    counts = np.bincount(full.tensors[1].numpy(), minlength=62)
    got = np.bincount(val.tensors[1].numpy(), minlength=62)
    assert np.all(np.abs(got - counts * 0.1) <= 1.5)
    # the task itself is not changed: the next run sees the whole test set again
    assert len(task.load_central_test()) == 3209
    assert [len(x) for x in task.central_test_split(0.1, seed=0)] == [321, 3209 - 321]
    # the majority-class baseline is computed on the rows that remain
    labels = task.dataset_labels(test)
    assert task.majority_accuracy(None, labels) == pytest.approx(
        np.mean(test.tensors[1].numpy() == np.argmax(np.bincount(task.train_labels())))
    )
