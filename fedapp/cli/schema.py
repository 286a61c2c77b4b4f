"""Bring your own table: `fedapp-schema FILE --label COL [--positive V,...] [--negative V,...]
[--natural-id COL] -o PATH.yaml` writes a task YAML that runs as it is, or stops and says why.

It reads the file the way the tabular task will (`tasks.tabular`: the same row splitting,
missing tokens, number parsing and label comparison) and never reinterprets it silently.
Anything the run would refuse, or would read differently from what the file says, stops the
tool (exit 2, nothing written) with every problem listed, each with the option that settles it:
- bytes that are not valid UTF-8 (`--encoding latin-1`, ...); a file that is empty, binary or
  has a header and no rows; rows with the wrong number of fields (`--on-bad-rows skip`);
- a delimiter or a number format it cannot tell (`--delimiter`, `--decimal`, `--thousands`);
  decimal commas, digit groups (`12.345,67`, `12,345.67`) and `;` files are detected;
- label values that are neither `--positive` nor `--negative` (both take several values:
  `--positive 1,2,3,4` or repeated), named with their counts and any case or space mismatch;
  rows without a label;
- a numeric column with a few cells that are not numbers (listed with their file lines:
  `--missing TOKEN` or `--categorical COL`); `inf` or absurd numbers;
- blank natural ids (`--on-bad-rows skip`); one-row and too-small clients
  (`--min-client-rows N` pools the ids with fewer rows into one client).

It infers, and says so in the YAML's comments (each line to confirm or edit):
- the missing-value tokens present, plus per-column sentinel codes (999, 9999, -1, ...: a value
  far outside the column's other values, or a negative code in a column of non-negative
  numbers) as `missing_codes`; `missing_indicators: true` when numeric values are missing;
- each column's type: numeric when every present value is a number; integer-coded categories
  (3 to 15 integer codes whose positive rates, one per code, explain the label significantly
  better than a linear effect of the code) as categorical; else categorical with its vocabulary
  (most frequent first);
- the positive label value when not given: the rarer of exactly two values;
- columns to drop, each with its reason: empty or constant columns, row indexes (`rownames`, an
  unnamed first column, 1..n down the file), ID-like columns (every value distinct, or more
  text values than a client could learn from), and columns that predict the label almost
  perfectly on their own (single-column ROC-AUC >= 0.98 or <= 0.02: most likely recorded after
  the outcome, a leak);
- natural-id candidates (categoricals with 2 to 60 values of at least 20 rows each), listed in a
  comment; `--natural-id` picks one.

Keep the YAML anywhere: `fedapp-run hydra.searchpath=[file:///path/to/dir] task=NAME` with the
file at `/path/to/dir/task/NAME.yaml` (the same works for fedapp-inline, fedapp-sweep and the
`overrides` run-config key of `flwr run`).
"""

from __future__ import annotations

import argparse
import codecs
import csv
import difflib
import gzip
import re
import shlex
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from scipy.stats import chi2
from sklearn.metrics import roc_auc_score

from tasks.base import DataError
from tasks.tabular import _read_arff, canonical, parse_numbers, split_rows

TOKENS = ["", "?", "NA", "N/A", "n/a", "NaN", "nan", "null", "NULL", "None", "-", "#N/A"]
DELIMITERS = [",", ";", "\t", "|"]
THOUSANDS = {"none": "", ",": ",", ".": ".", "space": " ", " ": " ", "'": "'"}
MAX_ABS = 1e12  # as tasks.tabular's schema.max_abs: larger numbers are corrupt cells
MIN_CLIENT_ROWS = 20  # a natural client with fewer rows is reported (--min-client-rows)
INDEX_NAMES = {"", "rownames", "row.names", "rowname", "row", "rownum", "row_number", "index"}
INDEX_NAMES |= {"idx", "#", "unnamed: 0", "x", "...1", "x1"}
SENTINELS = [-1, -9, -99, -999, -9999, 9, 99, 999, 9999, 99999, 999999, 8, 88, 888, 8888]
SENTINELS += [98, 998, 9998, 99998]
CODED_MAX = 15  # at most this many integer codes are proposed as a category
CODED_P = 0.01  # ... when a per-code rate beats a linear effect at this significance


