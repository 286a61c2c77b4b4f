"""Tabular tasks (credit, insurance claims, bankruptcy, medical) behind one schema-driven task.

Each task's YAML declares its files and a schema: the label and which values are positive, the
numeric and categorical columns (with their vocabularies), columns to drop and why (ids,
post-outcome fields), how missing values are written, and the natural-id column that defines
the federated clients. Loading validates the files against the schema and names the file and
column of any problem.

Preprocessing is federated-safe: no statistic is computed on pooled rows. Before training,
every client sends the sums, sums of squares and counts of its own training rows' numeric
features and its label histogram (one message, no rows); the server adds them up and sends
back the global means/standard deviations (used for scaling and mean imputation) and class
weights. Categorical vocabularies come from the schema, so no client has to reveal its values;
a value outside the vocabulary goes to an explicit "unknown" slot and is counted in the log.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from dataclasses import dataclass, field
from functools import cached_property
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from flwr.common import log
from omegaconf import DictConfig, OmegaConf
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import TensorDataset

from tasks.base import ClientData, DataError, Task
from tasks.metrics import majority_accuracy
from tasks.models import BatchNorm1d, check_norm, with_extractors
from tasks.partitioning import make_partitioner
from tasks.training import TrainSettings

LABEL, ROW = "label", "row"
NATURAL = "__natural_id__"  # the natural id, apart from any feature of the same name


# ------------------------------------------------------------------------------------------
# Schema and loading
# ------------------------------------------------------------------------------------------
@dataclass
class Schema:
    """What the columns of a table mean (from the task's YAML)."""

    label: str
    positive: list[Any]  # label values of the positive class (binary tasks)
    numeric: list[str]
    categorical: dict[str, list[str]]
    drop: dict[str, str]  # column -> why it is dropped
    natural_id: str | None
    missing_tokens: list[str]
    zero_is_missing: list[str]
    missing_indicators: bool
    numeric_transform: str  # "none" | "signed_log"
    negative: list[Any] = field(default_factory=list)  # label values of the negative class
    encoding: str = "utf-8-sig"  # of the files (checked: undecodable bytes stop the load)
    delimiter: str = ","
    on_bad_rows: str = "error"  # error | skip (skipped rows are counted in the log)
    max_abs: float = 1e12  # larger numbers are taken for corrupt cells
    decimal: str = "."  # of numeric cells: "." or ","
    thousands: str = ""  # "" (none) or the separator of digit groups: "," "." " " "'"
    missing_codes: dict[str, list[float]] = field(default_factory=dict)  # column -> codes
    natural_id_min_rows: int = 0  # ids with fewer rows are pooled into one client, SMALL_IDS
    # rows missing a value in any of these columns are left out (counted in the log), as
    # FLamby's heart-disease protocol does; [] keeps every row (missing values imputed)
    drop_missing: list[str] = field(default_factory=list)

    @classmethod
    def from_config(cls, scfg: DictConfig) -> Schema:
        c = OmegaConf.to_container(scfg, resolve=True)
        assert isinstance(c, dict)
        return cls(
            label=str(c["label"]),
            positive=[canonical(p) for p in c.get("positive") or [1]],
            numeric=["all"]
            if c.get("numeric") == "all"
            else [str(x) for x in c.get("numeric") or []],
            categorical={
                str(k): [canonical(v) for v in vs] for k, vs in (c.get("categorical") or {}).items()
            },
            drop={str(k): str(v) for k, v in (c.get("drop") or {}).items()},
            natural_id=c.get("natural_id"),
            missing_tokens=[str(t) for t in c.get("missing_tokens") or ["?", ""]],
            zero_is_missing=[str(x) for x in c.get("zero_is_missing") or []],
            missing_indicators=bool(c.get("missing_indicators", False)),
            numeric_transform=str(c.get("numeric_transform") or "none"),
            negative=[canonical(v) for v in c.get("negative") or []],
            encoding=str(c.get("encoding") or "utf-8-sig"),
            delimiter=str(c.get("delimiter") or ","),
            on_bad_rows=_choice(c.get("on_bad_rows") or "error", ("error", "skip"), "on_bad_rows"),
            max_abs=float(c.get("max_abs") or 1e12),
            decimal=_choice(c.get("decimal") or ".", (".", ","), "decimal"),
            thousands=_choice(c.get("thousands") or "", ("", ",", ".", " ", "'"), "thousands"),
            missing_codes={
                str(k): [_number(v, f"schema.missing_codes.{k}") for v in vs or []]
                for k, vs in (c.get("missing_codes") or {}).items()
            },
            natural_id_min_rows=int(c.get("natural_id_min_rows") or 0),
            drop_missing=[str(x) for x in c.get("drop_missing") or []],
        )

    def resolve_all_numeric(self, columns: list[str]) -> None:
        """`numeric: all` = every column that is not the label, categorical, dropped or the id."""
        if self.numeric == ["all"]:
            taken = {self.label, *self.categorical, *self.drop, self.natural_id}
            self.numeric = [c for c in columns if c not in taken]

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical]


