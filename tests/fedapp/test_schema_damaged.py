"""`fedapp-schema` never reinterprets a table (issue 31, part 3): one test per kind of damaged
file in `byod_fixtures` (generated in tmp_path), each asserting what the tool says or writes;
the settings it names then handle the file, and the YAML they give loads as the run reads it.
And it infers well: sentinel codes and coded categories of the mortgage stand-in are proposed."""

from __future__ import annotations

import gzip

import pytest
import yaml

from fedapp.checks import compose
from fedapp.cli import schema as schema_mod
from fedapp.cli.schema import main
from tasks import get_task
from tests.fedapp.byod_fixtures import KINDS, mortgage_table

# kind -> (exit code, texts the message must hold (stderr on refusal, stdout when written))
EXPECTED: dict[str, tuple[int, list[str]]] = {
    "clean": (0, ["wrote"]),
    "third_label": (
        2,
        [
            "the label 'Status' has 2 values besides the positive ['bad']",
            "'good' (767 rows)",
            "'unknown' (5 rows, file lines 36, 475, 507, 753, 945)",
            "--negative good",
        ],
    ),
    "upper_positive": (
        2,
        ["--positive 'bad': no row has this label value", "'BAD' (228 rows)", "--positive BAD"],
    ),
    "some_upper_positive": (
        2,
        ["'BAD' (12 rows", "differs from the listed 'bad' in case or spaces only", "--negative"],
    ),
    "abc_in_numeric": (
        2,
        [
            "column 'Income' holds numbers but for 1 cell: line 42 'abc'",
            "--missing abc",
            "--categorical Income",
        ],
    ),
    "semicolon_decimal_comma": (0, ["delimiter ';'", "decimal ','"]),
    "thousands_separators": (0, ["decimal ',', thousands '.'"]),
    "ambiguous_thousands": (2, ["'7,770' (Assets, line 2)", "--thousands ,", "--decimal ,"]),
    "rownames": (0, ["dropped rownames: row index: 'rownames' holds increasing row numbers"]),
    "unnamed_index": (0, ["dropped (unnamed): row index: the unnamed column counts the rows"]),
    "latin1": (2, ["line 10 (byte 587) is not valid UTF-8", "séparé", "--encoding latin-1"]),
    "header_only": (2, ["no rows: the file has a header (14 columns) and nothing under it"]),
    "empty": (2, ["the file is empty"]),
    "inf_cell": (
        2,
        ["column 'Assets'", "line 31 '-inf'", "column 'Debt'", "line 18 'inf'", "--on-bad-rows"],
    ),
    "blank_natural_id": (
        2,
        ["'Home' is blank in 6 rows (file lines 6, 62, 63, 302, 514, 1000)", "--on-bad-rows skip"],
    ),
    "small_clients": (
        2,
        ["1 one-row client", "'ignore' (4 rows), 'hotel' (1 row)", "--min-client-rows 20"],
    ),
    "label_0_to_4": (0, ["wrote"]),
    "short_rows": (
        2,
        ["2 rows have a number of fields other than the header's 14 (file lines 8, 9)"],
    ),
    "no_label": (2, ["3 rows have no label in 'Status' (file lines 4, 5, 6)", "--on-bad-rows"]),
    "binary": (2, ["a zip archive", "export it as CSV"]),
}

# kind -> (the settings the refusal names, what the written YAML must say)
REMEDIES: dict[str, tuple[list[str], dict]] = {
    "third_label": (["--negative", "good", "--on-bad-rows", "skip"], {"on_bad_rows": "skip"}),
    "upper_positive": (["--positive", "BAD"], {"positive": ["BAD"], "negative": ["good"]}),
    "some_upper_positive": (["--positive", "bad,BAD"], {"positive": ["bad", "BAD"]}),
    "abc_in_numeric": (["--missing", "abc"], {"missing_tokens": ["", "abc"]}),
    "ambiguous_thousands": (["--thousands", ","], {"thousands": ","}),
    "latin1": (["--encoding", "latin-1", "--min-client-rows", "20"], {"encoding": "latin-1"}),
    "inf_cell": (["--missing", "inf", "--missing=-inf"], {"missing_tokens": ["", "inf", "-inf"]}),
    "blank_natural_id": (["--on-bad-rows", "skip"], {"on_bad_rows": "skip"}),
    "small_clients": (["--min-client-rows", "20"], {"natural_id_min_rows": 20}),
    "short_rows": (["--on-bad-rows", "skip"], {"on_bad_rows": "skip"}),
    "no_label": (["--on-bad-rows", "skip"], {"on_bad_rows": "skip"}),
}


