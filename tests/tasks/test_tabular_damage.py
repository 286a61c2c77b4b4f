"""Damaged tables never load silently: each case stops with the file, lines, column and the
setting that fixes it, or is skipped and counted when the schema says so."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from omegaconf import OmegaConf

from tasks import DataError
from tasks.tabular import NATURAL, Schema, combine_stats, load_frame, numeric_stats, screen_stats

HEADER = "id,region,amount,age,status"
GOOD = ["1,north,100,30,good", "2,south,250.5,41,bad", "3,north,80,25,good", "4,east,10,50,bad"]


def _schema(**extra) -> Schema:
    base = {
        "label": "status",
        "positive": ["bad"],
        "numeric": ["amount", "age"],
        "categorical": {"region": ["north", "south", "east"]},
        "drop": {"id": "row id"},
        "natural_id": "region",
    }
    return Schema.from_config(OmegaConf.create({**base, **extra}))


def _load(tmp_path, lines, schema=None, raw: bytes | None = None, name="t.csv"):
    path = tmp_path / name
    if raw is None:
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_bytes(raw)
    return load_frame([{"path": str(path)}], schema or _schema(), tmp_path)


def test_a_clean_table_loads_and_keeps_the_categorical_natural_id(tmp_path):
    frame, raw = _load(tmp_path, [HEADER, *GOOD])
    assert len(frame) == 4 and list(frame[NATURAL]) == ["north", "south", "north", "east"]
    assert list(frame["region"]) == ["north", "south", "north", "east"]  # not overwritten


def test_a_short_row_stops_the_load_or_is_skipped_and_counted(tmp_path, caplog):
    lines = [HEADER, *GOOD[:2], "5,north,99", *GOOD[2:]]
    with pytest.raises(
        DataError, match=r"wrong number of fields: 1 rows, file lines \[4\].*on_bad_rows: skip"
    ):
        _load(tmp_path, lines)
    with caplog.at_level(logging.WARNING):
        frame, raw = _load(tmp_path, lines, _schema(on_bad_rows="skip"))
    assert len(frame) == len(raw) == 4
    assert "skipping rows" in caplog.text and "1 rows" in caplog.text


def test_a_third_label_value_is_not_counted_as_negative(tmp_path):
    lines = [HEADER, *GOOD, "5,south,12,33,unknown"]
    with pytest.raises(DataError, match="besides the positive.*schema.negative"):
        _load(tmp_path, lines)
    with pytest.raises(DataError, match=r"label values \['unknown'\] outside"):
        _load(tmp_path, lines, _schema(negative=["good"]))
    frame, _ = _load(tmp_path, lines, _schema(negative=["good"], on_bad_rows="skip"))
    assert len(frame) == 4


def test_a_latin1_file_stops_with_the_encoding_to_set(tmp_path):
    lines = [HEADER, *GOOD[:3], "4,süd,10,50,bad"]
    raw = "\n".join(lines).encode("latin-1")
    with pytest.raises(DataError, match="line 5.*not valid utf-8-sig.*schema.encoding"):
        _load(tmp_path, lines, raw=raw)
    schema = _schema(encoding="latin-1", categorical={"region": ["north", "south", "east", "süd"]})
    frame, _ = _load(tmp_path, lines, schema, raw=raw)
    assert "süd" in set(frame["region"])


def test_blank_natural_ids_are_named(tmp_path):
    lines = [HEADER, *GOOD[:2], "3,,80,25,good", GOOD[3]]
    with pytest.raises(DataError, match=r"blank natural id 'region': 1 rows, file lines \[4\]"):
        _load(tmp_path, lines)


@pytest.mark.parametrize("cell", ["inf", "-inf", "1e300"])
def test_non_finite_and_absurd_numbers_stop_the_load(tmp_path, cell):
    lines = [HEADER, *GOOD[:1], f"2,south,{cell},41,bad", *GOOD[2:]]
    with pytest.raises(DataError, match=r"absurd.*'amount': 1 rows, file lines \[3\]"):
        _load(tmp_path, lines)


def test_semicolons_get_the_delimiter_setting(tmp_path):
    lines = [line.replace(",", ";") for line in [HEADER, *GOOD]]
    with pytest.raises(DataError, match="schema.delimiter: ';'"):
        _load(tmp_path, lines)
    frame, _ = _load(tmp_path, lines, _schema(delimiter=";"))
    assert len(frame) == 4


def test_a_rogue_clients_statistics_are_rejected():
    from tasks.tabular import Rows

    rows = Rows(np.array([[1.0, 2.0], [3.0, np.nan]]), np.zeros((2, 0), np.int64), np.array([0, 1]))
    honest = numeric_stats(rows, 2)
    assert screen_stats(honest, 2, 2, 1e12) is None
    rogue = {**honest, "stats.sumsq": [float("inf"), 1.0]}
    assert "non-finite" in screen_stats(rogue, 2, 2, 1e12)
    huge = {**honest, "stats.sum": [1e300, 2.0]}
    assert "max_abs" in screen_stats(huge, 2, 2, 1e12)
    assert "counts" in screen_stats({**honest, "stats.count": [-1.0, 1.0]}, 2, 2, 1e12)
    assert "values" in screen_stats({**honest, "stats.count": [1.0]}, 2, 2, 1e12)
    # the honest ones alone give finite scaling
    prep = combine_stats([honest])
    assert np.all(np.isfinite(prep["prep.mean"])) and np.all(np.isfinite(prep["prep.std"]))


def test_a_federation_leaves_out_a_client_with_inf_statistics(tmp_path, data_dir, monkeypatch):
    """End to end: one client's statistics are corrupt; the run leaves it out of the scaling,
    says so, and learns from the honest statistics."""
    import json

    from fedapp import client_app
    from fedapp.cli.inline import run_inline

    real = client_app.private_stats

    def corrupt(node, context):
        stats = real(node, context)
        if node.partition_id == 0:
            stats["stats.sum"] = [float("inf")] * len(stats["stats.sum"])
        return stats

    monkeypatch.setattr(client_app, "private_stats", corrupt)
    out = run_inline(
        "task=medical rounds=1 clients_per_round=4 eval_clients_per_round=0 checkpoint=false",
        tmp_path / "run",
    )
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["status"] == "completed"
    assert np.isfinite(res["rounds"][-1]["test_loss"])