def _choice(value: Any, allowed: tuple[str, ...], key: str) -> str:
    if str(value) not in allowed:
        shown = ", ".join(repr(a) for a in allowed)
        raise DataError(f"schema.{key}={value!r}: use one of {shown}")
    return str(value)


def _number(value: Any, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{key}: {value!r} is not a number") from exc


SMALL_IDS = "(small ids)"  # the client of the ids under schema.natural_id_min_rows
_SPECIAL = re.compile(r"[+-]?(inf|infinity)", re.IGNORECASE)


def parse_numbers(raw: pd.Series, decimal: str = ".", thousands: str = "") -> pd.Series:
    """Numbers of a column of strings (NaN: missing or not a number). `decimal` "." without
    `thousands` reads what pandas reads; otherwise a cell must be written in that convention
    (digit groups of three, at most one decimal mark), so that a stray '1.5' in a file of
    '1,5' is not a number rather than a silently different one."""
    if decimal == "." and not thousands:
        return pd.to_numeric(raw, errors="coerce")
    if decimal == thousands:
        raise DataError(f"schema.decimal and schema.thousands are both {decimal!r}")
    d, t = re.escape(decimal), re.escape(thousands)
    groups = rf"\d{{1,3}}(?:{t}\d{{3}})+|" if thousands else ""
    shape = re.compile(rf"[+-]?(?:{groups}\d+)(?:{d}\d*)?(?:[eE][+-]?\d+)?|[+-]?{d}\d+")
    text = raw.astype("string").str.strip()
    ok = text.str.fullmatch(shape).fillna(False) | text.str.fullmatch(_SPECIAL).fillna(False)
    if thousands:
        text = text.str.replace(thousands, "", regex=False)
    if decimal != ".":
        text = text.str.replace(decimal, ".", regex=False)
    return pd.to_numeric(text.where(ok), errors="coerce").astype(np.float64)


def canonical(value: Any) -> str:
    """Category text as compared with the vocabulary: '1.0', '1' and 1 are all '1'."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def decode_text(raw: bytes, path: Path, encoding: str) -> str:
    """The file's text in `encoding`; undecodable bytes stop the load (never replaced)."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} (byte {exc.start}) is not valid {encoding}: "
            f"{raw[exc.start : exc.end + 8]!r}; set schema.encoding to the file's encoding "
            "(e.g. latin-1 or cp1252)"
        ) from exc
    except LookupError as exc:
        raise DataError(f"schema.encoding={encoding}: not an encoding Python knows") from exc


def read_file(path: Path, schema: Schema) -> tuple[pd.DataFrame, dict[str, list[int]]]:
    """Read a CSV or an ARFF file (optionally gzipped) as strings, with missing tokens as NaN.

    Returns the frame and the file lines of rows with the wrong number of fields (short rows
    would otherwise be filled with missing values without a word)."""
    if not path.is_file():
        raise DataError(f"{path}: file not found (set FEDAPP_DATA_DIR or task.files[...].path)")
    name = path.name.lower().removesuffix(".gz")
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = decode_text(raw, path, schema.encoding)
    if name.endswith(".arff"):
        try:
            return _read_arff(text, path), {}
        except (pd.errors.ParserError, ValueError) as exc:
            raise DataError(f"{path}: cannot parse as ARFF: {exc}") from exc
    header, good, wrong = split_rows(text, schema.delimiter)
    if not header:
        raise DataError(f"{path}: the file is empty")
    if len(header) == 1 and schema.delimiter == ",":
        for sep in (";", "\t", "|"):
            if sep in header[0]:
                raise DataError(
                    f"{path}: the header is one column {header[0][:60]!r}; the file seems to be "
                    f"separated by {sep!r}: set schema.delimiter: {sep!r}"
                )
    df = pd.DataFrame([r for _, r in good], columns=header, dtype=object)
    tokens = set(schema.missing_tokens)
    df = df.map(lambda v: np.nan if v in tokens else v).astype(object)
    df.attrs["lines"] = [line for line, _ in good]  # file line of each row, for messages
    problems = {"wrong number of fields": wrong} if wrong else {}
    return df, problems


def split_rows(
    text: str, delimiter: str
) -> tuple[list[str], list[tuple[int, list[str]]], list[int]]:
    """(header, (file line, fields) of every row with the header's number of fields, file
    lines of the rows without it) of a delimited text; empty lines are skipped."""
    rows = [
        (i + 1, r)
        for i, r in enumerate(csv.reader(io.StringIO(text, newline=None), delimiter=delimiter))
        if r
    ]
    if not rows:
        return [], [], []
    header = rows[0][1]
    good = [(line, r) for line, r in rows[1:] if len(r) == len(header)]
    wrong = [line for line, r in rows[1:] if len(r) != len(header)]
    return header, good, wrong