class SchemaError(Exception):
    """The file cannot be described without reinterpreting it: every problem, each with the
    option that settles it."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path, self.problems = path, problems
        super().__init__(f"{path}: " + "; ".join(problems))


@dataclass
class Options:
    """What the user said (the command line's options)."""

    label: str
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    natural_id: str | None = None
    encoding: str | None = None
    delimiter: str | None = None
    decimal: str | None = None
    thousands: str | None = None
    missing: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    on_bad_rows: str = "error"
    min_client_rows: int | None = None


# ------------------------------------------------------------------------------------------
# Reading: bytes -> text -> rows, as tasks.tabular reads them
# ------------------------------------------------------------------------------------------
def _text(raw: bytes, path: Path, encoding: str | None) -> tuple[str, str]:
    """(text, encoding); undecodable bytes stop the tool with the encoding to set."""
    if path.suffix.lower() == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise SchemaError(path, [f"cannot decompress it as gzip: {exc}"]) from exc
    if not raw.strip():
        raise SchemaError(path, ["the file is empty"])
    head = raw[:4096]
    kinds = {b"PK\x03\x04": "a zip archive (an .xlsx or .ods workbook?)", b"%PDF": "a PDF"}
    kinds |= {b"\xd0\xcf\x11\xe0": "an old Excel workbook (.xls)", b"SQLite": "a SQLite database"}
    kinds |= {b"PAR1": "a Parquet file"}
    for magic, what in kinds.items():
        if head.startswith(magic):
            raise SchemaError(path, [f"this is {what}, not a text table: export it as CSV"])
    if encoding is None and (head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head):
        utf16 = head.startswith((b"\xff\xfe", b"\xfe\xff"))
        raise SchemaError(
            path,
            [
                "the file holds NUL bytes: "
                + (
                    "it looks UTF-16 encoded: set --encoding utf-16"
                    if utf16
                    else "not a text table"
                )
            ],
        )
    enc = encoding or "utf-8-sig"
    try:
        codecs.lookup(enc)
    except LookupError as exc:
        raise SchemaError(path, [f"--encoding {enc}: not an encoding Python knows"]) from exc
    if encoding and codecs.lookup(enc).name not in ("utf-8", "utf-8-sig") and not raw.isascii():
        try:
            as_utf8 = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            pass
        else:  # valid UTF-8 read as another encoding: every accented letter changes silently
            word = next(w for w in re.findall(r"\S+", as_utf8) if not w.isascii())[:40]
            raise SchemaError(
                path,
                [
                    f"--encoding {enc}: the file is valid UTF-8 ({word!r}), which {enc} would "
                    f"read as {word.encode('utf-8').decode(enc, errors='replace')!r}: leave "
                    "--encoding out"
                ],
            )
    try:
        return raw.decode(enc), enc
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        start = raw.rfind(b"\n", 0, exc.start) + 1
        end = raw.find(b"\n", exc.start)
        text_line = raw[start : end if end >= 0 else len(raw)]
        guess = "cp1252" if any(0x80 <= b <= 0x9F for b in raw) else "latin-1"
        shown = text_line.decode(guess, errors="replace").strip()[:80]
        what = f"--encoding {enc}: line" if encoding else "line"
        kind = "does not decode" if encoding else "is not valid UTF-8"
        say = (
            f"{what} {line} (byte {exc.start}) {kind}: {raw[exc.start : exc.end + 6]!r}; in "
            f"{guess} that line reads {shown!r}: if that is right, set --encoding {guess} (the "
            f"YAML then says schema.encoding: {guess})"
        )
        raise SchemaError(path, [say]) from exc


def _sniff(text: str, path: Path, given: str | None) -> str:
    """The delimiter: the one that splits the header and the first rows into the same number
    of fields (more than one). Two that both do, or none, stop the tool (`--delimiter`)."""
    if given is not None:
        return {"tab": "\t", "\\t": "\t"}.get(given, given)
    lines = [ln for ln in text.splitlines()[:60] if ln.strip()]
    fits = {}
    for d in DELIMITERS:
        try:
            rows = list(csv.reader(lines, delimiter=d))
        except csv.Error:
            continue
        n = len(rows[0])
        if n > 1 and sum(len(r) == n for r in rows) >= 0.9 * len(rows):
            fits[d] = n
    if len(fits) == 1:
        return next(iter(fits))
    first = lines[0][:80] if lines else ""
    if not fits:
        if len(lines) > 1 and not any(d in first for d in DELIMITERS):
            return ","  # a one-column file: the label check names what is there
        raise SchemaError(
            path,
            [
                f"cannot tell the delimiter: none of {DELIMITERS} splits the header {first!r} "
                "and the first rows alike; set --delimiter"
            ],
        )
    found = ", ".join(f"{d!r} ({n} fields)" for d, n in fits.items())
    raise SchemaError(path, [f"the header {first!r} splits on {found}: set --delimiter"])


def _read(path: Path, opts: Options) -> tuple[pd.DataFrame, list[int], dict[str, Any], list[str]]:
    """(frame of strings, file line of each row, what was read, problems)."""
    raw = path.read_bytes()
    text, encoding = _text(raw, path, opts.encoding)
    read: dict[str, Any] = {"encoding": encoding}
    problems: list[str] = []
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".arff"):
        try:
            df = _read_arff(text, path).astype(object)
        except (DataError, pd.errors.ParserError, ValueError) as exc:
            raise SchemaError(path, [f"cannot read it as ARFF: {exc}"]) from exc
        df = df.where(df.notna(), "?")  # the ARFF reader's missing values, back as text
        return df, list(range(1, len(df) + 1)), read | {"delimiter": ",", "arff": True}, problems
    delimiter = _sniff(text, path, opts.delimiter)
    read["delimiter"] = delimiter
    try:
        header, good, wrong = split_rows(text, delimiter)
    except csv.Error as exc:
        raise SchemaError(path, [f"cannot split it into rows: {exc}"]) from exc
    if not header:
        raise SchemaError(path, ["the file is empty"])
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        problems.append(
            f"the header names {dup} more than once: the columns cannot be told apart; "
            "rename them in the file"
        )
    if not good and not wrong:
        raise SchemaError(
            path, [f"no rows: the file has a header ({len(header)} columns) and nothing under it"]
        )
    if wrong:
        what = (
            f"{len(wrong)} rows have a number of fields other than the header's {len(header)} "
            f"(file lines {_lines(wrong)})"
        )
        if opts.on_bad_rows == "skip":
            read["skipped_rows"] = what + ": left out (schema.on_bad_rows: skip)"
        else:
            problems.append(
                f"{what}: the run stops on them. Fix the file, or --on-bad-rows skip to leave "
                "them out (counted in the run's log)"
            )
    if not good:
        raise SchemaError(path, [*problems, "no rows with the header's number of fields"])
    if dup:
        raise SchemaError(path, problems)
    df = pd.DataFrame([r for _, r in good], columns=header, dtype=object)
    return df, [line for line, _ in good], read, problems


