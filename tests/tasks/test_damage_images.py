"""Vehicle-damage photos: the real tar and labels.csv, integrity checks, partitioning."""

from __future__ import annotations

import numpy as np
import pytest

from fedapp.checks import compose
from tasks import DataError, get_task
from tasks.damage_images import DamageImagesTask, build_table


@pytest.fixture(scope="module")
def task(data_dir):
    return get_task(
        compose("task=insurance_image partition=dirichlet partition.num_partitions=5"), data_dir
    )


def test_real_photos_split_and_classes(task):
    test = task.load_central_test()
    train = task.load_centralized_train()
    assert len(test) == 457 and len(train) == 1832  # the dataset's own val / train split
    assert tuple(test.tensors[0].shape[1:]) == (3, 64, 64)
    assert np.bincount(test.tensors[1].numpy()).tolist() == [180, 144, 133]
    assert np.bincount(train.tensors[1].numpy()).tolist() == [722, 577, 533]
    assert task.majority_accuracy(None) == pytest.approx(180 / 457)


def test_dirichlet_partitions_cover_the_training_split(task):
    sizes = [len(task.fds.load_partition(i, "train")) for i in range(task.num_partitions())]
    assert sum(sizes) == 1832 and min(sizes) >= 10


def test_natural_split_is_refused_with_advice(data_dir):
    with pytest.raises(DataError, match="partition=dirichlet"):
        get_task(compose("task=insurance_image partition=natural"), data_dir).num_partitions()


def test_integrity_errors_name_the_file(data_dir, tmp_path):
    src = data_dir / "vehicle_damage_severity_vds2.5k"
    labels = tmp_path / "labels.csv"
    text = (src / "labels.csv").read_text().splitlines()
    first = text[1].split(",")
    first[-1] = "0" * 64  # wrong sha256
    labels.write_text("\n".join([text[0], ",".join(first)]) + "\n")
    with pytest.raises(DataError, match="sha256"):
        build_table(src / "vds2.5k_train_val_images.tar", labels, 32)
    labels.write_text(text[0] + "\n" + text[1].replace(",minor,", ",scratch,") + "\n")
    with pytest.raises(DataError, match="unknown labels"):
        build_table(src / "vds2.5k_train_val_images.tar", labels, 32)
    with pytest.raises(DataError, match="not found"):
        build_table(tmp_path / "nope.tar", src / "labels.csv", 32)


def test_node_file_roundtrip(task, tmp_path):
    n = task.export_partitions([0, 1], tmp_path / "node.parquet")
    cd = task.load_node_data(tmp_path / "node.parquet")
    assert len(cd.train) + len(cd.val) == n


def test_model_is_small_and_fits_the_images(task):
    model = task.make_model()
    assert sum(p.numel() for p in model.parameters()) < 200_000
    x = task.load_central_test().tensors[0][:4]
    assert tuple(model(x).shape) == (4, 3)
    assert isinstance(task, DamageImagesTask)