def handle_bad_rows(path: Path, schema: Schema, problems: dict[str, list[int]]) -> None:
    """Stop with every problem named (schema.on_bad_rows: error), or log what is skipped."""
    problems = {k: v for k, v in problems.items() if v}
    if not problems:
        return
    what = "; ".join(f"{k}: {len(v)} rows, file lines {v[:8]}" for k, v in problems.items())
    if schema.on_bad_rows == "error":
        raise DataError(
            f"{path}: {what}. Fix the file, or set schema.on_bad_rows: skip to leave those rows "
            "out (they are counted in the log)"
        )
    log(WARNING, "[tabular] %s: skipping rows (schema.on_bad_rows=skip): %s", path, what)


_ARFF_ATTRIBUTE = re.compile(r"""@attribute\s+(?:'([^']*)'|"([^"]*)"|(\S+))\s+""", re.IGNORECASE)


def _read_arff(text: str, path: Path) -> pd.DataFrame:
    """Minimal ARFF reader (numeric and nominal attributes, '?' missing): what UCI ships."""
    names: list[str] = []
    data_start = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        s = line.strip()
        if s.lower().startswith("@attribute"):
            m = _ARFF_ATTRIBUTE.match(s)
            if not m:
                raise DataError(
                    f"{path}: line {i + 1}: cannot read attribute declaration {s[:80]!r}"
                )
            name = next(g for g in m.groups() if g is not None)
            # UCI's Polish file repeats some ratio names: keep them apart.
            names.append(name if name not in names else f"{name} #{names.count(name) + 1}")
        elif s.lower().startswith("@data"):
            data_start = i + 1
            break
    if data_start is None or not names:
        raise DataError(f"{path}: no @attribute/@data section; is this an ARFF file?")
    body = "\n".join(ln for ln in lines[data_start:] if ln.strip() and not ln.startswith("%"))
    df = pd.read_csv(
        io.StringIO(body),
        header=None,
        names=names,
        dtype=str,
        na_values=["?"],
        keep_default_na=False,
    )
    return df


def _missing_any(typed: pd.DataFrame, columns: list[str], path: Path) -> np.ndarray:
    """Rows missing a value in any of `columns` (numeric NaN, categorical "")."""
    unknown = [c for c in columns if c not in typed.columns]
    if unknown:
        raise DataError(f"schema.drop_missing names {unknown}, which are not features of {path}")
    mask = np.zeros(len(typed), dtype=bool)
    for col in columns:
        values = typed[col]
        mask |= values.isna().to_numpy() if values.dtype.kind == "f" else (values == "").to_numpy()
    if mask.any():
        log(INFO, "[tabular] %s: %d rows left out for missing %s", path, int(mask.sum()), columns)
    return mask


