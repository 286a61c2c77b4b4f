"""Adaptive trust weighting: clients whose updates look inconsistent, insane or low-quality lose
aggregation weight, and keep losing it while they misbehave.

Aggregation weight of client k in round t is proportional to ``n_k * alpha_k(t)``:

- **votes**: every robust statistic of the round (the reference, the median norm, the median
  and spread of the cosines) weighs client k with ``v_k = trust_k(t-1) * n_k ** vote_power``
  (new clients with `new_client_prior` for the trust), so that caught attackers cannot take
  over the median in a round where they happen to be many, and so that on a skewed natural
  split the few clients that hold most of the data are not outvoted by many small ones
  (``vote_power = 0``, one client one vote, made the small clients' direction the reference:
  the large honest clients scored low, lost their votes and weight round after round, and the
  model learned from 4% of the data). 1/2 is between one vote per client and one per example:
  an inflated claim, already capped by the run's `claims`, buys sqrt(cap) votes.
- **consistency** ``c_k``: cosine of the client's update to a robust reference direction (the
  vote-weighted coordinate-wise median of this round's updates, or a trimmed mean), judged
  against the round's spread: with m the vote-weighted median cosine and
  s = max(1.4826 * weighted MAD, `consistency_spread_min`), z_k = (m - cos_k) / s; the score is
  1 up to z = `consistency_z`, falls linearly to 0 at twice that. Honest heterogeneity (a wide
  spread of cosines, non-IID data) is not punished: when no client is an outlier every score
  is 1 and the weights are n_k's; an update that points far away from the pack (sign-flipped,
  random noise, a free rider's zero) scores 0.
- **sanity** ``s_k``: the update norm relative to the round's (trust-weighted) median norm, r_k. Inside
  [norm_low, norm_high] the score is 1; below it falls linearly to 0 at r = 0 (free riders that
  send the model back unchanged); above it decays as norm_high / r. Updates longer than
  norm_high * median are also clipped to that length before averaging, so a trusted client
  cannot be used to boost a single large update. NaN/Inf updates never get here: the
  strategy mixin rejects them outright.
- **quality** ``q_k`` from what the client reports (untrusted, so it can only lower weight, by
  at most `quality_weight`): a training loss far above the round's (robust z-score over
  `loss_z`) and a label histogram that does not add up to the claimed number of examples.
- **history**: ``alpha_k(t) = ema * alpha_k(t-1) + (1 - ema) * c_k s_k q_k``, starting at the
  first round's score. One bad round halves (ema = 0.5) a good record instead of erasing it; a
  client that turns bad is down to 1/8 of its weight after three rounds.
- ``n_k`` is the client's claim as capped for every strategy (strategies/claims.py: at most
  its own statistics count, else a ratio to the median claim) before trust sees it;
  `max_examples_ratio` caps it once more at that many times the round's median in the pure
  math (`trust_weights`, by default), which the strategy leaves to the run's `claims` caps
  (a second median cap would cut the honest large clients of skewed natural splits).

Identical clients get ``alpha = 1`` and the aggregate is FedAvg's, bit for bit (tested). The
math is pure NumPy over flattened updates (`trust_weights`, `strategies.aggregation`);
`TrustWeighted` is the Flower strategy around it.

Server momentum (`server_momentum` > 0, off by default): FedAvgM's step (Hsu et al. 2019;
`strategies.aggregation.server_momentum_step`) on the trust-weighted aggregate, u_t = beta
u_{t-1} + (x_t - a_t), x_{t+1} = x_t - server_learning_rate u_t. The weights decide what enters
each round's step; the momentum averages the steps over rounds, attackers' shares included
(a client the weights shut out adds nothing to u). The velocity is strategy state (the
checkpoint holds it); a round whose model or velocity would not be finite keeps both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import strategy as flwr_strategy

from strategies.aggregation import (
    check_server_step,
    finite_layers,
    flatten,
    sanity_scores,
    server_momentum_step,
    weighted_aggregate,
)
from strategies.base import (
    NUM_EXAMPLES,
    FedappStrategyMixin,
    aggregate_scalar_metrics,
    reply_arrays,
    reply_metrics,
    to_record,
)
from strategies.claims import DEFAULT_MAX_EXAMPLES_RATIO
from strategies.records import RoundRecord

EPS = 1e-12


@dataclass(frozen=True)
class TrustParams:
    reference: str = "median"  # robust reference direction: median | trimmed_mean
    trim_fraction: float = 0.2  # for reference = trimmed_mean
    ema: float = 0.5  # weight of the history in the trust update
    norm_low: float = 0.1  # relative update norms in [norm_low, norm_high] are normal
    norm_high: float = 3.0
    clip: bool = True  # clip updates longer than norm_high * median norm
    quality_weight: float = 0.5  # most that client-reported quality can take away (0..1)
    loss_z: float = 3.0  # robust z-score of the reported loss where down-weighting starts
    # cap n_k at this times the median n (0 = no cap); TrustWeighted passes 0: its n_k are
    # already capped by the run's `claims` (strategies/claims.py)
    max_examples_ratio: float = DEFAULT_MAX_EXAMPLES_RATIO
    new_client_prior: float = 0.5  # vote of a never-seen client in the reference median
    vote_power: float = 0.5  # votes in the robust statistics: trust * n_k ** vote_power
    consistency_z: float = 2.0  # cosine this many robust spreads below the median: score falls
    consistency_spread_min: float = 0.05  # floor of the cosines' robust spread
    # least trust a client's vote counts with (0: a client that lost its trust has no vote)
    vote_floor: float = 0.0

    def __post_init__(self) -> None:
        if self.reference not in ("median", "trimmed_mean"):
            raise ValueError(f"reference={self.reference!r}; use 'median' or 'trimmed_mean'")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema={self.ema} must be in [0, 1)")
        if not 0.0 <= self.norm_low <= 1.0 <= self.norm_high:
            raise ValueError("need 0 <= norm_low <= 1 <= norm_high")
        if not 0.0 <= self.quality_weight <= 1.0:
            raise ValueError(f"quality_weight={self.quality_weight} must be in [0, 1]")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction={self.trim_fraction} must be in [0, 0.5)")
        if not 0.0 <= self.vote_power <= 1.0:
            raise ValueError(f"vote_power={self.vote_power} must be in [0, 1]")
        if self.consistency_z <= 0 or self.consistency_spread_min <= 0:
            raise ValueError("consistency_z and consistency_spread_min must be > 0")
        if not 0.0 <= self.vote_floor <= 1.0:
            raise ValueError(f"vote_floor={self.vote_floor} must be in [0, 1]")


@dataclass
class TrustResult:
    weights: np.ndarray  # aggregation weights, sum 1 (all zero when nobody is trusted)
    trust: np.ndarray  # alpha_k(t), the new history
    score: np.ndarray  # this round's c * s * q
    consistency: np.ndarray
    sanity: np.ndarray
    quality: np.ndarray
    cosine: np.ndarray
    norm_ratio: np.ndarray
    clip_factor: np.ndarray  # multiplier applied to each update (1 = not clipped)


# -- pure pieces ---------------------------------------------------------------------------------
def weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Lower weighted median along axis 0: per column, the smallest value whose cumulative
    weight reaches half the total (NumPy's weighted `inverted_cdf` quantile). Equal weights
    give the lower median."""
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    if values.ndim == 1:
        return _weighted_median_columns(values[:, None], weights)[0]
    flat = values.reshape(len(values), -1)
    out = np.empty(flat.shape[1])
    for start in range(0, flat.shape[1], MEDIAN_CHUNK):
        cols = slice(start, start + MEDIAN_CHUNK)
        out[cols] = _weighted_median_columns(flat[:, cols], weights)
    return out.reshape(values.shape[1:])


