"""Bring your own table: `fedapp-schema FILE --label COL [--positive VALUE] [--natural-id COL]
-o PATH.yaml` writes a task YAML that runs as it is.

It reads the file the way the tabular task will (`tasks.tabular`), and infers:
- the encoding (UTF-8, else Latin-1, said in a comment) and the delimiter (`,`, `;`, tab, `|`);
- the missing-value tokens present ("", "?", "NA", "N/A", "null", "None", "-");
- each column's type: numeric when every present value is a number, else categorical with
  its vocabulary (most frequent first);
- the label's positive value (given, or the rarer of two values) and the negative one;
- columns to drop, each with its reason: constant columns, ID-like columns (every value
  distinct, or a categorical with more values than a client could learn from), and columns
  that predict the label almost perfectly on their own (single-column ROC-AUC >= 0.98 or <= 0.02:
  most likely recorded after the outcome, a leak);
- natural-id candidates (categoricals with 2 to 60 values of at least 20 rows each), listed in a
  comment; `--natural-id` picks one.

Keep the YAML anywhere: `fedapp-run hydra.searchpath=[file:///path/to/dir] task=NAME` with the
file at `/path/to/dir/task/NAME.yaml` (the same works for fedapp-inline, fedapp-sweep and the
`overrides` run-config key of `flwr run`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import roc_auc_score

from tasks.tabular import split_rows

TOKENS = ["", "?", "NA", "N/A", "n/a", "null", "NULL", "None", "-"]
DELIMITERS = [",", ";", "\t", "|"]


def sniff(raw: bytes) -> tuple[str, str, str]:
    """(encoding, delimiter, text) of a file's bytes."""
    try:
        text, encoding = raw.decode("utf-8-sig"), "utf-8-sig"
    except UnicodeDecodeError:
        text, encoding = raw.decode("latin-1"), "latin-1"
    first = text.splitlines()[0] if text else ""
    delimiter = max(DELIMITERS, key=lambda d: first.count(d))
    return encoding, (delimiter if first.count(delimiter) else ","), text


def single_column_auc(values: pd.Series, y: np.ndarray, numeric: bool) -> float | None:
    """ROC-AUC of predicting the label from this column alone (numeric: its value; categorical:
    the positive rate of its category, in sample); None when it cannot be computed."""
    present = values.notna().to_numpy()
    if present.sum() < 10 or len(np.unique(y[present])) < 2:
        return None
    if numeric:
        score = pd.to_numeric(values[present]).to_numpy(dtype=np.float64)
    else:
        v = values[present].astype(str)
        rate = pd.Series(y[present]).groupby(v.to_numpy()).mean()
        score = v.map(rate).to_numpy(dtype=np.float64)
    return float(roc_auc_score(y[present], score))


def infer(
    path: Path, label: str, positive: str | None = None, natural_id: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """(the task config, notes for the YAML's header)."""
    raw = path.read_bytes()
    encoding, delimiter, text = sniff(raw)
    header, good, wrong = split_rows(text, delimiter)  # as the tabular task splits them
    df = pd.DataFrame([r for _, r in good], columns=header, dtype=object)
    notes = [f"encoding {encoding}, delimiter {delimiter!r}, {len(df)} rows"]
    if wrong:
        notes.append(f"{len(wrong)} rows have the wrong number of fields")
    if label not in df.columns:
        raise SystemExit(f"fedapp-schema: no column {label!r}; columns are {header[:30]}")
    tokens = [t for t in TOKENS if (df == t).to_numpy().any()]
    df = df.map(lambda v: np.nan if v in tokens else v)
    labels = df[label].dropna().astype(str)
    values = labels.value_counts()
    if positive is None:
        if len(values) != 2:
            raise SystemExit(
                f"fedapp-schema: the label {label!r} has {len(values)} values "
                f"{list(values.index[:10])}; name the positive one(s) with --positive"
            )
        positive = str(values.index[-1])  # the rarer one
    negative = [str(v) for v in values.index if v != positive]
    y = (df[label].astype(str) == positive).to_numpy(dtype=np.int64)
    numeric, categorical, drop, candidates = [], {}, {}, []
    for col in header:
        if col == label:
            continue
        present = df[col].dropna()
        distinct = present.astype(str).nunique()
        if distinct <= 1:
            drop[col] = "constant"
            continue
        is_number = pd.to_numeric(present, errors="coerce").notna().all()
        if distinct == len(present) and (not is_number or _sequential(present)):
            drop[col] = "ID-like: every value distinct"
            continue
        if not is_number and distinct > max(60, len(df) // 20):
            drop[col] = f"ID-like: {distinct} distinct text values"
            continue
        auc = single_column_auc(df[col], y, bool(is_number))
        if auc is not None and (auc >= 0.98 or auc <= 0.02):
            drop[col] = (
                f"leak: predicts the label almost perfectly on its own (single-column ROC-AUC "
                f"{auc:.3f}); most likely recorded after the outcome"
            )
            continue
        if is_number:
            numeric.append(col)
        else:
            counts = present.astype(str).value_counts()
            categorical[col] = [str(v) for v in counts.index]
            if 2 <= distinct <= 60 and counts.min() >= 20:
                candidates.append(f"{col} ({distinct} values)")
    if natural_id and natural_id not in categorical and natural_id not in numeric:
        raise SystemExit(f"fedapp-schema: --natural-id {natural_id!r} is not a usable column")
    notes.append(f"natural-id candidates: {', '.join(candidates) or 'none'}")
    schema = {
        "label": label,
        "positive": [positive],
        "negative": negative,
        "numeric": numeric,
        "categorical": categorical,
        "drop": drop,
        "natural_id": natural_id,
        "missing_tokens": tokens or [""],
        "encoding": encoding,
        "delimiter": delimiter,
        "on_bad_rows": "error",
    }
    cfg = {
        "defaults": ["_tabular_defaults", "_tabular_train", "_self_"],
        "name": path.stem,
        "files": [{"path": str(path.resolve())}],
        "schema": schema,
    }
    return cfg, notes


def _sequential(values: pd.Series) -> bool:
    """Integer values that step by 1 when sorted (row numbers, running ids)."""
    v = np.sort(pd.to_numeric(values).to_numpy(dtype=np.float64))
    return bool(np.all(v == np.rint(v)) and len(v) > 2 and np.all(np.diff(v) == 1))


def write(cfg: dict[str, Any], notes: list[str], out: Path) -> None:
    header = "\n".join(
        f"# {n}" for n in ["Written by fedapp-schema; check it, then run it.", *notes]
    )
    body = yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{header}\n{body}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedapp-schema", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--label", required=True)
    parser.add_argument("--positive", default=None, help="the label value of the positive class")
    parser.add_argument("--natural-id", default=None, help="the column that names each client")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if not args.file.is_file():
        print(f"fedapp-schema: {args.file} not found", file=sys.stderr)
        return 2
    cfg, notes = infer(args.file, args.label, args.positive, args.natural_id)
    write(cfg, notes, args.output)
    dropped = cfg["schema"]["drop"]
    print(f"[fedapp-schema] wrote {args.output}: {'; '.join(notes)}")
    for col, why in dropped.items():
        print(f"[fedapp-schema] dropped {col}: {why}")
    task = args.output.stem
    print(
        f"[fedapp-schema] run it: fedapp-run hydra.searchpath=[file://{args.output.parent.resolve().parent}] "
        f"task={task}   (the YAML must sit in a folder named task/)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
