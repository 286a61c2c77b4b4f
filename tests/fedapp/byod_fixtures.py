"""Generated tables for `fedapp-schema` (issue 31): a clean credit-application table, one
damaged copy of it per kind of damage a data owner's export can carry, and a mortgage-application
stand-in with integer-coded categories and sentinel missing codes.

Nothing here is real data: the rows are drawn from a seeded model shaped like a credit-scoring
table (columns Status, Seniority, Home, Time, Age, Marital, Records, Job, Expenses, Income,
Assets, Debt, Amount, Price; about 28% `bad`), so the fixtures are small, reproducible and free
to keep in the repository as code. Each damaged kind returns its file and the `fedapp-schema`
arguments a user would type (`--label Status --positive bad --natural-id Home` unless the kind
needs others).

    .venv/bin/python -m tests.fedapp.byod_fixtures OUT_DIR     # writes every file, to look at
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

HEADER = [
    "Status",
    "Seniority",
    "Home",
    "Time",
    "Age",
    "Marital",
    "Records",
    "Job",
    "Expenses",
    "Income",
    "Assets",
    "Debt",
    "Amount",
    "Price",
]
ARGS = ["--label", "Status", "--positive", "bad", "--natural-id", "Home"]
HOMES = (["owner", "rent", "parents", "priv", "other"], [0.48, 0.23, 0.18, 0.05, 0.06])
MARITAL = (["married", "single", "separated", "widow", "divorced"], [0.73, 0.21, 0.03, 0.02, 0.01])
JOBS = (["fixed", "freelance", "partime", "others"], [0.63, 0.23, 0.10, 0.04])


def credit_rows(n: int = 1000, seed: int = 7) -> list[list[str]]:
    """`n` rows (strings, in HEADER's order) of a credit-scoring table with a real signal."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        home = rng.choice(HOMES[0], p=HOMES[1])
        marital = rng.choice(MARITAL[0], p=MARITAL[1])
        job = rng.choice(JOBS[0], p=JOBS[1])
        records = rng.random() < 0.17
        seniority = int(min(48, rng.geometric(0.12) - 1))
        age = int(np.clip(rng.normal(37, 11), 18, 68))
        time = int(
            rng.choice([12, 18, 24, 36, 48, 60, 72], p=[0.1, 0.05, 0.15, 0.2, 0.2, 0.25, 0.05])
        )
        expenses = int(np.clip(rng.normal(55, 20), 35, 180))
        income = rng.lognormal(np.log(130), 0.45)
        assets = 0.0 if rng.random() < 0.35 else rng.lognormal(np.log(5000), 0.9)
        debt = 0.0 if rng.random() < 0.8 else rng.lognormal(np.log(1000), 0.8)
        amount = float(np.clip(rng.lognormal(np.log(1000), 0.45), 100, 5000))
        price = amount * rng.uniform(1.05, 2.5)
        logit = (
            -1.6
            + 1.5 * records
            + {"fixed": -0.4, "freelance": 0.4, "partime": 1.3, "others": 0.8}[job]
            + {"owner": -0.5, "rent": 0.5, "parents": 0.0, "priv": 0.3, "other": 0.7}[home]
            - 0.06 * seniority
            + 1.4 * np.log(amount / income / 6)
            - 0.15 * np.log1p(assets / 1000)
            + 0.01 * (expenses - 55)
        )
        bad = rng.random() < 1 / (1 + np.exp(-logit))
        no_income = rng.random() < 0.06
        rows.append(
            [
                "bad" if bad else "good",
                str(seniority),
                str(home),
                str(time),
                str(age),
                str(marital),
                "yes" if records else "no",
                str(job),
                str(expenses),
                "" if no_income else str(round(income)),
                str(round(assets)),
                str(round(debt)),
                str(round(amount)),
                str(round(price)),
            ]
        )
    return rows


def write(path: Path, header: list[str], rows: list[list[str]], **kw) -> Path:
    """A CSV file (`delimiter`, `encoding`: csv.writer's and open's)."""
    encoding = kw.pop("encoding", "utf-8")
    with path.open("w", newline="", encoding=encoding) as fh:
        w = csv.writer(fh, lineterminator="\n", **kw)
        w.writerow(header)
        w.writerows(rows)
    return path


def col(name: str) -> int:
    return HEADER.index(name)


def _rows_where(rows, name: str, value: str, k: int, seed: int = 1) -> list[int]:
    """`k` seeded positions of rows whose `name` is `value`."""
    idx = [i for i, r in enumerate(rows) if r[col(name)] == value]
    return sorted(np.random.default_rng(seed).choice(idx, size=k, replace=False).tolist())


# -- one function per kind: (folder) -> (file, fedapp-schema arguments) -------------------------
def clean(folder: Path) -> tuple[Path, list[str]]:
    return write(folder / "clean.csv", HEADER, credit_rows()), ARGS


def third_label(folder: Path):
    """A third label value, `unknown`, in 5 rows."""
    rows = credit_rows()
    for i in _rows_where(rows, "Status", "good", 5):
        rows[i][col("Status")] = "unknown"
    return write(folder / "third_label.csv", HEADER, rows), ARGS


def upper_positive(folder: Path):
    """The positives written `BAD` (the user says `--positive bad`)."""
    rows = credit_rows()
    for r in rows:
        r[0] = r[0].replace("bad", "BAD")
    return write(folder / "upper_positive.csv", HEADER, rows), ARGS


def some_upper_positive(folder: Path):
    """Most positives written `bad`, 12 of them `BAD`."""
    rows = credit_rows()
    for i in _rows_where(rows, "Status", "bad", 12):
        rows[i][0] = "BAD"
    return write(folder / "some_upper_positive.csv", HEADER, rows), ARGS


def abc_in_numeric(folder: Path):
    """One `abc` in the numeric column Income (file line 42)."""
    rows = credit_rows()
    rows[40][col("Income")] = "abc"
    return write(folder / "abc_in_numeric.csv", HEADER, rows), ARGS


def semicolon_decimal_comma(folder: Path):
    """`;`-separated, Income, Assets and Debt with decimal commas (a European spreadsheet)."""
    rows = credit_rows()
    rng = np.random.default_rng(3)
    for r in rows:
        for c in ("Income", "Assets", "Debt"):
            if r[col(c)]:
                r[col(c)] = f"{float(r[col(c)]) + rng.random():.2f}".replace(".", ",")
    return write(folder / "semicolon_decimal_comma.csv", HEADER, rows, delimiter=";"), ARGS


def thousands_separators(folder: Path):
    """`;`-separated, Assets, Amount and Price as `12.345,67` (dot thousands, decimal comma)."""
    rows = credit_rows()
    for r in rows:
        for c in ("Assets", "Amount", "Price"):
            r[col(c)] = f"{float(r[col(c)]) + 0.25:,.2f}".translate(str.maketrans(",.", ".,"))
    return write(folder / "thousands_separators.csv", HEADER, rows, delimiter=";"), ARGS


def ambiguous_thousands(folder: Path):
    """Assets as `12,345` only (quoted in a comma file): thousands or decimals? Cannot tell."""
    rows = credit_rows()
    for r in rows:
        a = int(r[col("Assets")])
        r[col("Assets")] = f"{a:,}" if a >= 1000 else str(a)
    return write(folder / "ambiguous_thousands.csv", HEADER, rows), ARGS


def rownames(folder: Path):
    """A `rownames` column: the held-out slice's row numbers in the full table (with gaps)."""
    rows = credit_rows()
    picked = np.sort(np.random.default_rng(5).choice(4454, size=len(rows), replace=False)) + 1
    rows = [[str(k), *r] for k, r in zip(picked, rows, strict=True)]
    return write(folder / "rownames.csv", ["rownames", *HEADER], rows), ARGS


def unnamed_index(folder: Path):
    """An unnamed first column 1..n (R's write.csv, pandas' to_csv with its index)."""
    rows = [[str(i + 1), *r] for i, r in enumerate(credit_rows())]
    return write(folder / "unnamed_index.csv", ["", *HEADER], rows), ARGS


def latin1(folder: Path):
    """Latin-1 bytes: one row's Home is `société`, Marital `séparé` in the separated rows."""
    rows = credit_rows()
    rows[99][col("Home")] = "société"
    for r in rows:
        r[col("Marital")] = r[col("Marital")].replace("separated", "séparé")
    return write(folder / "latin1.csv", HEADER, rows, encoding="latin-1"), ARGS


def header_only(folder: Path):
    return write(folder / "header_only.csv", HEADER, []), ARGS


def empty(folder: Path):
    path = folder / "empty.csv"
    path.write_bytes(b"")
    return path, ARGS


def inf_cell(folder: Path):
    """`inf` in Debt (file line 18) and `-inf` in Assets (line 31)."""
    rows = credit_rows()
    rows[16][col("Debt")] = "inf"
    rows[29][col("Assets")] = "-inf"
    return write(folder / "inf_cell.csv", HEADER, rows), ARGS


def blank_natural_id(folder: Path):
    """The natural id Home blank in 6 rows."""
    rows = credit_rows()
    for i in (4, 60, 61, 300, 512, 998):
        rows[i][col("Home")] = ""
    return write(folder / "blank_natural_id.csv", HEADER, rows), ARGS


def small_clients(folder: Path):
    """Home `hotel` in 1 row (a one-row client) and `ignore` in 4 (too small a client)."""
    rows = credit_rows()
    rows[10][col("Home")] = "hotel"
    for i in (20, 200, 400, 800):
        rows[i][col("Home")] = "ignore"
    return write(folder / "small_clients.csv", HEADER, rows), ARGS


def label_0_to_4(folder: Path):
    """Heart-disease style label `num` 0..4, positive `num > 0`: `--positive 1,2,3,4`."""
    rows = credit_rows()
    rng = np.random.default_rng(9)
    header = ["num", *HEADER[1:]]
    for r in rows:
        r[0] = "0" if r[0] == "good" else str(rng.integers(1, 5))
    args = ["--label", "num", "--positive", "1,2,3,4", "--natural-id", "Home"]
    return write(folder / "label_0_to_4.csv", header, rows), args


def short_rows(folder: Path):
    """Two rows with a field missing (lines 8 and 9)."""
    rows = credit_rows()
    rows[6] = rows[6][:-1]
    rows[7] = rows[7][:-1]
    return write(folder / "short_rows.csv", HEADER, rows), ARGS


def no_label(folder: Path):
    """The label blank in 3 rows."""
    rows = credit_rows()
    for i in (2, 3, 4):
        rows[i][0] = ""
    return write(folder / "no_label.csv", HEADER, rows), ARGS


def binary(folder: Path):
    """Not a table: a zip's first bytes (an .xlsx saved under .csv)."""
    path = folder / "binary.csv"
    path.write_bytes(b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00" + bytes(range(256)) * 4)
    return path, ARGS


KINDS: dict[str, Callable[[Path], tuple[Path, list[str]]]] = {
    f.__name__: f
    for f in (
        clean,
        third_label,
        upper_positive,
        some_upper_positive,
        abc_in_numeric,
        semicolon_decimal_comma,
        thousands_separators,
        ambiguous_thousands,
        rownames,
        unnamed_index,
        latin1,
        header_only,
        empty,
        inf_cell,
        blank_natural_id,
        small_clients,
        label_0_to_4,
        short_rows,
        no_label,
        binary,
    )
}


# -- the mortgage-application stand-in --------------------------------------------------------
# Coded columns, HMDA-style: integer codes whose effect on the outcome is not monotone in the code.
CODED = {
    "loan_type": [1, 2, 3, 4],
    "loan_purpose": [1, 2, 31, 32, 4, 5],
    "property_type": [1, 2, 3],
    "occupancy": [1, 2, 3],
    "lien_status": [1, 2],
    "preapproval": [1, 2],
    "applicant_ethnicity": [1, 2, 3, 4],
    "applicant_race": [1, 2, 3, 4, 5, 6, 7],
    "applicant_sex": [1, 2, 3, 4, 6],
    "co_applicant_sex": [1, 2, 3, 4, 5],
    "agency_code": [1, 2, 3, 5, 7, 9],
    "credit_model": [1, 2, 3, 4, 5, 6, 7, 8, 9],
    "hoepa_status": [1, 2, 3],
    "submission_type": [1, 2, 3],
    "aus_type": [1, 2, 3, 4, 5, 6],
    "channel": [1, 2, 3, 4],
}
SENTINEL = {  # column: (missing code, share of rows)
    "debt_to_income": (999, 0.08),
    "loan_to_value": (999, 0.05),
    "applicant_age": (9999, 0.03),
    "months_since_delinquency": (-1, 0.55),
}


def mortgage_table(path: Path, n: int = 1989, seed: int = 0) -> dict:
    """Write the stand-in (label `action_taken`: 1 originated, 3 denied; 60 columns) and return
    what a careful analyst knows about it: the coded categories, the missing codes, the
    columns to drop. Denials depend on the coded categories (not monotonically), on the
    continuous ratios (where they are present) and on whether they are missing."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list[str]] = {}
    logit = np.full(n, -1.6)
    # coded categories: each code's effect drawn once (the strongest few matter most)
    strengths = dict(
        zip(
            CODED,
            [1.6, 1.4, 0.8, 0.9, 1.2, 0.6, 0.4, 0.5, 0.4, 0.6, 0.5, 1.1, 0.3, 0.3, 0.5, 0.3],
            strict=True,
        )
    )
    for name, codes in CODED.items():
        p = rng.dirichlet(np.full(len(codes), 2.0))
        k = rng.choice(len(codes), size=n, p=p)
        effect = rng.normal(0, strengths[name], size=len(codes))
        effect -= effect @ p
        logit += effect[k]
        cols[name] = [str(codes[j]) for j in k]
    # continuous ratios with sentinel codes; missing ones are denied more often
    dti = np.clip(rng.normal(36, 10, n), 5, 75)
    ltv = np.clip(rng.normal(80, 12, n), 20, 100)
    age = np.clip(rng.normal(44, 13, n), 18, 90).round()
    msd = rng.integers(1, 120, n).astype(float)
    logit += 0.09 * (dti - 36) + 0.05 * (ltv - 80) - 0.012 * (age - 44)
    missing = {}
    for name, values in (
        ("debt_to_income", dti),
        ("loan_to_value", ltv),
        ("applicant_age", age),
        ("months_since_delinquency", msd),
    ):
        code, share = SENTINEL[name]
        m = rng.random(n) < share
        missing[name] = m
        cols[name] = [
            str(code)
            if mi
            else (f"{v:.1f}" if name in ("debt_to_income", "loan_to_value") else str(int(v)))
            for v, mi in zip(values, m, strict=True)
        ]
    logit += 1.8 * missing["debt_to_income"] + 1.0 * missing["loan_to_value"]
    delinquent = ~missing["months_since_delinquency"]
    logit += delinquent * (0.9 - 0.012 * msd)
    # ordinal integers (numeric is right for them) and amounts; income blank when not reported
    units = rng.choice([1, 2, 3, 4], size=n, p=[0.9, 0.05, 0.03, 0.02])
    dependents = rng.poisson(1.1, n).clip(0, 6)
    income = rng.lognormal(np.log(95), 0.55, n).round()
    amount = (income * rng.uniform(1.5, 5, n)).round()
    no_income = rng.random(n) < 0.07
    logit += 0.25 * (units - 1) + 0.15 * dependents - 0.6 * np.log(income / 95) + 0.9 * no_income
    cols["total_units"] = [str(v) for v in units]
    cols["dependents"] = [str(v) for v in dependents]
    cols["income"] = ["" if m else str(int(v)) for v, m in zip(income, no_income, strict=True)]
    cols["loan_amount"] = [str(int(v)) for v in amount]
    cols["property_value"] = [str(int(v * rng.uniform(1.1, 1.6))) for v in amount]
    cols["interest_rate"] = [f"{v:.3f}" for v in rng.normal(4.5, 0.6, n)]
    cols["loan_term"] = [str(v) for v in rng.choice([180, 240, 360], size=n, p=[0.2, 0.1, 0.7])]
    cols["county_code"] = [str(v) for v in rng.integers(1, 300, n) * 2 + 1001]
    cols["census_tract_income_pct"] = [f"{v:.1f}" for v in rng.normal(100, 25, n)]
    cols["tract_minority_pct"] = [f"{v:.2f}" for v in rng.uniform(0, 100, n)]
    cols["activity_year"] = ["2021"] * n  # constant
    cols["sequence_number"] = [str(i + 1) for i in range(n)]  # a row number
    # noise to 60 columns: unrelated numbers and codes, as most of a wide export is
    j = 0
    while len(cols) < 59:
        j += 1
        if j % 3 == 0:
            cols[f"flag_{j}"] = [str(v) for v in rng.choice([1, 2, 3, 4, 5], size=n)]
        else:
            cols[f"measure_{j}"] = [f"{v:.2f}" for v in rng.lognormal(3, 1, n)]
    y = rng.random(n) < 1 / (1 + np.exp(-logit))
    header = ["action_taken", *cols]
    rows = [["3" if y[i] else "1", *(cols[c][i] for c in cols)] for i in range(n)]
    write(path, header, rows)
    return {
        "label": "action_taken",
        "positive": [3],
        "negative": [1],
        "coded": {c: v for c, v in CODED.items()}
        | {f: [1, 2, 3, 4, 5] for f in cols if f.startswith("flag_")},
        "missing_codes": {c: [code] for c, (code, _) in SENTINEL.items()},
        "drop": {"activity_year": "constant", "sequence_number": "row number"},
        "numeric": [
            c
            for c in cols
            if c not in CODED
            and not c.startswith("flag_")
            and c not in ("activity_year", "sequence_number")
        ],
    }


def main(argv: list[str]) -> int:
    folder = Path(argv[0] if argv else "byod_fixtures")
    folder.mkdir(parents=True, exist_ok=True)
    for name, make in KINDS.items():
        path, args = make(folder)
        print(f"{name:24s} {path}  fedapp-schema {path.name} {' '.join(args)}")
    mortgage_table(folder / "mortgage.csv")
    print(f"{'mortgage':24s} {folder / 'mortgage.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