def _run(kind, tmp_path, capsys, extra=()):
    path, args = KINDS[kind](tmp_path)
    args = list(args)
    if "--positive" in extra:  # the remedy replaces the kind's --positive
        i = args.index("--positive")
        del args[i : i + 2]
    out = tmp_path / "tasks" / "task" / f"{kind}.yaml"
    rc = main([str(path), *args, *extra, "-o", str(out)])
    said = capsys.readouterr()
    return rc, said, out


def test_every_kind_of_damage_has_a_test():
    assert set(EXPECTED) == set(KINDS)


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_damaged_file_is_refused_or_read_as_it_is(kind, tmp_path, capsys):
    rc, said, out = _run(kind, tmp_path, capsys)
    code, texts = EXPECTED[kind]
    assert rc == code, said.err
    assert "Traceback" not in said.err + said.out
    message = said.err if rc else said.out
    for text in texts:
        assert text in message, message
    if rc:
        assert not out.exists()  # nothing written
        if " problems, nothing written:" not in said.err:
            assert len(said.err.strip().splitlines()) == 1  # one problem, one line
        return
    schema = yaml.safe_load(out.read_text())["schema"]
    numeric = set(schema["numeric"])
    if kind == "label_0_to_4":  # --positive 1,2,3,4: four positives, the one other negative
        assert schema["positive"] == ["1", "2", "3", "4"] and schema["negative"] == ["0"]
    else:
        assert schema["positive"] == ["bad"] and schema["negative"] == ["good"]
    assert {"Seniority", "Age", "Expenses", "Income", "Assets", "Debt", "Amount"} <= numeric
    assert set(schema["categorical"]) >= {"Home", "Marital", "Records", "Job"}
    assert schema["missing_indicators"] is True  # Income is blank in ~6% of the rows
    if kind == "semicolon_decimal_comma":
        assert schema["delimiter"] == ";" and schema["decimal"] == ","
        assert "thousands" not in schema and not schema["drop"]
    elif kind == "thousands_separators":
        assert (schema["decimal"], schema["thousands"]) == (",", ".")
        assert not schema["drop"]
    elif kind == "rownames":
        assert list(schema["drop"]) == ["rownames"] and "rownames" not in numeric
    elif kind == "unnamed_index":
        assert list(schema["drop"]) == [""] and "row index" in schema["drop"][""]
    else:
        assert not schema["drop"]


@pytest.mark.parametrize("kind", list(REMEDIES))
def test_the_setting_a_refusal_names_handles_the_file(kind, tmp_path, capsys):
    extra, wanted = REMEDIES[kind]
    rc, said, out = _run(kind, tmp_path, capsys, extra)
    assert rc == 0, said.err
    schema = yaml.safe_load(out.read_text())["schema"]
    for key, value in wanted.items():
        assert schema[key] == value, (key, schema[key])
    # the YAML loads as the run reads it: every client has rows, both classes are there
    cfg = compose([f"hydra.searchpath=[file://{out.parent.parent}]", f"task={kind}"])
    task = get_task(cfg, out.parent.parent)
    sizes = [len(task.partition_rows(j)) for j in range(task.num_partitions())]
    assert len(sizes) >= 2 and min(sizes) > 0
    if kind == "small_clients":  # 'hotel' and 'ignore' pooled: one small client, not two
        assert len(sizes) == 6 and "still has fewer than 20 rows (5)" in said.out


def test_a_third_label_value_listed_as_negative_is_a_negative(tmp_path, capsys):
    rc, _, out = _run("third_label", tmp_path, capsys, ["--negative", "good,unknown"])
    assert rc == 0
    assert yaml.safe_load(out.read_text())["schema"]["negative"] == ["good", "unknown"]


