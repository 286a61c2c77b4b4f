"""No client takes more than its share: caps on the `num-examples` a client claims.

A reply's `num-examples` is the client's own word, and FedAvg-family weights, CKKS's plaintext
weights and federated-evaluation averages are proportional to it: unchecked, one client
claiming 1e12 examples takes all of the weight. Every strategy caps each accepted claim
(`FedappStrategyMixin.cap_claims`, after screening and before any weight is computed) by
`ClaimPolicy` (the run's `claims` block, conf/config.yaml):

- **own statistics** (`stats_slack`): a client that counted its training rows in the
  preprocessing statistics before round 1 (exact statistics; not under privacy=sample_dp,
  whose counts are noised) cannot claim more than `stats_slack` x that count. Honest clients
  claim exactly that count, so this cap never changes an honest run, whatever the split
  (measured: credit's natural split has a largest client of 49.5x the median, insurance's 36x;
  no ratio to a median leaves those alone and still bounds a liar);
- **otherwise** (`max_examples_ratio`): at most that many times the median claim among this
  round's claims and the last (capped) claims of the other clients seen before (history makes
  the median robust where replies are screened one at a time: FedAsync, tiered);
- **evaluation claims** (validation rows, a share of a client's rows that the task's validation
  fraction makes about equal for every client) are also capped, under the `stats` rule, at
  EVAL_FRACTION_SLACK (2) x the median of the clients' claim / rows: an inflated evaluation
  reply weighs at most about twice an honest one in the federated-evaluation averages;
- statistics row counts are themselves clipped at `stats_max_ratio` x the clients' median before
  they are combined into the global means (fedapp/server_app.py `robust_stats`, which also
  leaves out statistics whose means or spreads no honest client has) and used as caps, so a
  client that lies in its statistics too is bounded there (a generous ratio: honest natural
  splits reach ~50x, credit's size_skew split 80x). That bound is the residual: a client
  lying consistently in its statistics and its claims can weigh up to `stats_max_ratio` x
  the median client; a federation of similar institutions can set it lower.

A capped claim is not a rejection: the reply is used with the capped number, and the client's
record says so (`num_examples_claimed`, `num_examples_cap` in clients.csv and results.json).
Pure functions here; tested without Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedapp.core.config import ConfigError

DEFAULT_STATS_SLACK = 1.0
DEFAULT_MAX_EXAMPLES_RATIO = 10.0
DEFAULT_STATS_MAX_RATIO = 100.0


class ClaimError(ConfigError):
    """An invalid `claims` setting."""


@dataclass(frozen=True)
class ClaimPolicy:
    """The `claims` config block (conf/config.yaml). 0 switches a rule off."""

    stats_slack: float = DEFAULT_STATS_SLACK
    max_examples_ratio: float = DEFAULT_MAX_EXAMPLES_RATIO
    stats_max_ratio: float = DEFAULT_STATS_MAX_RATIO

    def __post_init__(self) -> None:
        for name in ("stats_slack", "max_examples_ratio", "stats_max_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value)) or (
                value != 0 and value < 1
            ):
                raise ClaimError(f"claims.{name}={value!r}: use 0 (off) or a number >= 1")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> ClaimPolicy:
        if cfg is None:
            return cls()
        raw = dict(cfg)
        unknown = set(raw) - {"stats_slack", "max_examples_ratio", "stats_max_ratio"}
        if unknown:
            raise ClaimError(f"unknown claims settings {sorted(unknown)}")
        try:
            values = {k: float(v) for k, v in raw.items()}
        except (TypeError, ValueError) as err:
            raise ClaimError(f"claims: {err}") from None
        return cls(**values)


def clip_counts(rows: Mapping[int, float], ratio: float) -> dict[int, float]:
    """Row counts clipped at `ratio` x their median (ratio 0: unchanged)."""
    if not rows or ratio <= 0:
        return dict(rows)
    bound = ratio * float(np.median(list(rows.values())))
    return {k: min(float(v), bound) for k, v in rows.items()}


EVAL_FRACTION_SLACK = 2.0  # evaluation: a client's validation share of its rows vs the median


def claim_caps(
    claims: Mapping[int, float],
    stats_rows: Mapping[int, float],
    earlier: Mapping[int, float],
    policy: ClaimPolicy,
    phase: str = "train",
) -> dict[int, tuple[float, str]]:
    """(cap, rule) per client of `claims` (client -> claimed examples): `stats` where the
    client counted its rows in the statistics, else `median`; inf where no rule applies.

    `earlier`: the last capped claim of each client seen before (this phase), which joins this
    round's claims in the median (a client's own earlier claim is replaced by this one).
    Evaluation claims count validation rows, a share of a client's rows that is about the same
    for every client (the task's validation fraction): under the `stats` rule a client's claim
    is also capped at EVAL_FRACTION_SLACK x the median of the clients' claim / rows."""
    pool = {**dict(earlier), **dict(claims)}
    median = float(np.median(list(pool.values()))) if pool else math.inf
    shares = [v / stats_rows[p] for p, v in pool.items() if stats_rows.get(p, 0) > 0]
    share = min(1.0, EVAL_FRACTION_SLACK * float(np.median(shares))) if shares else 1.0
    out: dict[int, tuple[float, str]] = {}
    for pid in claims:
        if policy.stats_slack > 0 and pid in stats_rows:
            rows = float(stats_rows[pid])
            bound = policy.stats_slack * rows * (share if phase == "evaluate" else 1.0)
            out[pid] = (bound, "stats")
        elif policy.max_examples_ratio > 0:
            out[pid] = (policy.max_examples_ratio * median, "median")
        else:
            out[pid] = (math.inf, "")
    return out


def scale_counts(values: list[Any], factor: float) -> list[int]:
    """Whole counts (a confusion matrix) scaled by `factor` <= 1, rounded."""
    return [int(round(float(v) * factor)) for v in values]
