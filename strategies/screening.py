"""What a client's reply metrics may hold: every value the server reads is checked for type,
range and form here before any weight, average or pooled count is computed from it, so that a
broken or hostile reply is a rejected reply with its reason, never an exception in the
ServerApp. Pure functions over a reply's MetricRecord (a mapping); tested without Flower.

- every value is a number (int or float), or for `label-counts` and `eval-confusion` a list of
  numbers, finite, of at most `MAX_ABS` in magnitude (lists at most `MAX_LIST` long): 1e300 is finite, but summed with weights it
  overflows, and as a count it cannot be an integer;
- `num-examples` is a number from 1 to `MAX_EXAMPLES` (a larger claim is not a
  dataset; a merely large one is capped, strategies/claims.py);
- times, step counts and privacy numbers are non-negative; `eval_accuracy` is in [0, 1];
- `label-counts` are non-negative whole numbers;
- `eval-confusion` is a flattened k x k matrix (its length a perfect square, k at most
  `tasks.metrics.MAX_CONFUSION_CLASSES`) of non-negative whole numbers that add up to the
  claimed validation rows (`num-examples`).

Lists must also have the length the round's majority has (`list_length_refusals`): the pooled
confusion matrix and the label histograms of a round are summed element by element.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from strategies.records import NUM_EXAMPLES
from tasks.metrics import MAX_CONFUSION_CLASSES

MAX_ABS = 1e15  # the largest magnitude of any reply metric (counts, losses, seconds)
MAX_EXAMPLES = 1e15  # the largest `num-examples` taken (and then capped) at all
MAX_LIST = 100_000  # the longest list metric (a label histogram, a confusion matrix)
NON_NEGATIVE = (
    "train_steps",
    "train_time_s",
    "train_skipped_steps",
    "eval_time_s",
    "crypto_s",
    "dp_epsilon",
    "dp_target_epsilon",
    "dp_noise_multiplier",
    "dp_refine_noise_multiplier",
    "synthetic-rows",
    "synthetic-candidates",
)
UNIT_INTERVAL = ("eval_accuracy",)
WHOLE_COUNTS = ("label-counts", "eval-confusion")
LIST_KEYS = WHOLE_COUNTS  # the only list-valued metrics a client sends
CONFUSION = "eval-confusion"


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def value_refusal(key: str, value: Any) -> str | None:
    """Why one metric value is unusable (None: it is usable). Lists only where a list is
    meant (LIST_KEYS); every other metric is read as one number."""
    if key in LIST_KEYS and not isinstance(value, list):
        return f"'{key}' must be a list of counts"
    if isinstance(value, list) and key not in LIST_KEYS:
        return f"'{key}' must be a number, got a list"
    if isinstance(value, list):
        if len(value) > MAX_LIST:
            return f"'{key}' holds {len(value)} values (at most {MAX_LIST})"
        if not all(_number(v) for v in value):
            return f"'{key}' must be a list of numbers"
        arr = np.asarray(value, dtype=np.float64) if value else np.zeros(0)
        if not np.all(np.isfinite(arr)):
            return f"non-finite values in '{key}'"
        if np.any(np.abs(arr) > MAX_ABS):
            return f"values of '{key}' beyond {MAX_ABS:g}"
        if key in WHOLE_COUNTS and (np.any(arr < 0) or np.any(arr != np.rint(arr))):
            return f"'{key}' must hold non-negative whole counts"
        return None
    if not _number(value):
        return f"'{key}' must be a number, got {type(value).__name__}"
    if not math.isfinite(value):
        return f"non-finite metric '{key}'"
    if key == NUM_EXAMPLES:
        if not 1 <= value <= MAX_EXAMPLES:
            return (
                f"'{NUM_EXAMPLES}' must be a positive number up to {MAX_EXAMPLES:g}, got {value!r}"
            )
        return None
    if abs(value) > MAX_ABS:
        return f"metric '{key}' = {value:g} is beyond {MAX_ABS:g}"
    if key in NON_NEGATIVE and value < 0:
        return f"metric '{key}' = {value:g} must be non-negative"
    if key in UNIT_INTERVAL and not 0 <= value <= 1:
        return f"metric '{key}' = {value:g} must be in [0, 1]"
    return None


def metrics_refusal(metrics: Mapping[str, Any]) -> str | None:
    """Why a reply's metrics are unusable (None: usable); see the module docstring. The
    `num-examples` check comes first (its message is the one existing records carry)."""
    n = metrics.get(NUM_EXAMPLES)
    if not _number(n) or not math.isfinite(n) or n < 1:
        return f"'{NUM_EXAMPLES}' must be a positive number (at least 1), got {n!r}"
    for key in metrics:
        why = value_refusal(str(key), metrics[key])
        if why:
            return why
    confusion = metrics.get(CONFUSION)
    if confusion is not None:
        k = math.isqrt(len(confusion))
        if k * k != len(confusion) or not 1 <= k <= MAX_CONFUSION_CLASSES:
            return (
                f"'{CONFUSION}' holds {len(confusion)} values: not a k x k matrix with k of "
                f"1 to {MAX_CONFUSION_CLASSES}"
            )
        if abs(float(sum(confusion)) - float(n)) > 0.5:
            return (
                f"'{CONFUSION}' counts {float(sum(confusion)):g} rows, but the reply claims "
                f"{NUM_EXAMPLES} = {n:g}"
            )
    return None


def list_length_refusals(metrics: Sequence[Mapping[str, Any]]) -> list[str | None]:
    """Per reply, why one of its list metrics has another length than the majority of the
    replies that carry that key (None: same lengths). Ties: the shortest length wins."""
    out: list[str | None] = [None] * len(metrics)
    keys = {k for m in metrics for k, v in m.items() if isinstance(v, list)}
    for key in sorted(keys):
        lengths = Counter(len(m[key]) for m in metrics if isinstance(m.get(key), list))
        top = max(lengths.values())
        usual = min(n for n, c in lengths.items() if c == top)
        for i, m in enumerate(metrics):
            value = m.get(key)
            if out[i] is None and isinstance(value, list) and len(value) != usual:
                out[i] = f"'{key}' holds {len(value)} values where the round's replies hold {usual}"
    return out