def _lines(lines: Sequence[int], k: int = 8) -> str:
    shown = ", ".join(str(int(x)) for x in list(lines)[:k])
    return shown + (f", ... ({len(lines)} in all)" if len(lines) > k else "")


def _cells(values: pd.Series, lines: np.ndarray, k: int = 6) -> str:
    """'line 42 'abc', line 97 'n.a.'' of the first `k` cells of `values` (a masked column)."""
    out = [f"line {int(lines[i])} {v!r}" for i, v in zip(values.index[:k], values[:k], strict=True)]
    more = f", ... ({len(values)} cells)" if len(values) > k else ""
    return ", ".join(out) + more


# ------------------------------------------------------------------------------------------
# Numbers: decimal marks and digit groups, decided for the whole file
# ------------------------------------------------------------------------------------------
_SHAPES = [  # (name, pattern) in the order they are tried
    ("int", r"[+-]?\d+"),
    ("dot3", r"[+-]?[1-9]\d{0,2}\.\d{3}"),  # 1.234: a decimal or a group?
    ("comma3", r"[+-]?[1-9]\d{0,2},\d{3}"),  # 1,234
    ("dot_decimal", r"[+-]?(\d+\.\d*|\.\d+)([eE][+-]?\d+)?|[+-]?\d+[eE][+-]?\d+"),
    ("comma_decimal", r"[+-]?\d+,\d+"),
    ("comma_groups", r"[+-]?[1-9]\d{0,2}(,\d{3})+(\.\d+)?"),  # 1,234,567 or 1,234.5
    ("dot_groups", r"[+-]?[1-9]\d{0,2}(\.\d{3})+(,\d+)?"),  # 1.234.567 or 1.234,5
    ("space_groups", r"[+-]?[1-9]\d{0,2}([ '\u00a0\u202f]\d{3})+([.,]\d+)?"),
    ("special", r"[+-]?(inf|infinity|nan)"),
]
_SHAPE_RE = [(k, re.compile(p, re.IGNORECASE)) for k, p in _SHAPES]


def _shape(cell: str) -> str | None:
    s = cell.strip()
    for kind, pattern in _SHAPE_RE:
        if pattern.fullmatch(s):
            return kind
    return None


def _conventions(
    df: pd.DataFrame, lines: np.ndarray, opts: Options, path: Path
) -> tuple[str, str, list[str]]:
    """(decimal mark, thousands separator, problems), from the cells of the columns whose
    values all look like numbers; what cannot be told stops the tool with the options."""
    evidence: dict[str, tuple[str, int, str]] = {}  # shape -> (column, line, cell) first seen
    groups = set()
    for col in df.columns:
        present = df[col].dropna()
        if present.empty:
            continue
        uniq = pd.unique(present.astype(str))
        shapes = {u: _shape(u) for u in uniq}
        if sum(s is not None for s in shapes.values()) < 0.9 * len(uniq):
            continue
        for u, s in shapes.items():
            if s and s not in evidence and s not in ("int", "special"):
                i = present.index[present.astype(str) == u][0]
                at = int(lines[i])
                evidence[s] = (str(col), at, u)
            if s == "space_groups":
                groups.add(next(ch for ch in u if ch in " '\u00a0\u202f"))
    problems = []

    def seen(*kinds: str) -> str:
        return ", ".join(
            f"{evidence[k][2]!r} ({evidence[k][0]}, line {evidence[k][1]})"
            for k in kinds
            if k in evidence
        )

    dot = {"dot_decimal", "comma_groups"} & set(evidence)
    comma = {"comma_decimal", "dot_groups"} & set(evidence)
    if opts.decimal is not None:
        decimal = opts.decimal
    elif dot and comma:
        problems.append(
            f"numbers with decimal points ({seen(*dot)}) and with decimal commas "
            f"({seen(*comma)}) in one file: set --decimal . or --decimal , (cells in the "
            "other form are then reported as not numbers)"
        )
        decimal = "."
    elif comma:
        decimal = ","
    elif dot:
        decimal = "."
    elif "comma3" in evidence and opts.thousands is None:
        problems.append(
            f"numbers like {seen('comma3')} are either thousands (12,345 = 12345) or decimals "
            "(12,345 = 12.345), and no other cell tells: set --thousands , or --decimal ,"
        )
        decimal = "."
    elif "dot3" in evidence and opts.thousands is None:
        problems.append(
            f"numbers like {seen('dot3')} are either decimals (1.234) or thousands "
            "(1.234 = 1234), and no other cell tells: set --decimal . or --thousands ."
        )
        decimal = "."
    else:
        decimal = "." if opts.thousands != "." else ","
    if opts.thousands is not None:
        thousands = opts.thousands
    elif decimal == "," and ({"dot_groups", "dot3"} & set(evidence)):
        thousands = "."
    elif decimal == "." and ({"comma_groups", "comma3"} & set(evidence)):
        thousands = ","
    elif len(groups) == 1:
        thousands = groups.pop()
    else:
        thousands = ""
    if thousands == decimal:
        problems.append(f"--decimal and --thousands are both {decimal!r}")
    return decimal, thousands, problems


# ------------------------------------------------------------------------------------------
# Inference
# ------------------------------------------------------------------------------------------
def single_column_auc(score: np.ndarray, y: np.ndarray) -> float | None:
    """ROC-AUC of predicting the label from this score alone (NaN: not present); None when it
    cannot be computed."""
    present = np.isfinite(score)
    if present.sum() < 10 or len(np.unique(y[present])) < 2:
        return None
    return float(roc_auc_score(y[present], score[present]))