def load_frame(
    files: list[dict[str, Any]], schema: Schema, data_dir: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read, stack and validate the task's files.

    Returns the typed frame (schema columns + label) and the raw rows as read (strings), which
    is what a node's own file holds when a partition is exported for a SuperNode. Bad rows
    (wrong number of fields, no or an unknown label, a blank natural id, a non-finite or absurd
    number) stop the load with the file, lines and column named, or are skipped and counted
    when `schema.on_bad_rows: skip`.
    """
    frames, raws = [], []
    for spec in files:
        path = Path(str(spec["path"])).expanduser()
        path = path if path.is_absolute() else data_dir / path
        df, problems = read_file(path, schema)
        for col, value in (spec.get("constants") or {}).items():
            df[col] = str(value)
        schema.resolve_all_numeric(list(df.columns))
        _validate_columns(df, schema, path)
        typed, bad = _typed(df, schema, path)
        file_lines = df.attrs.get("lines") or list(range(2, len(df) + 2))
        handle_bad_rows(
            path,
            schema,
            {**problems, **{k: [file_lines[i] for i in v] for k, v in bad.items()}},
        )
        drop = sorted({i for rows in bad.values() for i in rows})
        keep = ~np.isin(np.arange(len(typed)), drop)
        if schema.drop_missing:
            keep &= ~_missing_any(typed, schema.drop_missing, path)
        frames.append(typed[keep].reset_index(drop=True))
        raws.append(df[keep].reset_index(drop=True))
    frame = pd.concat(frames, ignore_index=True)
    if frame.empty:
        raise DataError(f"{[f['path'] for f in files]}: no rows")
    if schema.natural_id and schema.natural_id_min_rows > 1:
        counts = frame[NATURAL].value_counts()
        small = counts[counts < schema.natural_id_min_rows]
        if len(small):
            log(
                WARNING,
                "[tabular] natural ids with fewer than schema.natural_id_min_rows=%d rows are "
                "one client, '%s': %s",
                schema.natural_id_min_rows,
                SMALL_IDS,
                small.to_dict(),
            )
            frame[NATURAL] = frame[NATURAL].where(~frame[NATURAL].isin(small.index), SMALL_IDS)
    return frame, pd.concat(raws, ignore_index=True)


def _validate_columns(df: pd.DataFrame, schema: Schema, path: Path) -> None:
    if schema.label not in df.columns:
        raise DataError(
            f"{path}: label column '{schema.label}' not found; columns are {list(df.columns)[:30]}"
        )
    needed = [*schema.features] + ([schema.natural_id] if schema.natural_id else [])
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise DataError(f"{path}: columns {missing} declared in the schema are missing")
    if df.empty:
        raise DataError(f"{path}: the file has a header but no rows")


def _typed(
    df: pd.DataFrame, schema: Schema, path: Path
) -> tuple[pd.DataFrame, dict[str, list[int]]]:
    """The typed frame, and the positions of rows that must not be used silently, by reason."""
    out = pd.DataFrame(index=df.index)
    bad: dict[str, list[int]] = {}

    def lines(mask) -> list[int]:
        return [int(i) for i in np.flatnonzero(np.asarray(mask))]

    for col in schema.numeric:
        raw = df[col]
        num = parse_numbers(raw, schema.decimal, schema.thousands)
        wrong = raw.notna() & num.isna()
        if wrong.any():
            examples = sorted(set(raw[wrong].astype(str)))[:5]
            where = [int(x) for x in np.asarray(df.attrs.get("lines") or df.index + 2)[wrong][:5]]
            raise DataError(
                f"{path}: column '{col}' must be numeric (schema.decimal {schema.decimal!r}, "
                f"schema.thousands {schema.thousands!r}), found {int(wrong.sum())} values like "
                f"{examples} (file lines {where}); "
                "declare it categorical or add the token to schema.missing_tokens"
            )
        if col in schema.missing_codes:
            num = num.mask(num.isin(schema.missing_codes[col]))
        absurd = num.notna() & ~(num.abs() <= schema.max_abs)  # inf, -inf, 1e300
        if absurd.any():
            bad[
                f"non-finite or absurd (|x| > schema.max_abs={schema.max_abs:g}) numbers in '{col}'"
            ] = lines(absurd)
            num = num.mask(absurd)
        if col in schema.zero_is_missing:
            num = num.mask(num == 0)
        if schema.numeric_transform == "signed_log":
            num = np.sign(num) * np.log1p(num.abs())
        elif schema.numeric_transform != "none":
            raise DataError(
                f"schema.numeric_transform={schema.numeric_transform}: use none or signed_log"
            )
        out[col] = num.astype(np.float64)
    for col in schema.categorical:
        codes = {canonical(v) for v in schema.missing_codes.get(col, [])}
        out[col] = [
            canonical(v) if isinstance(v, str) and canonical(v) not in codes else ""
            for v in df[col]
        ]
    labels = df[schema.label]
    if labels.isna().any():
        bad[f"no label in '{schema.label}'"] = lines(labels.isna())
    out[LABEL] = [canonical(v) if isinstance(v, str) else "" for v in labels]
    unknown = _unknown_labels(out[LABEL], schema, path)
    if unknown.any():
        values = sorted(set(out[LABEL][unknown]))[:5]
        bad[f"label values {values} outside schema.positive/negative"] = lines(unknown)
    if schema.natural_id:
        ids = df[schema.natural_id]
        blank = ids.isna() | (ids.astype(str).str.strip() == "")
        if blank.any():
            bad[f"blank natural id '{schema.natural_id}'"] = lines(blank)
        out[NATURAL] = [str(v).strip() if isinstance(v, str) else "" for v in ids]
    return out, bad


def _unknown_labels(labels: pd.Series, schema: Schema, path: Path) -> np.ndarray:
    """Rows whose label is neither positive nor negative. Without `schema.negative`, the one
    value that is not positive is the negative class; several such values are an error (a
    third label value must not be counted as negative without a word)."""
    present = labels != ""
    positive = set(schema.positive)
    if schema.negative:
        return np.asarray(present & ~labels.isin(positive | set(schema.negative)))
    others = sorted(set(labels[present]) - positive)
    if len(others) > 1:
        counts = labels[labels.isin(others)].value_counts().to_dict()
        raise DataError(
            f"{path}: the label '{schema.label}' has values {counts} besides the positive "
            f"{sorted(positive)}; list the negative one(s) in schema.negative (rows with other "
            "values then stop the load, or are skipped with schema.on_bad_rows: skip)"
        )
    return np.zeros(len(labels), dtype=bool)


# ------------------------------------------------------------------------------------------
# Encoding and features
# ------------------------------------------------------------------------------------------
@dataclass
class Rows:
    """A client's rows before preprocessing: numerics (NaN = missing), category codes, labels."""

    numeric: np.ndarray  # float64 (n, num_numeric)
    codes: np.ndarray  # int64 (n, num_categorical); code len(vocab) = unknown
    y: np.ndarray  # int64 (n,)

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> Rows:
        return Rows(self.numeric[idx], self.codes[idx], self.y[idx])


def encode(frame: pd.DataFrame, schema: Schema, num_classes: int) -> tuple[Rows, dict[str, int]]:
    """Frame -> Rows; also returns how many values fell outside each vocabulary.

    Category codes: 0..K-1 = the schema's vocabulary, K = a value outside it ("unknown"),
    K+1 = missing. Unknown values are counted and logged; missing ones are expected.
    """
    numeric = (
        frame[schema.numeric].to_numpy(dtype=np.float64)
        if schema.numeric
        else np.zeros((len(frame), 0))
    )
    codes = np.zeros((len(frame), len(schema.categorical)), dtype=np.int64)
    unknown: dict[str, int] = {}
    for j, (col, vocab) in enumerate(schema.categorical.items()):
        index = {v: i for i, v in enumerate(vocab)}
        index[""] = len(vocab) + 1  # missing
        c = np.array([index.get(v, len(vocab)) for v in frame[col]], dtype=np.int64)
        if n_unknown := int((c == len(vocab)).sum()):
            unknown[col] = n_unknown
        codes[:, j] = c
    if num_classes != 2:
        raise DataError(
            "tabular tasks are binary; list the positive label values in schema.positive"
        )
    positive = set(schema.positive)  # every other value is the negative class (checked on load)
    y = np.array([v in positive for v in frame[LABEL]], dtype=np.int64)
    return Rows(numeric, codes, y), unknown


def numeric_stats(
    rows: Rows, num_classes: int, clip: float | None = None
) -> dict[str, list[float]]:
    """Per-client sufficient statistics (no rows): counts, sums, sums of squares, labels;
    values clipped to [-clip, clip] first when `clip` is given."""
    x = rows.numeric if clip is None else np.clip(rows.numeric, -clip, clip)
    present = ~np.isnan(x)
    xz = np.where(present, x, 0.0)
    return {
        "stats.count": present.sum(axis=0).astype(float).tolist(),
        "stats.sum": xz.sum(axis=0).tolist(),
        "stats.sumsq": (xz**2).sum(axis=0).tolist(),
        "stats.labels": np.bincount(rows.y, minlength=num_classes).astype(float).tolist(),
    }


def screen_stats(
    stats: dict[str, list[float]], d: int, k: int, max_abs: float, noisy: bool = False
) -> str | None:
    """Why a client's sufficient statistics cannot be added up (None: they can), screened as
    updates are: the keys and lengths of the schema, finite values, and (exact statistics)
    non-negative whole counts, means within `max_abs` and non-negative variances. A rogue or
    broken client's inf or 1e300 would otherwise make every global mean inf."""
    shape = {"stats.count": d, "stats.sum": d, "stats.sumsq": d, "stats.labels": k}
    if set(stats) != set(shape) or any(len(stats[key]) != n for key, n in shape.items()):
        return f"statistics must be {shape} values, got { {k2: len(v) for k2, v in stats.items()} }"
    values = {key: np.asarray(v, dtype=np.float64) for key, v in stats.items()}
    if not all(np.all(np.isfinite(v)) for v in values.values()):
        return "non-finite statistics"
    if noisy:  # DP noise: anything finite is possible; the combination clamps
        return None
    count, labels = values["stats.count"], values["stats.labels"]
    if np.any(count < 0) or np.any(labels < 0) or np.any(count != np.rint(count)):
        return "counts must be non-negative whole numbers"
    if labels.sum() < 1:
        return "no training rows"
    if np.any(count > labels.sum()):  # a column's non-missing values: at most the rows
        return f"feature counts above the {labels.sum():g} rows of the label histogram"
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(count > 0, values["stats.sum"] / count, 0.0)
        var = np.where(count > 0, values["stats.sumsq"] / count - mean**2, 0.0)
    if np.any(np.abs(mean) > max_abs) or np.any(var < -1e-6 * np.maximum(mean**2, 1.0)):
        return f"means beyond schema.max_abs={max_abs:g} or negative variances"
    if np.any(var > max_abs**2):  # values within +-max_abs cannot spread wider
        return f"variances beyond schema.max_abs={max_abs:g} squared"
    return None


def combine_stats(stats: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Sum clients' statistics into global means, standard deviations and class weights."""
    if not stats:
        raise DataError("no client sent preprocessing statistics; cannot scale features")
    total = {
        k: np.sum([np.asarray(s[k], dtype=np.float64) for s in stats], axis=0) for k in stats[0]
    }
    count = np.maximum(total["stats.count"], 0.0)  # noisy (DP) counts can be negative
    mean = np.divide(total["stats.sum"], count, out=np.zeros_like(count), where=count > 0)
    var = np.divide(total["stats.sumsq"], count, out=np.ones_like(count), where=count > 0) - mean**2
    std = np.sqrt(np.clip(var, 0.0, None))
    std = np.where(std > 1e-12, std, 1.0)
    labels = np.maximum(total["stats.labels"], 1.0)  # noisy (DP) counts can be <= 0
    n, k = labels.sum(), len(labels)
    weights = np.where(labels > 0, n / (k * np.maximum(labels, 1)), 0.0)  # "balanced" weights
    return {
        "prep.mean": mean.tolist(),
        "prep.std": std.tolist(),
        "prep.class_weights": weights.tolist(),
        "prep.label_counts": labels.tolist(),
    }


def featurize(rows: Rows, schema: Schema, prep: dict[str, list[float]]) -> TensorDataset:
    """Scale (global mean/std), mean-impute, add missing indicators, one-hot categoricals."""
    mean = np.asarray(prep["prep.mean"], dtype=np.float64)
    std = np.asarray(prep["prep.std"], dtype=np.float64)
    missing = np.isnan(rows.numeric)
    z = np.where(missing, 0.0, (np.nan_to_num(rows.numeric) - mean) / std)
    parts = [z]
    if schema.missing_indicators:
        parts.append(missing.astype(np.float64))
    for j, vocab in enumerate(schema.categorical.values()):
        onehot = np.zeros((len(rows), len(vocab) + 2))  # vocabulary, unknown, missing
        onehot[np.arange(len(rows)), rows.codes[:, j]] = 1.0
        parts.append(onehot)
    x = np.concatenate(parts, axis=1) if parts else np.zeros((len(rows), 0))
    return TensorDataset(torch.from_numpy(x.astype(np.float32)), torch.from_numpy(rows.y))


def feature_dim(schema: Schema) -> int:
    if schema.numeric == ["all"]:  # a bug in the caller, not in the user's input
        raise RuntimeError(
            "schema `numeric: all` is resolved from a file's columns: read one first"
        )
    n = len(schema.numeric)
    return n * (2 if schema.missing_indicators else 1) + sum(
        len(v) + 2 for v in schema.categorical.values()
    )


# ------------------------------------------------------------------------------------------
# Models and losses
# ------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Linear layers with ReLU and dropout; `norm="batch"`: BatchNorm after each hidden
    linear layer (for FedBN; strategies/personal.py)."""

    def __init__(
        self, dim: int, hidden: list[int], num_classes: int, dropout: float, norm: str = "none"
    ) -> None:
        super().__init__()
        batch = check_norm(norm) == "batch"
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(dim, h), *([BatchNorm1d(h)] if batch else [])]
            layers += [nn.ReLU(), nn.Dropout(dropout)]
            dim = h
        layers.append(nn.Linear(dim, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): down-weights easy examples; `weight` as in CrossEntropy."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits, dim=1)
        logp_t = logp.gather(1, target[:, None]).squeeze(1)
        loss = -((1 - logp_t.exp()) ** self.gamma) * logp_t
        if self.weight is not None:
            w = self.weight[target]
            return (loss * w).sum() / w.sum().clamp_min(1e-12)
        return loss.mean()


# ------------------------------------------------------------------------------------------
# Task
# ------------------------------------------------------------------------------------------
class TabularTask(Task):
    """A binary classification table behind the common task interface."""

    needs_stats = True
    headline_metric = "roc_auc"

    def __init__(self, cfg: DictConfig, data_dir: Path) -> None:
        super().__init__(cfg, data_dir)
        self.name = str(self.task_cfg.name)
        self.seed = int(cfg.seed)
        self.num_classes = 2
        self.schema = Schema.from_config(self.task_cfg.schema)
        privacy = cfg.get("privacy")
        if privacy is not None and privacy.get("name") == "sample_dp":
            # DP statistics need bounded contributions: squash every value row by row (no
            # pooled statistic), then clip it (fedapp.features.privacy)
            self.schema.numeric_transform = "signed_log"
        self._partitioner = None
        self._test_file_rows: Rows | None = None

    # -- the pooled files, read on first use ---------------------------------------------------
    # A deployed SuperNode reads its own file only (`load_node_data`) and never touches these:
    # an institution has its own rows and nothing else. Simulation, partitioning, the
    # centralized baseline and (without `test_file`) the server's test set read them.
    @cached_property
    def _pooled(self) -> tuple[pd.DataFrame, pd.DataFrame, Rows, np.ndarray, np.ndarray]:
        files = OmegaConf.to_container(self.task_cfg.files, resolve=True)
        assert isinstance(files, list)
        frame, raw = load_frame(files, self.schema, self.data_dir)
        rows = self._encode(frame)
        if len(np.unique(rows.y)) < 2:
            raise DataError(
                f"task {self.name}: the label has one class only; check schema.positive"
            )
        train_idx, test_idx = train_test_split(
            np.arange(len(rows)),
            test_size=float(self.task_cfg.test_fraction),
            random_state=self.seed,
            stratify=rows.y,
        )
        return frame, raw, rows, train_idx, test_idx

    def _encode(self, frame: pd.DataFrame) -> Rows:
        rows, unknown = encode(frame, self.schema, self.num_classes)
        for col, n in unknown.items():
            log(
                WARNING,
                "[%s] %d values of '%s' are outside the schema vocabulary (-> unknown)",
                self.name,
                n,
                col,
            )
        return rows

    @property
    def frame(self) -> pd.DataFrame:
        return self._pooled[0]

    @property
    def raw(self) -> pd.DataFrame:
        return self._pooled[1]

    @property
    def rows(self) -> Rows:
        return self._pooled[2]

    @property
    def train_idx(self) -> np.ndarray:
        return self._pooled[3]

    @property
    def test_idx(self) -> np.ndarray:
        return self._pooled[4]

    # -- partitioning through flwr-datasets -----------------------------------------------------
    @property
    def partitioner(self):
        if self._partitioner is None:
            if self.cfg.partition.name == "natural" and not self.schema.natural_id:
                raise DataError(
                    f"task {self.name} declares no natural_id; use partition=iid or dirichlet"
                )
            n = self.cfg.partition.get("num_partitions")
            if self.cfg.partition.name != "natural" and n and int(n) > len(self.train_idx):
                raise DataError(
                    f"partition.num_partitions={n} is more than the {len(self.train_idx)} "
                    f"training rows of task {self.name}; use at most "
                    f"{len(self.train_idx) // 10} (ten rows per client)"
                )
            cols = {ROW: self.train_idx.tolist(), LABEL: self.rows.y[self.train_idx].tolist()}
            if self.schema.natural_id:
                cols[NATURAL] = self.frame[NATURAL].to_numpy()[self.train_idx].tolist()
            p = make_partitioner(
                self.cfg.partition,
                natural_id=NATURAL if self.schema.natural_id else ROW,
                label=LABEL,
                seed=self.seed,
            )
            p.dataset = Dataset.from_dict(cols).shuffle(seed=self.seed)
            self._partitioner = p
        return self._partitioner

    def num_partitions(self) -> int:
        return int(self.partitioner.num_partitions)

    def partition_rows(self, partition_id: int) -> np.ndarray:
        n = self.num_partitions()
        if not 0 <= partition_id < n:
            raise DataError(f"partition-id {partition_id} is out of range: {n} clients")
        return np.asarray(self.partitioner.load_partition(partition_id)[ROW], dtype=np.int64)

    def _client_data(self, rows: Rows) -> ClientData:
        if len(rows) == 0:
            raise DataError("client partition is empty; use fewer partitions or a larger alpha")
        frac = float(self.task_cfg.client_val_fraction)
        idx = np.arange(len(rows))
        if frac > 0 and len(rows) >= 5:
            counts = np.bincount(rows.y, minlength=self.num_classes)
            strat = rows.y if counts.min() >= 2 else None
            tr, va = train_test_split(idx, test_size=frac, random_state=self.seed, stratify=strat)
        else:
            tr, va = idx, idx[:0]
        train, val = rows.take(tr), rows.take(va)
        return ClientData(
            train=train, val=val, label_counts=np.bincount(train.y, minlength=self.num_classes)
        )

    def with_labels(self, data: ClientData, mapping: np.ndarray) -> ClientData:
        rows = data.train
        y = np.asarray(mapping)[rows.y].astype(rows.y.dtype)
        return ClientData(
            train=Rows(rows.numeric, rows.codes, y),
            val=data.val,
            label_counts=np.bincount(y, minlength=self.num_classes),
        )

    def load_partition(self, partition_id: int) -> ClientData:
        return self._client_data(self.rows.take(self.partition_rows(partition_id)))

    def load_node_data(self, path: Path) -> ClientData:
        files = [{"path": str(path)}]
        frame, _ = load_frame(files, self.schema, self.data_dir)
        rows, _ = encode(frame, self.schema, self.num_classes)
        return self._client_data(rows)

    node_file_suffix = ".csv"

    def export_partitions(self, partition_ids: list[int], path: Path) -> int:
        idx = np.concatenate([self.partition_rows(j) for j in partition_ids])
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_raw(self.raw.iloc[idx], path)
        return len(idx)

    def _write_raw(self, raw: pd.DataFrame, path: Path) -> None:
        """Rows as read, in a file the task's schema reads back the same (its delimiter and
        encoding; missing cells as one of its missing tokens)."""
        tokens = self.schema.missing_tokens
        raw.to_csv(
            path,
            index=False,
            sep=self.schema.delimiter,
            encoding="utf-8" if self.schema.encoding == "utf-8-sig" else self.schema.encoding,
            na_rep="" if "" in tokens or not tokens else tokens[0],
        )

    def export_central_test(self, path: Path) -> Path:
        """Write the server's test rows (as read) to `path`, a file `task.test_file` reads."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_raw(self.raw.iloc[self.test_idx], path)
        return path

    @property
    def test_file(self) -> str:
        """The operator's own labelled file the server tests on (`task.test_file`), if any."""
        return str(self.task_cfg.get("test_file") or "")

    def load_central_test(self) -> Rows:
        if not self.test_file:
            return self.rows.take(self.test_idx)
        if self._test_file_rows is None:
            frame, _ = load_frame([{"path": self.test_file}], self.schema, self.data_dir)
            self._test_file_rows = self._encode(frame)
        return self._test_file_rows

    def load_centralized_train(self) -> Rows:
        return self.rows.take(self.train_idx)

    def test_labels(self) -> np.ndarray:
        return self.load_central_test().y

    def dataset_labels(self, dataset: Rows) -> np.ndarray:
        return dataset.y

    def central_test_subset(self, positions: np.ndarray) -> Rows:
        return self.load_central_test().take(positions)

    # -- federated preprocessing --------------------------------------------------------------
    def client_stats(self, data: ClientData, clip: float | None = None) -> dict[str, list[float]]:
        return numeric_stats(data.train, self.num_classes, clip)

    def natural_ids(self, partition_id: int) -> list[str]:
        if not self.schema.natural_id or self.cfg.partition.name != "natural":
            return []
        rows = self.partition_rows(partition_id)
        return sorted(set(self.frame[NATURAL].to_numpy()[rows].tolist()))

    def aggregate_stats(self, stats: list[dict[str, list[float]]]) -> dict[str, list[float]]:
        return combine_stats(stats)

    def screen_stats(self, stats: dict[str, list[float]]) -> str | None:
        privacy = self.cfg.get("privacy")
        noisy = privacy is not None and privacy.get("name") == "sample_dp"
        return screen_stats(
            stats, len(self.schema.numeric), self.num_classes, self.schema.max_abs, noisy
        )

    def majority_accuracy(
        self, prep: dict[str, list[float]] | None, test_labels: np.ndarray | None = None
    ) -> float:
        counts = np.asarray(
            (prep or {}).get("prep.label_counts") or np.bincount(self.rows.y[self.train_idx])
        )
        return majority_accuracy(counts, self.test_labels() if test_labels is None else test_labels)

    # -- model, training, evaluation -----------------------------------------------------------
    def make_model(self) -> nn.Module:
        dim = feature_dim(self.schema)
        kind = str(self.task_cfg.model)
        if kind == "logreg":
            if self.task_cfg.get("fenda", False):
                raise DataError("task.fenda=true needs feature extractors: use task.model=mlp")
            return MLP(dim, [], self.num_classes, 0.0)
        if kind == "mlp":
            mlp = MLP(
                dim,
                [int(h) for h in self.task_cfg.hidden],
                self.num_classes,
                float(self.task_cfg.dropout),
                str(self.task_cfg.get("norm") or "none"),
            )
            return with_extractors(mlp, bool(self.task_cfg.get("fenda", False)))
        raise DataError(f"task.model={kind}: use mlp or logreg")

    def loss_fn(self, prep: dict[str, list[float]] | None) -> nn.Module:
        kind = str(self.task_cfg.loss)
        weights = None
        if kind in ("weighted_ce", "focal") and prep and "prep.class_weights" in prep:
            weights = torch.tensor(prep["prep.class_weights"], dtype=torch.float32)
        if kind == "focal":
            return FocalLoss(float(self.task_cfg.focal_gamma), weights)
        if kind in ("ce", "weighted_ce"):
            return nn.CrossEntropyLoss(weight=weights)
        raise DataError(f"task.loss={kind}: use ce, weighted_ce or focal")

    def _prep(self, prep: dict[str, list[float]] | None) -> dict[str, list[float]]:
        if not prep or "prep.mean" not in prep:
            raise DataError(
                f"task {self.name} needs the federated preprocessing statistics (prep.*)"
            )
        return prep

    eval_batch_size = 2048

    def train_dataset(self, data: ClientData, settings: TrainSettings, prep) -> TorchDataset:
        return featurize(data.train, self.schema, self._prep(prep))

    def eval_dataset(self, dataset: Rows, prep) -> TorchDataset:
        return featurize(dataset, self.schema, self._prep(prep))
