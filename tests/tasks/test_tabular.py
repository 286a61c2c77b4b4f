"""Tabular tasks on the real local files: counts, label balance, schema errors, federated-safe stats."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fedapp.checks import compose
from tasks import DataError, get_task
from tasks.tabular import TabularTask, combine_stats, numeric_stats
from tasks.training import TrainSettings

# task -> (rows, positives, natural clients) from each folder's PROVENANCE.md
EXPECTED = {
    "credit": (30000, 6636, 7),
    "credit_lending": (9578, 1533, 7),
    "credit_states": (9857, 517, 50),
    "insurance": (15420, 923, None),  # makes with a single claim may land only in the test set
    "bankruptcy": (7027 + 5910, 271 + 410, 2),
    "medical": (920, 509, 4),
}


def _read(path) -> str:
    with open(path, newline="") as fh:  # keep the file's own (old-Mac CR) line ends
        return fh.read()


def _task(data_dir, overrides: str) -> TabularTask:
    return get_task(compose(overrides), data_dir)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_files_load_with_declared_schema(name, data_dir):
    rows, positives, clients = EXPECTED[name]
    task = _task(data_dir, f"task={name}")
    assert len(task.rows) == rows
    assert int(task.rows.y.sum()) == positives
    if clients:
        assert task.num_partitions() == clients
    test = task.load_central_test()
    assert len(test) == pytest.approx(0.2 * rows, abs=1)
    assert test.y.mean() == pytest.approx(positives / rows, abs=0.01)  # stratified
    # train partitions + test = all rows, no row in two places
    parts = [task.partition_rows(i) for i in range(task.num_partitions())]
    seen = np.concatenate([*parts, task.test_idx])
    assert len(seen) == len(set(seen.tolist())) == rows


def test_medical_maps_every_site_into_one_feature_space(data_dir):
    task = _task(data_dir, "task=medical")
    from tasks.tabular import NATURAL

    sites = task.frame[NATURAL].to_numpy()  # the natural id (`site`), kept apart from features
    prep = task.aggregate_stats([task.client_stats(task.load_partition(i)) for i in range(4)])
    from tasks.tabular import featurize

    x = featurize(task.rows, task.schema, prep).tensors[0].numpy()
    assert x.shape[1] == len(task.schema.numeric) * 2 + sum(
        len(v) + 2 for v in task.schema.categorical.values()
    )
    chol = task.schema.numeric.index("chol")
    indicator = len(task.schema.numeric) + chol
    # Switzerland never measured cholesterol (0 in the file): imputed, flagged, not dropped
    assert (x[sites == "switzerland", indicator] == 1).all()
    assert (x[sites == "cleveland", indicator] == 0).all()
    assert np.isfinite(x).all()


def test_client_statistics_use_only_the_clients_rows(data_dir):
    task = _task(data_dir, "task=credit_lending")
    a, b = task.load_partition(0), task.load_partition(1)
    before = numeric_stats(a.train, 2)
    b.train.numeric[:] = 1e9  # another client's rows change ...
    assert numeric_stats(a.train, 2) == before  # ... this client's statistics do not
    # the combined statistics equal those of the pooled rows
    parts = [task.load_partition(i) for i in range(task.num_partitions())]
    prep = combine_stats([numeric_stats(p.train, 2) for p in parts])
    pooled = np.concatenate([p.train.numeric for p in parts])
    np.testing.assert_allclose(prep["prep.mean"], np.nanmean(pooled, axis=0), rtol=1e-9)
    np.testing.assert_allclose(prep["prep.std"], np.nanstd(pooled, axis=0), rtol=1e-6)


def test_training_beats_the_majority_class_on_roc_auc(data_dir):
    task = _task(data_dir, "task=credit_lending partition=iid partition.num_partitions=2")
    prep = task.aggregate_stats([task.client_stats(task.load_partition(i)) for i in range(2)])
    model = task.make_model()
    for _ in range(3):
        for i in range(2):
            task.train(model, task.load_partition(i), TrainSettings(batch_size=64, lr=0.05), prep)
    m = task.evaluate(model, task.load_central_test(), prep)
    assert m["roc_auc"] > 0.6 and m["recall"] > 0.2  # the majority class has recall 0


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.replace("not.fully.paid", "label_renamed"),
            "label column 'not.fully.paid' not found",
        ),
        (
            lambda t: t.replace("fico", "fico_x", 1),
            r"columns \['fico'\] declared in the schema are missing",
        ),
        (lambda t: t.replace(",737,", ",seven hundred,", 1), "column 'fico' must be numeric"),
        (lambda t: t.split("\r")[0] + "\r", "no rows"),
    ],
)
def test_corrupted_copies_fail_with_file_and_column(edit, message, data_dir, tmp_path):
    src = data_dir / "lending_club_loan_data" / "loan_data.csv"
    dst = tmp_path / "lending_club_loan_data" / "loan_data.csv"
    dst.parent.mkdir()
    dst.write_text(edit(_read(src)), newline="")
    with pytest.raises(DataError, match=message) as err:
        _ = TabularTask(compose("task=credit_lending"), tmp_path).rows  # read on first use
    assert "loan_data.csv" in str(err.value) or "no rows" in message


def test_missing_file_and_unknown_categories(data_dir, tmp_path):
    with pytest.raises(DataError, match="file not found"):
        _ = TabularTask(compose("task=bankruptcy_taiwan"), tmp_path).rows
    src = data_dir / "lending_club_loan_data" / "loan_data.csv"
    dst = tmp_path / "lending_club_loan_data" / "loan_data.csv"
    dst.parent.mkdir()
    shutil.copy(src, dst)
    dst.write_text(_read(dst).replace("credit_card", "crypto", 5), newline="")
    task = TabularTask(compose("task=credit_lending"), tmp_path)
    vocab = task.schema.categorical["purpose"]
    assert int((task.rows.codes[:, 0] == len(vocab)).sum()) == 5  # explicit "unknown" slot


def test_taiwan_bankruptcy_by_path(tmp_path):
    rng = np.random.default_rng(0)
    n = 200
    import pandas as pd

    df = pd.DataFrame(rng.normal(size=(n, 5)), columns=[f" Ratio {i}" for i in range(5)])
    df.insert(0, "Bankrupt?", (rng.random(n) < 0.1).astype(int))
    (tmp_path / "taiwan_bankruptcy").mkdir()
    df.to_csv(tmp_path / "taiwan_bankruptcy" / "data.csv", index=False)
    task = TabularTask(
        compose("task=bankruptcy_taiwan partition=iid partition.num_partitions=3"), tmp_path
    )
    assert task.num_partitions() == 3 and len(task.schema.numeric) == 5  # resolved on reading
    with pytest.raises(DataError, match="natural_id"):
        TabularTask(compose("task=bankruptcy_taiwan partition=natural"), tmp_path).num_partitions()


def test_focal_and_weighted_losses(data_dir):
    import torch

    from tasks.tabular import FocalLoss

    logits = torch.tensor([[2.0, -1.0], [0.1, 0.0]])
    target = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert float(FocalLoss(gamma=0.0)(logits, target)) == pytest.approx(float(ce), rel=1e-6)
    assert float(FocalLoss(gamma=2.0)(logits, target)) < float(ce)
    task = _task(data_dir, "task=medical task.loss=focal")
    assert isinstance(task.loss_fn({"prep.class_weights": [0.5, 2.0]}), FocalLoss)


def test_exported_node_file_reloads_to_the_same_rows(data_dir, tmp_path):
    task = _task(data_dir, "task=bankruptcy")  # ARFF in, signed-log transform: must not apply twice
    path = tmp_path / "node.csv"
    n = task.export_partitions([0, 1], path)
    assert n == len(task.train_idx)
    node = task.load_node_data(path)
    own = np.concatenate([task.partition_rows(0), task.partition_rows(1)])
    np.testing.assert_allclose(
        np.sort(np.nan_to_num(np.concatenate([node.train.numeric, node.val.numeric])), axis=0),
        np.sort(np.nan_to_num(task.rows.numeric[own]), axis=0),
    )


def test_size_skew_partitions(data_dir):
    task = _task(data_dir, "task=credit_lending partition=size_skew partition.num_partitions=5")
    sizes = [len(task.partition_rows(i)) for i in range(5)]
    assert sizes == sorted(sizes) and sizes[-1] > 4 * sizes[0]
    assert sum(sizes) == len(task.train_idx)


def test_impossible_dirichlet_split_says_which_settings_to_change(data_dir):
    # two classes, alpha 0.05 over 50 clients: most clients draw (almost) no rows
    task = _task(
        data_dir,
        "task=credit partition=dirichlet partition.alpha=0.05 partition.num_partitions=50",
    )
    with pytest.raises(DataError, match="partition.min_partition_size=10 rows in 10 draws"):
        task.num_partitions()
    ok = _task(
        data_dir, "task=credit partition=dirichlet partition.alpha=0.5 partition.num_partitions=10"
    )
    assert ok.num_partitions() == 10 and min(len(ok.partition_rows(i)) for i in range(10)) >= 10


def test_label_flip_changes_only_training_labels(data_dir):
    task = _task(data_dir, "task=medical")
    data = task.load_partition(0)
    flipped = task.with_labels(data, np.array([1, 0]))
    assert (flipped.train.y == 1 - data.train.y).all()
    assert (
        flipped.train.numeric[~np.isnan(flipped.train.numeric)]
        == data.train.numeric[~np.isnan(data.train.numeric)]
    ).all()
    assert flipped.val is data.val
    assert flipped.label_counts.tolist() == data.label_counts[::-1].tolist()


def test_a_deployed_node_and_the_server_need_only_their_own_files(data_dir, tmp_path):
    """An institution's SuperNode has its own file and nothing else; the operator tests on
    its own labelled file (`task.test_file`). Neither ever reads the pooled dataset."""
    full = get_task(compose("task=credit partition=iid partition.num_partitions=3"), data_dir)
    own, test = tmp_path / "bank-a.csv", tmp_path / "operator-test.csv"
    full.export_partitions([0], own)
    full.raw.iloc[full.test_idx[:500]].to_csv(test, index=False)
    empty = tmp_path / "no-pooled-data"
    empty.mkdir()
    node = TabularTask(compose("task=credit"), empty)
    data = node.load_node_data(own)
    assert data.num_train + len(data.val) == len(full.partition_rows(0))
    model = node.make_model()  # the schema alone fixes the model
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in full.make_model().parameters()
    )
    server = TabularTask(compose(f"task=credit task.test_file={test}"), empty)
    assert len(server.load_central_test()) == 500
    np.testing.assert_array_equal(server.test_labels(), full.rows.y[full.test_idx[:500]])
    assert len(server.central_test_subset(np.arange(10))) == 10
    assert "_pooled" not in vars(node) and "_pooled" not in vars(server)  # never read
    with pytest.raises(DataError, match="file not found"):
        _ = node.rows  # the pooled file is not there, and nothing needed it


def test_loss_only_evaluation_is_the_reports_loss_bit_for_bit(data_dir):
    task = _task(data_dir, "task=medical")
    data = task.load_partition(1)
    prep = task.aggregate_stats([task.client_stats(data)])
    model = task.make_model()
    task.train(model, data, TrainSettings(batch_size=16), prep)
    for rows in (data.val, task.load_central_test()):
        assert task.loss(model, rows, prep) == task.evaluate(model, rows, prep)["loss"]
    assert np.isnan(task.loss(model, data.val.take(np.arange(0)), prep))