def _rate_score(values: pd.Series, y: np.ndarray) -> np.ndarray:
    """Each row's in-sample positive rate of its value (NaN where missing)."""
    present = values.notna().to_numpy()
    out = np.full(len(values), np.nan)
    v = values[present].astype(str).to_numpy()
    rate = pd.Series(y[present]).groupby(v).mean()
    out[present] = pd.Series(v).map(rate).to_numpy(dtype=np.float64)
    return out


def _sentinels(num: pd.Series) -> list[tuple[float, int, str]]:
    """(code, rows, why) of values that look like missing-value codes: a 9s/8s code far above
    every other value, or a negative code in a column of non-negative numbers."""
    found = []
    x = num.dropna()
    x = x[np.isfinite(x)]
    while len(x):
        counts = x.value_counts()
        best = None
        for code in sorted(SENTINELS, key=abs, reverse=True):
            n = int(counts.get(code, 0))
            if n < max(2, 0.002 * len(x)):
                continue
            rest = x[x != code]
            if rest.nunique() < 2:
                continue
            lo, hi = float(rest.min()), float(rest.max())
            if code > 0 and code > hi + 0.5 * (hi - lo):
                best = (code, n, f"all other values are {_num(lo)} to {_num(hi)}")
            elif code < 0 and lo >= 0:
                best = (code, n, f"every other value is >= 0 ({_num(lo)} to {_num(hi)})")
            if best:
                break
        if not best:
            return found
        found.append(best)
        x = x[x != best[0]]
    return found