MEDIAN_CHUNK = 1 << 17  # columns per step: bounded memory for 6.6M-parameter models


def _weighted_median_columns(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`np.quantile(values, 0.5, axis=0, weights=weights, method="inverted_cdf")` for a (K, d)
    block, bit for bit (the same sort, cumulative sum and normalization), but vectorized:
    NumPy's weighted quantile searches each of the d columns in a Python-level loop, which
    made trust's aggregation take 10 s per round for the 1.2M-parameter FEMNIST model."""
    order = np.argsort(values, axis=0)
    ordered = np.take_along_axis(values, order, axis=0)
    cdf = weights[order].cumsum(axis=0, dtype=np.float64)
    cdf /= cdf[-1]
    if np.isnan(cdf[-1]).any():
        raise ValueError("Weights included NaN, inf or were all zero.")
    first = np.argmax(cdf >= 0.5, axis=0)  # the first i with cdf[i] >= 1/2 (searchsorted left)
    return np.take_along_axis(ordered, first[None, :], axis=0)[0]


def reference_direction(
    updates: np.ndarray,
    method: str = "median",
    trim: float = 0.2,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Coordinate-wise (weighted) median or trimmed mean of the rows of `updates` (K, d)."""
    if method == "median":
        if weights is None:
            return np.median(updates, axis=0)
        return weighted_median(updates, weights)
    k = updates.shape[0]
    cut = int(trim * k)
    part = np.sort(updates, axis=0)[cut : k - cut] if cut else updates
    return part.mean(axis=0)


def cosines(updates: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine of each row to `ref`; 0 where either vector is zero."""
    norms = np.linalg.norm(updates, axis=1)
    rnorm = float(np.linalg.norm(ref))
    dots = updates @ ref
    out = np.zeros(len(updates))
    ok = (norms > EPS) & (rnorm > EPS)
    out[ok] = dots[ok] / (norms[ok] * rnorm)
    return np.clip(out, -1.0, 1.0)


def consistency_scores(
    cos: np.ndarray,
    votes: np.ndarray | None = None,
    z0: float = 2.0,
    spread_min: float = 0.05,
) -> np.ndarray:
    """Cosines judged against the round's robust spread: z = (m - cos) / s with m the
    (vote-weighted) median cosine and s = max(1.4826 MAD, spread_min); 1 up to z0, 0 from 2 z0."""
    cos = np.asarray(cos, dtype=np.float64)
    votes = np.ones(len(cos)) if votes is None else np.asarray(votes, dtype=np.float64)
    if votes.sum() <= 0:
        votes = np.ones(len(cos))
    med = float(weighted_median(cos, votes))
    spread = max(1.4826 * float(weighted_median(np.abs(cos - med), votes)), spread_min)
    z = (med - cos) / spread
    return np.clip(2.0 - z / z0, 0.0, 1.0)


def quality_scores(
    losses: np.ndarray,
    counts_consistent: np.ndarray,
    weight: float,
    z0: float,
) -> np.ndarray:
    """From reported (untrusted) facts, a factor in [1 - weight, 1].

    Loss: robust z = (loss - median) / (1.4826 MAD); no penalty up to z0, full penalty at 2 z0.
    A label histogram that does not add up to the claimed examples gets the full penalty.
    NaN losses (not reported) carry no information and no penalty.
    """
    losses = np.asarray(losses, dtype=np.float64)
    penalty = np.zeros(len(losses))
    known = np.isfinite(losses)
    if known.sum() >= 3:
        med = float(np.median(losses[known]))
        mad = 1.4826 * float(np.median(np.abs(losses[known] - med)))
        z = np.zeros(len(losses))
        z[known] = (losses[known] - med) / max(mad, 1e-6 * max(abs(med), 1.0))
        penalty = np.clip((z - z0) / z0, 0.0, 1.0) if z0 > 0 else (z > 0).astype(float)
        penalty[~known] = 0.0
    penalty = np.where(np.asarray(counts_consistent, dtype=bool), penalty, 1.0)
    return 1.0 - weight * penalty


def trust_weights(
    updates: np.ndarray,
    num_examples: np.ndarray,
    losses: np.ndarray,
    counts_consistent: np.ndarray,
    previous: Sequence[float | None],
    params: TrustParams,
) -> TrustResult:
    """All of this round's trust arithmetic for K clients' flattened updates (K, d).

    `previous[k]` is client k's trust from earlier rounds, or None the first time it is seen.
    """
    updates = np.asarray(updates, dtype=np.float64)
    k = updates.shape[0]
    n = np.asarray(num_examples, dtype=np.float64)
    if params.max_examples_ratio > 0:
        n = np.minimum(n, params.max_examples_ratio * float(np.median(n)))
    # Votes in every robust statistic: earlier trust (new clients `new_client_prior`), so that
    # attackers already caught cannot take over the median in a round where they are many,
    # times n_k ** vote_power, so that many small clients do not outvote the few that hold
    # most of the data. All zero -> equal votes.
    trust_votes = np.array([params.new_client_prior if p is None else float(p) for p in previous])
    trust_votes = np.maximum(trust_votes, params.vote_floor)
    votes = trust_votes * np.power(np.maximum(n, 0.0), params.vote_power)
    if votes.sum() <= 0:
        votes = trust_votes if trust_votes.sum() > 0 else np.ones(k)
    ref = reference_direction(updates, params.reference, params.trim_fraction, votes)
    cos = cosines(updates, ref)
    # A zero reference (no consensus direction, e.g. every update is zero) says nothing.
    cons = (
        consistency_scores(cos, votes, params.consistency_z, params.consistency_spread_min)
        if np.linalg.norm(ref) > EPS
        else np.ones(k)
    )
    norms = np.linalg.norm(updates, axis=1)
    med_norm = float(weighted_median(norms, votes))
    ratio = norms / med_norm if med_norm > EPS else np.ones(k)
    sane = sanity_scores(ratio, params.norm_low, params.norm_high)
    qual = quality_scores(losses, counts_consistent, params.quality_weight, params.loss_z)
    score = cons * sane * qual
    trust = np.array(
        [
            s if prev is None else params.ema * float(prev) + (1.0 - params.ema) * s
            for s, prev in zip(score, previous, strict=True)
        ]
    )
    raw = n * trust
    total = float(raw.sum())
    weights = raw / total if total > 0 else np.zeros(k)
    clip = np.ones(k)
    if params.clip and med_norm > EPS:
        too_long = norms > params.norm_high * med_norm
        clip[too_long] = params.norm_high * med_norm / norms[too_long]
    return TrustResult(weights, trust, score, cons, sane, qual, cos, ratio, clip)


# -- Flower strategy -------------------------------------------------------------------------------
class TrustWeighted(FedappStrategyMixin, flwr_strategy.FedAvg):
    """FedAvg whose weights n_k are multiplied by a learned per-client trust (see module doc);
    the keyword arguments of `TrustParams` (conf/strategy/trust.yaml) set the math."""

    aggregation_rule = "data_dependent"

    def __init__(
        self, server_momentum: float = 0.0, server_learning_rate: float = 1.0, **kwargs: Any
    ) -> None:
        names = {f.name for f in fields(TrustParams)}
        params = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        # claims arrive capped (FedappStrategyMixin.cap_claims, the run's `claims` block)
        params.setdefault("max_examples_ratio", 0.0)
        super().__init__(**kwargs)
        self.params = TrustParams(**params)
        self.history: dict[int, float] = {}  # partition id -> trust
        check_server_step(server_momentum, server_learning_rate)
        self.server_momentum = float(server_momentum)
        self.server_learning_rate = float(server_learning_rate)
        self.server_velocity: list[np.ndarray] | None = None  # u_t; strategy state (checkpoint)

    def client_weights(self, accepted: list[Message]) -> None:
        return None  # weights come out of the trust math; `_log_clients` records them

    def aggregate_accepted(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not accepted or self._global_arrays is None:
            return None, None
        keys = list(self._global_arrays.keys())
        g = [self._global_arrays[k].numpy() for k in keys]
        clients = [[reply_arrays(m)[k].numpy() for k in keys] for m in accepted]
        g_flat = flatten(g)
        updates = np.stack([flatten(c) - g_flat for c in clients])
        metrics = [reply_metrics(m) for m in accepted]
        pids = [self.partition_of(m.metadata.src_node_id) for m in accepted]
        result = trust_weights(
            updates,
            np.array([float(m[NUM_EXAMPLES]) for m in metrics]),
            np.array([float(m.get("train_loss", np.nan)) for m in metrics]),
            np.array([_counts_consistent(m) for m in metrics]),
            [self.history.get(p) for p in pids],
            self.params,
        )
        for p, t in zip(pids, result.trust, strict=True):
            self.history[p] = float(t)
        self._log_clients(self.round_log(server_round), pids, result)
        if float(result.weights.sum()) <= 0:
            return None, None
        merged = weighted_aggregate(g, clients, result.weights, result.clip_factor)
        agg = aggregate_scalar_metrics([m.content for m in accepted], NUM_EXAMPLES)
        if self.server_momentum != 0.0 or self.server_learning_rate != 1.0:
            merged, velocity = server_momentum_step(
                g, merged, self.server_velocity, self.server_momentum, self.server_learning_rate
            )
            # the velocity moves on only with a model the round loop keeps
            if not (finite_layers(merged) and finite_layers(velocity)):
                self.round_log(server_round).aggregation["server_state_not_finite"] = True
                return None, agg
            self.server_velocity = velocity
        return to_record(keys, merged), agg

    def _log_clients(self, rec: RoundRecord, pids: list[int], r: TrustResult) -> None:
        by_pid = rec.accepted("train")
        for i, pid in enumerate(pids):
            client = by_pid.get(pid)
            if client is None:
                continue
            client.weight = float(r.weights[i])
            client.details.update(
                {
                    "trust": float(r.trust[i]),
                    "trust_score": float(r.score[i]),
                    "trust_consistency": float(r.consistency[i]),
                    "trust_cosine": float(r.cosine[i]),
                    "trust_sanity": float(r.sanity[i]),
                    "trust_norm_ratio": float(r.norm_ratio[i]),
                    "trust_quality": float(r.quality[i]),
                    "trust_clip": float(r.clip_factor[i]),
                }
            )


def _counts_consistent(metrics: Mapping[str, Any]) -> bool:
    """A reported label histogram must add up to the claimed number of examples."""
    counts = metrics.get("label-counts")
    if counts is None:
        return True
    return abs(float(sum(counts)) - float(metrics[NUM_EXAMPLES])) < 0.5
