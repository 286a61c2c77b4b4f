"""Bringing one's own data: fedapp-schema on a generated table (leaky, ID-like and constant
columns flagged), the YAML run from outside the repository, and fedapp-data against a mirror."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedapp.cli.inline import run_inline
from fedapp.cli.schema import SchemaError, infer, main
from fedapp.features.datasets import DATASETS, GITHUB, fetch, verify


@pytest.fixture
def table(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "loans.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, delimiter=";")
        w.writerow(["row", "branch", "income", "loan", "rate", "const", "decision", "status"])
        for i in range(1200):
            inc, loan = rng.lognormal(10, 0.5), rng.lognormal(11, 0.6)
            y = rng.random() < 1 / (1 + np.exp(-2 * (np.log(loan) - np.log(inc) - 1)))
            rate = "NA" if rng.random() < 0.05 else f"{rng.normal(5, 1):.2f}"
            w.writerow(
                [
                    i + 1,
                    rng.choice(list("ABCD")),
                    f"{inc:.0f}",
                    f"{loan:.0f}",
                    rate,
                    "x",
                    "denied" if y else "approved",
                    "bad" if y else "good",
                ]
            )
    return path


def test_the_schema_flags_leaks_ids_and_constants_and_says_why(table):
    cfg, notes = infer(table, "status", positive="bad", natural_id="branch")
    schema = cfg["schema"]
    assert schema["delimiter"] == ";" and "NA" in schema["missing_tokens"]
    assert schema["positive"] == ["bad"] and schema["negative"] == ["good"]
    assert schema["numeric"] == ["income", "loan", "rate"]
    assert set(schema["categorical"]["branch"]) == set("ABCD")
    assert "leak" in schema["drop"]["decision"]
    # `row` counts the rows 1..n: dropped as a row index, and the YAML says so
    assert schema["drop"]["row"].startswith("row index: 'row' counts the rows (1..1200)")
    assert schema["drop"]["const"] == "constant: every row is 'x'"
    assert "missing_codes" not in schema  # nothing here looks like a sentinel code
    assert schema["missing_indicators"] is True  # `rate` has NA cells
    assert any("branch (4 values)" in n for n in notes)


def test_the_written_yaml_runs_from_outside_the_repository(table, tmp_path, data_dir):
    out = tmp_path / "mine" / "task" / "loans.yaml"
    assert (
        main(
            [
                str(table),
                "--label",
                "status",
                "--positive",
                "bad",
                "--natural-id",
                "branch",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert yaml.safe_load(out.read_text())["name"] == "loans"
    res_dir = run_inline(
        [
            f"hydra.searchpath=[file://{tmp_path / 'mine'}]",
            "task=loans",
            "rounds=3",
            "eval_clients_per_round=0",
            "checkpoint=false",
        ],
        tmp_path / "run",
    )
    res = json.loads((res_dir / "results.json").read_text())
    assert res["meta"]["status"] == "completed" and res["meta"]["num_clients"] == 4
    assert res["rounds"][-1]["test_roc_auc"] > 0.7  # the signal is in income and loan


def test_a_label_with_many_values_needs_the_positive_one(table, tmp_path):
    # four values and no --positive: the tool stops, naming every value and its count
    with pytest.raises(SchemaError, match="--positive") as err:
        infer(table, "branch")
    assert "the label 'branch' has 4 values" in str(err.value)
    assert all(f"'{v}' (" in str(err.value) for v in "ABCD")
    # one positive and three other values: it does not guess which are negative
    with pytest.raises(SchemaError, match="3 values besides the positive") as err:
        infer(table, "branch", positive="A")
    assert "--negative" in str(err.value)
    cfg, _ = infer(table, "branch", positive=["A", "B"], negative=["C", "D"])
    assert cfg["schema"]["positive"] == ["A", "B"] and cfg["schema"]["negative"] == ["C", "D"]


def test_fetch_checks_the_sha256_against_a_mirror(tmp_path, data_dir):
    mirror = tmp_path / "mirror"
    for name in ("credit", "bankruptcy"):
        for f in DATASETS[name]:
            target = mirror / f.source.removeprefix(GITHUB)
            target.parent.mkdir(parents=True, exist_ok=True)
            raw = (data_dir / f.path).read_bytes()
            target.write_bytes(gzip.decompress(raw) if f.gzip else raw)
    out = tmp_path / "data"
    fetch("credit", out, str(mirror))
    fetch("bankruptcy", out, str(mirror))
    assert all(line.startswith("ok") for line in verify(out, ["credit", "bankruptcy"]))
    # a corrupted source is refused
    shutil.copy(mirror / DATASETS["credit"][0].source.removeprefix(GITHUB), tmp_path / "x")
    bad = mirror / DATASETS["credit"][0].source.removeprefix(GITHUB)
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(Exception, match="sha256"):
        fetch("credit", tmp_path / "data2", str(mirror))
    assert "MISSING" in verify(tmp_path / "empty", ["credit"])[0]


def test_every_file_a_task_reads_has_its_source_listed():
    listed = {f.path for files in DATASETS.values() for f in files}
    for path in (Path(__file__).parents[2] / "conf" / "task").glob("[!_]*.yaml"):
        task = yaml.safe_load(path.read_text())
        for f in task.get("files") or []:
            assert f["path"] in listed, (
                f"{path.name}: {f['path']} is not in fedapp/features/datasets.py"
            )
    assert {"femnist", "insurance_image"} <= set(DATASETS)