def _opt(flag: str, value: str) -> str:
    """`--missing abc`, `--missing=-inf` (a value that argparse would take for an option),
    quoted for a shell where needed."""
    value = shlex.quote(str(value))
    return f"{flag}={value}" if value.startswith("-") else f"{flag} {value}"


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'s' if k != 1 else ''}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _loglik_linear(x: np.ndarray, y: np.ndarray) -> float:
    """Log-likelihood of a one-column logistic regression on `x` (Newton's method)."""
    z = (x - x.mean()) / (x.std() or 1.0)
    design = np.column_stack([np.ones_like(z), z])
    w = np.zeros(2)
    for _ in range(50):
        p = 1 / (1 + np.exp(-design @ w))
        hess = (design * (p * (1 - p))[:, None]).T @ design + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, design.T @ (y - p))
        w += step
        if np.abs(step).max() < 1e-9:
            break
    p = np.clip(1 / (1 + np.exp(-design @ w)), 1e-12, 1 - 1e-12)
    return float(np.sum(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _coded(num: pd.Series, y: np.ndarray) -> str | None:
    """Why an integer column looks like coded categories (None: it looks like a quantity).

    A column of 3 to CODED_MAX integer codes is proposed as categorical when one positive rate
    per code explains the label significantly better than a linear effect of the code (a
    likelihood-ratio test, p < CODED_P): the codes then do not behave like a quantity. Codes
    without such evidence stay numeric (for a linear model, a code with no effect costs nothing
    either way)."""
    present = num.notna().to_numpy()
    x = num.to_numpy(dtype=np.float64)[present]
    yy = y[present].astype(np.float64)
    if len(x) < 30 or not np.all(x == np.rint(x)) or len(np.unique(yy)) < 2:
        return None
    codes = np.unique(x)
    if not 3 <= len(codes) <= CODED_MAX or np.abs(codes).max() > 10_000:
        return None
    groups = pd.DataFrame({"x": x, "y": yy}).groupby("x")["y"].agg(["sum", "count"])
    rate = (groups["sum"] / groups["count"]).clip(1e-12, 1 - 1e-12)
    loglik_codes = float(
        (groups["sum"] * np.log(rate) + (groups["count"] - groups["sum"]) * np.log(1 - rate)).sum()
    )
    p = float(chi2.sf(2 * max(0.0, loglik_codes - _loglik_linear(x, yy)), len(codes) - 2))
    if p >= CODED_P:
        return None
    uneven = len(set(np.diff(codes).tolist())) > 1
    rates = ", ".join(f"{_num(c)}: {r:.0%}" for c, r in list(rate.items())[:8])
    return (
        f"{len(codes)} integer codes{' not evenly spaced' if uneven else ''}, positive rate by "
        f"code {rates}{', ...' if len(codes) > 8 else ''}: not a linear effect of the code "
        f"(likelihood-ratio test p={p:.1g})"
    )


def _row_index(name: str, num: pd.Series, position: int, n: int) -> str | None:
    """Why a column is a row index (None: it is not)."""
    if num.isna().any() or len(num) < 3:
        return None
    v = num.to_numpy(dtype=np.float64)
    if not np.all(v == np.rint(v)) or not np.all(np.diff(v) > 0):
        return None
    label = f"'{name}'" if name else "the unnamed column"
    counted = v[0] in (0, 1) and np.all(np.diff(v) == 1)
    if counted:
        return f"row index: {label} counts the rows ({_num(v[0])}..{_num(v[-1])}), not a feature"
    if name.strip().lower() in INDEX_NAMES or (name == "" and position == 0):
        return (
            f"row index: {label} holds increasing row numbers ({_num(v[0])}..{_num(v[-1])}, "
            "with gaps: the rows' places in a larger table), not a feature"
        )
    return None


def _labels(
    labels: pd.Series, lines: np.ndarray, opts: Options
) -> tuple[list[str], list[str], list[str], list[str]]:
    """(positive, negative, problems, notes) of the label column (canonical text)."""
    problems, notes = [], []
    present = labels.notna()
    text = labels[present].map(canonical)
    counts = text.value_counts()
    name = opts.label
    if not present.all():
        what = f"{int((~present).sum())} rows have no label in '{name}' (file lines {_lines(lines[~present.to_numpy()])})"
        if opts.on_bad_rows == "skip":
            notes.append(what + ": left out (schema.on_bad_rows: skip)")
        else:
            problems.append(
                f"{what}: the run stops on them. Fix the file, or --on-bad-rows skip to leave "
                "them out"
            )
    if len(counts) < 2:
        problems.append(
            f"the label '{name}' has {len(counts)} value{'s' if len(counts) != 1 else ''} "
            f"{dict(counts)}: a binary task needs two classes"
        )
        return [], [], problems, notes
    pos = [canonical(v) for v in opts.positive]
    neg = [canonical(v) for v in opts.negative]
    shown = ", ".join(f"{v!r} ({n} rows)" for v, n in counts.items())
    if not pos and not neg:
        if len(counts) != 2:
            problems.append(
                f"the label '{name}' has {len(counts)} values: {shown}; name the positive one(s) "
                "with --positive (and the negative ones with --negative)"
            )
            return [], [], problems, notes
        pos, neg = [str(counts.index[-1])], [str(counts.index[0])]
        notes.append(
            f"positive: {pos[0]!r} (the rarer of the two label values; --positive to choose)"
        )
    both = sorted(set(pos) & set(neg))
    if both:
        problems.append(f"{both} given as both --positive and --negative")
    fold = {v.strip().casefold(): v for v in counts.index}

    def _at(v: str) -> str:
        if counts[v] > 20:
            return ""
        rows = lines[present.to_numpy()][(text == v).to_numpy()]
        return f", file lines {_lines(rows, 5)}"

    for flag, given in (("--positive", pos), ("--negative", neg)):
        for v in given:
            if v not in counts.index:
                close = fold.get(v.strip().casefold())
                hint = (
                    f"; the file has {close!r} ({counts[close]} rows), which differs in case or "
                    f"spaces: label values are compared exactly, write {_opt(flag, close)}"
                    if close
                    else f"; the values are {shown}"
                )
                problems.append(f"{flag} {v!r}: no row has this label value{hint}")
    listed = set(pos) | set(neg)
    # a given value absent from the file but present in another case or spacing: reported
    # above; the rest is judged as if the user had written it as the file does
    hinted = {
        fold[v.strip().casefold()]
        for v in [*pos, *neg]
        if v not in counts.index and v.strip().casefold() in fold
    }
    if pos and not neg:
        others = [v for v in counts.index if v not in listed and v not in hinted]
        if len(others) == 1:
            neg = others
            listed.add(others[0])
    elif neg and not pos:
        others = [v for v in counts.index if v not in listed and v not in hinted]
        if len(others) == 1:
            pos = others
            listed.add(others[0])
    unlisted = [v for v in counts.index if v not in listed and v not in hinted]

    def _like(v: str) -> str:
        like = [g for g in listed if g.strip().casefold() == v.strip().casefold()]
        return (
            f", which differs from the listed {like[0]!r} in case or spaces only: label values "
            "are compared exactly"
            if like
            else ""
        )

    if unlisted and bool(pos) != bool(neg):
        given, missing = ("positive", "--negative") if pos else ("negative", "--positive")
        parts = [f"{v!r} ({counts[v]} rows{_at(v)}{_like(v)})" for v in unlisted]
        problems.append(
            f"the label '{name}' has {_n(len(unlisted), 'value')} besides the {given} "
            f"{pos or neg}: {', '.join(parts)}. List the {'negative' if pos else 'positive'} "
            f"one(s) with {missing} (e.g. {_opt(missing, unlisted[0])}); values in neither list then "
            "stop the tool (or, with --on-bad-rows skip, their rows are left out)"
        )
        unlisted = []
    if unlisted:
        parts = [f"{v!r} ({counts[v]} rows{_at(v)}{_like(v)})" for v in unlisted]
        what = (
            f"label values neither positive {pos} nor negative {neg or '(none given)'}: "
            + "; ".join(parts)
        )
        if opts.on_bad_rows == "skip" and pos and neg:
            notes.append(what + ": those rows are left out (schema.on_bad_rows: skip)")
        else:
            problems.append(
                f"{what}. Every label value must be listed: add them to --positive or "
                "--negative (several values: --positive a,b or the flag repeated), or "
                "--on-bad-rows skip to leave those rows out"
            )
    return pos, neg, problems, notes


def infer(
    path: Path,
    label: str | None = None,
    positive: str | Sequence[str] | None = None,
    natural_id: str | None = None,
    **options: Any,
) -> tuple[dict[str, Any], list[str]]:
    """(the task config, notes for the YAML's header); SchemaError when the file cannot be
    described without reinterpreting it. `options`: the other fields of `Options`."""
    if isinstance(positive, str):
        positive = [positive]
    opts = options.pop("opts", None) or Options(
        label=str(label),
        positive=list(positive or []),
        natural_id=natural_id,
        **options,
    )
    cfg, notes, _ = _infer(Path(path), opts)
    return cfg, notes


def _infer(path: Path, opts: Options) -> tuple[dict[str, Any], list[str], dict]:
    """(config, notes, comments: (section, column) -> comment)."""
    df, file_lines, read, problems = _read(path, opts)
    lines = np.asarray(file_lines)
    header = list(df.columns)
    notes = [f"encoding {read['encoding']}, delimiter {read['delimiter']!r}, {len(df)} rows"]
    if "skipped_rows" in read:
        notes.append(read["skipped_rows"])
    comments: dict[tuple[str, str], str] = {}
    if opts.label not in header:
        close = difflib.get_close_matches(opts.label, header, n=3, cutoff=0.6)
        close += [c for c in header if c.casefold() == opts.label.casefold() and c not in close]
        hint = f"; did you mean {close}?" if close else ""
        problems.append(
            f"--label {opts.label!r}: no such column{hint} The columns are {header[:30]}"
        )
        raise SchemaError(path, problems)
    tokens = [t for t in TOKENS if (df == t).to_numpy().any()]
    tokens += [t for t in opts.missing if t not in tokens]
    tokens = [""] + [t for t in tokens if t != ""]  # an empty cell is missing in any case
    token_set = set(tokens)
    df = df.map(lambda v: np.nan if v in token_set else v).astype(object)
    pos, neg, label_problems, label_notes = _labels(df[opts.label], lines, opts)
    problems += label_problems
    notes += label_notes
    y = df[opts.label].map(lambda v: canonical(v) if isinstance(v, str) else "").isin(pos)
    y = y.to_numpy(dtype=np.int64)
    decimal, thousands, number_problems = _conventions(
        df.drop(columns=[opts.label]), lines, opts, path
    )
    problems += number_problems
    if decimal != "." or thousands:
        notes.append(f"numbers written with decimal {decimal!r}, thousands {thousands!r}")
    numeric, categorical, drop, candidates = [], {}, {}, []
    missing_codes: dict[str, list[float]] = {}
    has_missing = []
    for position, col in enumerate(header):
        if col == opts.label:
            continue
        present = df[col].dropna()
        if present.empty:
            drop[col] = "empty: no values"
            continue
        num = parse_numbers(df[col], decimal, thousands)
        n_num = int(num.notna().sum())
        not_number = df[col].notna() & num.isna()
        forced_cat, forced_num = col in opts.categorical, col in opts.numeric
        if not_number.any() and not forced_cat:
            bad = df[col][not_number]
            few = bad.nunique() <= 10 and n_num >= 0.9 * len(present)
            shaped = present.astype(str).map(_shape).notna().mean() >= 0.9
            if few or forced_num:
                problems.append(
                    f"column '{col}' holds numbers but for {_n(int(not_number.sum()), 'cell')}: "
                    f"{_cells(bad, lines)}. Fix them, mark them missing "
                    f"({_opt('--missing', bad.iloc[0])}), or keep the column as text "
                    f"({_opt('--categorical', col)})"
                )
                continue
            if shaped:  # numbers, but not in the file's (or the given) number format
                problems.append(
                    f"column '{col}' looks numeric, but {_n(int(not_number.sum()), 'cell')} "
                    f"are not numbers with decimal {decimal!r} and thousands "
                    f"{thousands or 'none'!r}: {_cells(bad, lines, 3)}. Set --decimal and "
                    f"--thousands to the file's format, or keep the column as text "
                    f"({_opt('--categorical', col)})"
                )
                continue
        is_number = (not forced_cat) and n_num == len(present)
        if is_number:
            finite = np.isfinite(num) & (num.abs() <= MAX_ABS)
            absurd = num.notna() & ~finite
            if absurd.any():
                cells = _cells(df[col][absurd], lines)
                what = (
                    f"column '{col}' has {_n(int(absurd.sum()), 'cell')} not finite or beyond "
                    f"±{MAX_ABS:g} (schema.max_abs): {cells}"
                )
                if opts.on_bad_rows == "skip":
                    notes.append(f"{what}: those rows are left out (schema.on_bad_rows: skip)")
                else:
                    problems.append(
                        f"{what}: the run stops on such rows. Fix them, mark them missing "
                        f"({_opt('--missing', df[col][absurd].iloc[0])}), or --on-bad-rows skip"
                    )
                num = num.mask(absurd)
        distinct = present.astype(str).nunique()
        if distinct <= 1:
            drop[col] = f"constant: every row is {present.iloc[0]!r}"
            continue
        if is_number:
            why = _row_index(str(col), num, position, len(df))
            if why:
                drop[col] = why
                continue
            if distinct == len(present) and _sequential(num.dropna()):
                drop[col] = "ID-like: every value distinct, consecutive integers"
                continue
        elif distinct == len(present) and not forced_cat:
            drop[col] = "ID-like: every value distinct"
            continue
        if not is_number and not forced_cat and distinct > max(60, len(df) // 20):
            drop[col] = f"ID-like: {distinct} distinct text values"
            continue
        codes = _sentinels(num) if is_number and not forced_num else []
        if codes:
            missing_codes[col] = [c for c, _, _ in codes]
            comments[("missing_codes", col)] = (
                "; ".join(
                    f"{_num(c)} in {n} rows ({n / len(df):.1%}) looks like a missing-value code "
                    f"({why})"
                    for c, n, why in codes
                )
                + ": read as missing; confirm, or delete this line"
            )
            num = num.mask(num.isin(missing_codes[col]))
        score = num.to_numpy(dtype=np.float64) if is_number else _rate_score(df[col], y)
        auc = single_column_auc(score, y) if pos else None
        if auc is not None and (auc >= 0.98 or auc <= 0.02) and col != opts.natural_id:
            drop[col] = (
                f"leak: predicts the label almost perfectly on its own (single-column ROC-AUC "
                f"{auc:.3f}); most likely recorded after the outcome"
            )
            continue
        coded = _coded(num, y) if is_number and not forced_num else None
        if is_number and not coded:
            numeric.append(col)
            if num.isna().any():
                has_missing.append(col)
            continue
        if coded:
            vals = num.dropna()
            counts = vals.map(_num).value_counts()
            counts = counts.reindex(sorted(counts.index, key=float))  # in code order
            comments[("categorical", col)] = (
                f"integer-coded category? {coded}: one-hot; confirm, or move it to numeric"
            )
        else:
            counts = present.map(canonical).value_counts()
            counts = counts[~counts.index.isin([canonical(c) for c in missing_codes.get(col, [])])]
        categorical[col] = [str(v) for v in counts.index]
        if 2 <= len(counts) <= 60 and counts.min() >= 20:
            candidates.append(f"{col} ({len(counts)} values)")
    schema: dict[str, Any] = {
        "label": opts.label,
        "positive": pos,
        "negative": neg,
        "numeric": numeric,
        "categorical": categorical,
        "drop": drop,
        "natural_id": opts.natural_id,
        "missing_tokens": tokens,
    }
    if missing_codes:
        schema["missing_codes"] = missing_codes
    if has_missing:
        schema["missing_indicators"] = True
        comments[("schema", "missing_indicators")] = (
            f"{len(has_missing)} numeric columns have missing values ({', '.join(has_missing[:6])}"
            f"{', ...' if len(has_missing) > 6 else ''}): each gets a 0/1 indicator"
        )
    schema["encoding"] = read["encoding"]
    schema["delimiter"] = read["delimiter"]
    if decimal != ".":
        schema["decimal"] = decimal
    if thousands:
        schema["thousands"] = thousands
    schema["on_bad_rows"] = opts.on_bad_rows
    if opts.natural_id:
        problems += _natural_id(df, lines, opts, schema, drop, notes)
    if problems:
        raise SchemaError(path, problems)
    more = f", ... ({len(candidates)} in all)" if len(candidates) > 8 else ""
    notes.append(f"natural-id candidates: {', '.join(candidates[:8]) or 'none'}{more}")
    cfg = {
        "defaults": ["_tabular_defaults", "_tabular_train", "_self_"],
        "name": path.stem,
        "files": [{"path": str(path.resolve())}],
        "schema": schema,
    }
    return cfg, notes, comments


def _natural_id(
    df: pd.DataFrame, lines: np.ndarray, opts: Options, schema: dict, drop: dict, notes: list
) -> list[str]:
    """Problems of the natural-id column: blank ids, one client only, too-small clients."""
    col = opts.natural_id
    if col not in df.columns:
        close = difflib.get_close_matches(str(col), list(df.columns), n=3, cutoff=0.6)
        return [
            f"--natural-id {col!r}: no such column" + (f"; did you mean {close}?" if close else "")
        ]
    if col == opts.label:
        return [f"--natural-id {col!r} is the label"]
    problems = []
    ids = df[col].map(lambda v: v.strip() if isinstance(v, str) else "")
    blank = (ids == "").to_numpy()
    if blank.any():
        what = f"the natural id '{col}' is blank in {int(blank.sum())} rows (file lines {_lines(lines[blank])})"
        if opts.on_bad_rows == "skip":
            notes.append(f"{what}: left out (schema.on_bad_rows: skip)")
        else:
            problems.append(
                f"{what}: the run stops on them. Fill them in the file, or --on-bad-rows skip to "
                "leave those rows out (counted in the run's log)"
            )
    counts = ids[~blank].value_counts()
    if col in drop:
        notes.append(f"the natural id '{col}' names the clients but is no feature: {drop[col]}")
    if len(counts) < 2:
        problems.append(
            f"--natural-id {col!r} has {len(counts)} value(s): one client at most; pick another "
            "column, or run with partition=iid"
        )
        return problems
    floor = MIN_CLIENT_ROWS if opts.min_client_rows is None else opts.min_client_rows
    small = counts[counts < floor]
    if len(small) and opts.min_client_rows is None:
        one = [str(k) for k, n in small.items() if n == 1]
        shown = ", ".join(f"{k!r} ({n} row{'s' if n > 1 else ''})" for k, n in small.items())
        what = f"{len(one)} one-row client{'s' if len(one) > 1 else ''} and " if one else ""
        problems.append(
            f"--natural-id {col!r}: {what}{len(small)} client(s) with fewer than "
            f"{MIN_CLIENT_ROWS} rows: {shown} (a client trains on about 64% of its rows, after "
            f"the test and validation shares). --min-client-rows {MIN_CLIENT_ROWS} pools the ids "
            "with fewer rows into one client (schema.natural_id_min_rows), --min-client-rows 1 "
            "keeps them as they are; or run with partition=iid"
        )
    elif opts.min_client_rows is not None and floor <= 1:
        kept = counts[counts < MIN_CLIENT_ROWS]
        if len(kept):
            notes.append(
                f"natural ids kept as clients although under {MIN_CLIENT_ROWS} rows "
                f"(--min-client-rows {floor}): {dict(kept)}"
            )
    elif len(small):
        schema["natural_id_min_rows"] = floor
        pooled = int(small.sum())
        notes.append(
            f"natural ids with fewer than {floor} rows ({', '.join(map(str, small.index[:10]))}) "
            f"form one client, '(small ids)', of {pooled} rows (schema.natural_id_min_rows)"
        )
        if pooled < floor:
            notes.append(
                f"the pooled client '(small ids)' still has fewer than {floor} rows ({pooled}): "
                "it trains on very few rows; leave those rows out of the file, or run with "
                "partition=iid, if that matters"
            )
        left = len(counts) - len(small) + 1
        if left < 2:
            problems.append(
                f"--min-client-rows {floor} leaves one client only: lower it, or pick another id"
            )
    return problems


def _sequential(values: pd.Series) -> bool:
    """Integer values that step by 1 when sorted (row numbers, running ids)."""
    v = np.sort(values.to_numpy(dtype=np.float64))
    return bool(np.all(v == np.rint(v)) and len(v) > 2 and np.all(np.diff(v) == 1))


# ------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------
class _Dumper(yaml.SafeDumper):
    """Lists on one line (`Home: [owner, rent]`), mappings as blocks (one column a line)."""


_Dumper.add_representer(
    list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True)
)


def _key(name: str) -> str:
    """A column name as yaml.safe_dump writes it as a mapping key."""
    return yaml.safe_dump({name: 0}, allow_unicode=True, width=10**9).rstrip("\n")[: -len(": 0")]


def render(cfg: dict[str, Any], notes: list[str], comments: dict | None = None) -> str:
    """The YAML text: a header of notes, then the config with a comment at every inferred line
    (sentinel codes, coded categories, missing indicators) for the user to confirm."""
    header = "\n".join(
        f"# {n}" for n in ["Written by fedapp-schema; check it, then run it.", *notes]
    )
    body = yaml.dump(
        cfg,
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=10**9,
    )
    comments = comments or {}
    wanted = {
        (sec, f"{'    ' if sec != 'schema' else '  '}{_key(col)}:"): c
        for (sec, col), c in comments.items()
    }
    out, section = [], None
    for line in body.splitlines():
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            section = line.strip()[:-1]
        elif line.startswith("  ") and not line.startswith("   "):
            section = None
        prefix = line.split(": ", 1)[0] + ":" if ": " in line else line
        note = wanted.get((section, prefix)) or wanted.get(("schema", prefix))
        out.append(f"{line}  # {note}" if note else line)
    return f"{header}\n" + "\n".join(out) + "\n"


def write(cfg: dict[str, Any], notes: list[str], out: Path, comments: dict | None = None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(cfg, notes, comments))


def _values(given: list[str] | None) -> list[str]:
    """`--positive 1,2 --positive 3` -> ['1', '2', '3']."""
    return [v.strip() for g in given or [] for v in g.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedapp-schema", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--label", required=True)
    parser.add_argument(
        "--positive",
        action="append",
        help="label value(s) of the positive class: --positive 1,2,3,4 or the flag repeated",
    )
    parser.add_argument("--negative", action="append", help="label value(s) of the negative class")
    parser.add_argument("--natural-id", default=None, help="the column that names each client")
    parser.add_argument("--encoding", default=None, help="of the file (default: UTF-8, checked)")
    parser.add_argument("--delimiter", default=None, help="between fields (default: detected)")
    parser.add_argument("--decimal", choices=[".", ","], default=None, help="default: detected")
    parser.add_argument(
        "--thousands", choices=sorted(THOUSANDS), default=None, help="default: detected"
    )
    parser.add_argument("--missing", action="append", help="a cell text that means missing")
    parser.add_argument("--categorical", action="append", help="keep this column as categories")
    parser.add_argument("--numeric", action="append", help="keep this column numeric")
    parser.add_argument("--on-bad-rows", choices=["error", "skip"], default="error")
    parser.add_argument(
        "--min-client-rows",
        type=int,
        default=None,
        help="pool natural ids with fewer rows into one client (1: keep every id)",
    )
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.file.is_file():
        what = "is a folder, not a file" if args.file.is_dir() else "not found"
        print(f"fedapp-schema: {args.file} {what}", file=sys.stderr)
        return 2
    opts = Options(
        label=args.label,
        positive=_values(args.positive),
        negative=_values(args.negative),
        natural_id=args.natural_id,
        encoding=args.encoding,
        delimiter=args.delimiter,
        decimal=args.decimal,
        thousands=None if args.thousands is None else THOUSANDS[args.thousands],
        missing=list(args.missing or []),
        categorical=_values(args.categorical),
        numeric=_values(args.numeric),
        on_bad_rows=args.on_bad_rows,
        min_client_rows=args.min_client_rows,
    )
    try:
        cfg, notes, comments = _infer(args.file, opts)
    except SchemaError as err:
        if len(err.problems) == 1:  # one problem: one line
            print(
                f"fedapp-schema: {args.file}: {err.problems[0]} (nothing written)", file=sys.stderr
            )
            return 2
        print(
            f"fedapp-schema: {args.file}: {len(err.problems)} problems, nothing written:",
            file=sys.stderr,
        )
        for p in err.problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"fedapp-schema: {args.file}: cannot read it: {exc} (nothing written)", file=sys.stderr
        )
        return 2
    except Exception as exc:  # noqa: BLE001  a file must never end in a traceback
        print(
            f"fedapp-schema: {args.file}: cannot read it ({type(exc).__name__}: {exc}); "
            "nothing written. This is a bug in fedapp-schema: please report it with the file",
            file=sys.stderr,
        )
        return 2
    try:
        write(cfg, notes, args.output, comments)
    except OSError as exc:
        print(f"fedapp-schema: -o {args.output}: cannot write it: {exc}", file=sys.stderr)
        return 2
    print(f"[fedapp-schema] wrote {args.output}: {'; '.join(notes)}")
    for col, why in cfg["schema"]["drop"].items():
        print(f"[fedapp-schema] dropped {col or '(unnamed)'}: {why}")
    for (section, col), why in comments.items():
        print(f"[fedapp-schema] to confirm, {section} {col}: {why}")
    task = args.output.stem
    print(
        f"[fedapp-schema] run it: fedapp-run hydra.searchpath=[file://{args.output.parent.resolve().parent}] "
        f"task={task}   (the YAML must sit in a folder named task/)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
