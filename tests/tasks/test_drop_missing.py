"""`schema.drop_missing` (tasks/tabular.py): FLamby's heart-disease protocol as a task YAML
(conf/task/medical_flamby.yaml) gives FLamby's 740 rows, 46 of them Swiss."""

from __future__ import annotations

import pytest

from fedapp.core.config import compose
from tasks import DataError, get_task


def _rows(task) -> dict[str, int]:
    out = {}
    for p in range(task.num_partitions()):
        data = task.load_partition(p)
        out[task.natural_ids(p)[0]] = len(data.train) + len(data.val)
    return out


def test_flamby_protocol_keeps_flamby_s_rows(data_dir):
    task = get_task(compose("task=medical_flamby partition=natural"), data_dir)
    rows = _rows(task)
    assert sum(rows.values()) + len(task.load_central_test()) == 740
    full = get_task(compose("task=medical partition=natural"), data_dir)
    assert sum(_rows(full).values()) + len(full.load_central_test()) == 920  # without the filter


def test_an_unknown_drop_missing_column_is_named(data_dir):
    cfg = compose("task=medical_flamby partition=natural +task.schema.drop_missing=[nope]")
    with pytest.raises(DataError, match="nope"):
        get_task(cfg, data_dir).num_partitions()
