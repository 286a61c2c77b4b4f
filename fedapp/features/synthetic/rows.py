"""Synthetic rows on the wire (`rows_record` on the client, `screen_rows` on the server), the
generator's fingerprint, and the quality report of rows against real ones."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
)

from fedapp.core import seeds
from fedapp.features.synthetic.model import (
    Layout,
)
from fedapp.features.synthetic.spec import (
    ROW_KEYS,
)

# -- rows on the wire --------------------------------------------------------------------------


def rows_record(rows, prep: Mapping[str, list[float]]) -> ArrayRecord:
    """Synthetic rows as they travel: numerics as float16 z-scores (the federation's means and
    standard deviations; within +-zclip, where float16 keeps about three digits; NaN =
    missing), category codes and labels as int8 (int16 for vocabularies over 125 values)."""
    mu = np.asarray(prep["prep.mean"], dtype=np.float64)
    sd = np.asarray(prep["prep.std"], dtype=np.float64)
    codes = rows.codes
    code_type = np.int8 if codes.size == 0 or codes.max() < 127 else np.int16
    return ArrayRecord(
        {
            "numeric": Array(np.ascontiguousarray((rows.numeric - mu) / sd, dtype=np.float16)),
            "codes": Array(np.ascontiguousarray(codes, dtype=code_type)),
            "y": Array(np.ascontiguousarray(rows.y, dtype=np.int8)),
        }
    )


def screen_rows(
    record: ArrayRecord,
    layout: Layout,
    prep: Mapping[str, list[float]],
    zclip: float,
    max_rows: int,
):
    """(Rows, None) for a client's synthetic rows that respect the schema, else (None, why):
    the three arrays with consistent shapes, at most `max_rows` rows, numerics finite or
    missing and within +-zclip standard deviations, codes in the vocabulary or missing,
    labels valid. A broken or hostile client's rows are refused whole, never repaired."""
    from tasks.tabular import Rows

    if set(record.keys()) != set(ROW_KEYS):
        return None, f"rejected: synthetic rows must be the arrays {list(ROW_KEYS)}"
    z, codes, y = (record[k].numpy() for k in ROW_KEYS)
    n = len(y)
    if y.ndim != 1 or z.shape != (n, layout.numeric) or codes.shape != (n, len(layout.categories)):
        return None, (
            f"rejected: synthetic rows have shapes numeric {z.shape}, codes {codes.shape}, "
            f"y {y.shape}; the schema has {layout.numeric} numeric and "
            f"{len(layout.categories)} categorical columns"
        )
    if not 0 < n <= max_rows:
        return None, f"rejected: {n} synthetic rows (expected 1 to max_rows={max_rows})"
    z = z.astype(np.float64)
    if np.isinf(z).any():
        return None, "rejected: infinite numeric values in synthetic rows"
    with np.errstate(invalid="ignore"):
        beyond = np.abs(z) > zclip * (1 + 1e-3)
    if beyond.any():
        return None, f"rejected: numeric values beyond +-{zclip:g} std in synthetic rows"
    if not layout.indicators and np.isnan(z).any():
        return None, "rejected: missing numerics, but the schema has no missing indicators"
    sizes = np.asarray(layout.categories, dtype=np.int64)
    codes = codes.astype(np.int64)
    if codes.size and ((codes < 0).any() or (codes > sizes + 1).any() or (codes == sizes).any()):
        return None, "rejected: category codes outside the vocabulary in synthetic rows"
    y = y.astype(np.int64)
    if ((y < 0) | (y >= layout.num_classes)).any():
        return None, "rejected: label values outside the task's classes in synthetic rows"
    mu = np.asarray(prep["prep.mean"], dtype=np.float64)
    sd = np.asarray(prep["prep.std"], dtype=np.float64)
    return Rows(z * sd + mu, codes, y), None


def concat_rows(parts: list):
    from tasks.tabular import Rows

    return Rows(
        np.concatenate([p.numeric for p in parts]),
        np.concatenate([p.codes for p in parts]),
        np.concatenate([p.y for p in parts]),
    )