def test_a_decimal_setting_against_the_file_is_refused_with_the_cells(tmp_path, capsys):
    # --decimal . on a file of decimal commas: the columns are not dropped as "ID-like" text
    rc, said, out = _run("semicolon_decimal_comma", tmp_path, capsys, ["--decimal", "."])
    assert rc == 2 and not out.exists()
    for col in ("Income", "Assets", "Debt"):
        assert f"column '{col}' looks numeric, but" in said.err
    assert "line 2 '104,09'" in said.err and "--decimal and --thousands" in said.err
    assert "ID-like" not in said.err + said.out


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"\n\n\n", "the file is empty"),
        ("Status,Home\nbad,owner\n".encode("utf-16"), "--encoding utf-16"),
        (b"\x1f\x8b\x08\x00garbage", "cannot decompress it as gzip"),
        (b"Status;Home,Job\nbad;a,b\ngood;c,d\n", "set --delimiter"),
        (b"a,b\n1,2\n", "--label 'Status': no such column"),
    ],
)
def test_odd_files_get_one_line_and_no_traceback(tmp_path, capsys, content, expected):
    path = tmp_path / "odd.csv"
    path.write_bytes(content)
    rc = main([str(path), "--label", "Status", "-o", str(tmp_path / "t.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_an_unexpected_failure_is_one_line_too(tmp_path, capsys, monkeypatch):
    path, args = KINDS["clean"](tmp_path)

    def boom(*_):
        raise KeyError("x")

    monkeypatch.setattr(schema_mod, "_infer", boom)
    rc = main([str(path), *args, "-o", str(tmp_path / "t.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "KeyError" in err and len(err.strip().splitlines()) == 1
    # an output path under a file: one line as well
    rc = main([str(path), *args, "-o", str(path / "t.yaml")])
    assert rc == 2


def test_a_gzipped_file_is_read_like_the_plain_one(tmp_path, capsys):
    path, args = KINDS["clean"](tmp_path)
    gz = tmp_path / "clean.csv.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert main([str(gz), *args, "-o", str(tmp_path / "t.yaml")]) == 0


def test_the_mortgage_stand_in_gets_its_missing_codes_and_coded_categories(tmp_path, capsys):
    csv = tmp_path / "mortgage.csv"
    truth = mortgage_table(csv)
    out = tmp_path / "task" / "mortgage.yaml"
    assert main([str(csv), "--label", "action_taken", "--positive", "3", "-o", str(out)]) == 0
    text = out.read_text()
    schema = yaml.safe_load(text)["schema"]
    # every sentinel code found, and only those; proposed in a comment to confirm
    assert schema["missing_codes"] == truth["missing_codes"]
    assert text.count("looks like a missing-value code") == len(truth["missing_codes"])
    assert schema["missing_indicators"] is True
    # the strongly coded categories proposed as categories (with the evidence), no quantity
    coded = set(schema["categorical"])
    assert {"loan_type", "property_type", "credit_model", "applicant_race"} <= coded
    assert coded <= set(truth["coded"]), coded - set(truth["coded"])
    assert "integer-coded category?" in text and "likelihood-ratio test" in text
    assert {"total_units", "dependents", "loan_term", "county_code"} <= set(schema["numeric"])
    assert set(schema["drop"]) == set(truth["drop"])


def test_numbers_in_another_format_are_read_as_the_same_numbers(tmp_path, capsys):
    # the decimal-comma and the digit-group copies load to the clean file's values (+ the
    # fractions the damage added), not to text, NaN or other numbers
    loaded = {}
    for kind in ("clean", "semicolon_decimal_comma", "thousands_separators"):
        (tmp_path / kind).mkdir()
        rc, said, out = _run(kind, tmp_path / kind, capsys)
        assert rc == 0, said.err
        cfg = compose([f"hydra.searchpath=[file://{out.parent.parent}]", f"task={kind}"])
        loaded[kind] = get_task(cfg, out.parent.parent).frame
    clean = loaded["clean"]
    for kind, cols, most in (
        ("semicolon_decimal_comma", ("Income", "Debt"), 1.0),
        ("thousands_separators", ("Assets", "Amount", "Price"), 0.25),
    ):
        for c in cols:
            diff = (loaded[kind][c] - clean[c]).dropna()
            assert len(diff) == clean[c].notna().sum() and diff.between(0, most).all(), c


def test_parse_numbers_reads_one_format_and_refuses_the_other():
    import pandas as pd

    from tasks.tabular import parse_numbers

    cells = pd.Series(["1.234,5", "12,5", "-3", "1.5", "1,23,4", "inf", None], dtype=object)
    got = parse_numbers(cells, ",", ".").tolist()
    assert got[:3] == [1234.5, 12.5, -3.0] and got[5] == float("inf")
    assert all(v != v for v in (got[3], got[4], got[6]))  # NaN: not in this format, or missing
    assert parse_numbers(pd.Series(["12,345", "7"]), ".", ",").tolist() == [12345.0, 7.0]


def test_an_encoding_that_would_misread_the_file_is_refused(tmp_path, capsys):
    # --encoding latin-1 decodes any bytes: on a UTF-8 file it would change every accent
    path = tmp_path / "utf8.csv"
    path.write_text("Status,Home,x\nbad,société,1\ngood,rent,2\nbad,rent,3\n", encoding="utf-8")
    rc = main([str(path), "--label", "Status", "--encoding", "latin-1", "-o", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert rc == 2 and "the file is valid UTF-8" in err and "'bad,sociÃ©tÃ©,1'" in err
    # the Latin-1 file read as Latin-1: its one 'société' row is a one-row client, said now
    rc, said, _ = _run("latin1", tmp_path, capsys, ["--encoding", "latin-1"])
    assert rc == 2 and "1 one-row client" in said.err and "'société' (1 row)" in said.err