def generator_digest(arrays: ArrayRecord) -> str:
    """A fingerprint of the generator's weights: a client's cached copy is used only when it is
    the generator the server means (an integrity check across rounds and resumed runs, not a
    security measure; the transport is authenticated by TLS)."""
    h = hashlib.sha256()
    for name, arr in arrays.items():
        h.update(f"{name}|{arr.dtype}|{arr.shape}|".encode())
        h.update(arr.data)
    return h.hexdigest()[:16]


# -- quality of synthetic rows (reports; never a privacy guarantee) ---------------------------------


def feature_matrix(task, rows, prep) -> np.ndarray:
    from tasks.tabular import featurize

    return featurize(rows, task.schema, dict(prep)).tensors[0].numpy().astype(np.float64)


def closest_distances(a: np.ndarray, b: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each row of `a`, the Euclidean distance to its closest row of `b`."""
    tb = torch.from_numpy(b)
    out = [
        torch.cdist(torch.from_numpy(a[i : i + chunk]), tb).min(dim=1).values
        for i in range(0, len(a), chunk)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0)


def quality(synth, real, task, prep, max_rows: int = 3000, seed: int = 0) -> dict[str, Any]:
    """How close synthetic rows are to real ones, column by column, and how close each is to
    its nearest real record (in the task model's feature space: scaled numerics, indicators,
    one-hot categories; up to `max_rows` of each, drawn with `seed`):

    - `ks_numeric`: per numeric column, the Kolmogorov-Smirnov statistic between the present
      values (0 = same distribution, 1 = disjoint); `missing_rate_gap` the difference of the
      shares of missing values;
    - `tv_categorical` and `tv_label`: total-variation distance of the category and label
      frequencies (0 = same, 1 = disjoint);
    - `dcr`: distance from each synthetic row to the closest real row (median and 5th
      percentile). Small distances to members with larger ones to non-members would suggest
      copied records; bench/synthetic.py compares the two."""
    from scipy.stats import ks_2samp

    schema = task.schema
    ks, gaps = {}, {}
    for j, col in enumerate(schema.numeric):
        a, b = synth.numeric[:, j], real.numeric[:, j]
        pa, pb = a[~np.isnan(a)], b[~np.isnan(b)]
        ks[col] = float(ks_2samp(pa, pb).statistic) if len(pa) and len(pb) else 1.0
        gaps[col] = float(abs(np.isnan(a).mean() - np.isnan(b).mean()))
    tv = {}
    for j, (col, vocab) in enumerate(schema.categorical.items()):
        ca = np.bincount(synth.codes[:, j], minlength=len(vocab) + 2) / max(len(synth), 1)
        cb = np.bincount(real.codes[:, j], minlength=len(vocab) + 2) / max(len(real), 1)
        tv[col] = float(0.5 * np.abs(ca - cb).sum())
    k = int(task.num_classes)
    la = np.bincount(synth.y, minlength=k) / max(len(synth), 1)
    lb = np.bincount(real.y, minlength=k) / max(len(real), 1)
    rng = seeds.rng("synthetic.quality", seed)
    sa = rng.permutation(len(synth))[:max_rows]
    sb = rng.permutation(len(real))[:max_rows]
    d = closest_distances(
        feature_matrix(task, synth.take(sa), prep), feature_matrix(task, real.take(sb), prep)
    )
    return {
        "rows": int(len(synth)),
        "real_rows": int(len(real)),
        "ks_numeric_mean": float(np.mean(list(ks.values()))) if ks else None,
        "tv_categorical_mean": float(np.mean(list(tv.values()))) if tv else None,
        "tv_label": float(0.5 * np.abs(la - lb).sum()),
        "dcr_median": float(np.median(d)) if len(d) else None,
        "dcr_p05": float(np.percentile(d, 5)) if len(d) else None,
        "ks_numeric": ks,
        "missing_rate_gap": gaps,
        "tv_categorical": tv,
    }
