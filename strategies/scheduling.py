"""Scheduling math shared by the tiered scheduler, TiFL and FedAsync: pure functions over
numbers and NumPy arrays (tested without Flower), plus `ProfileBook`, the server's record
of how fast and how reliable each client has been.

Everything here uses only what a real server observes: when it sent a message, when the
reply (or the failure) came back, and what the client reported (steps, its own compute
time). The simulated device profiles behind those numbers (fedapp.features.hetero) are not read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


# -- staleness ------------------------------------------------------------------------------------
def staleness_discount(
    staleness: float, kind: str = "polynomial", a: float = 0.5, b: float = 4
) -> float:
    """s(tau) of FedAsync (Xie et al., 2019, arXiv:1903.03934, section 5.2): the factor a
    τ-rounds-stale update is scaled by. constant: 1; polynomial: (1 + tau)^-a;
    hinge: 1 for tau <= b, else 1 / (a (tau - b) + 1). Always in (0, 1], non-increasing."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((1.0 + staleness) ** (-a))
    if kind == "hinge":
        return 1.0 if staleness <= b else float(1.0 / (a * (staleness - b) + 1.0))
    raise ValueError(f"unknown staleness function {kind!r}: constant | polynomial | hinge")


def mix(
    global_arrays: Sequence[np.ndarray], client_arrays: Sequence[np.ndarray], alpha: float
) -> list[np.ndarray]:
    """FedAsync's update x <- (1 - alpha) x + alpha x_client, layer by layer in each dtype.
    Integer buffers (e.g. BatchNorm counters) take the client's value when alpha >= 0.5."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = []
    for g, c in zip(global_arrays, client_arrays, strict=True):
        if np.issubdtype(g.dtype, np.floating):
            out.append(((1.0 - alpha) * g + alpha * c).astype(g.dtype))
        else:
            out.append((c if alpha >= 0.5 else g).copy())
    return out


def apply_updates(
    global_arrays: Sequence[np.ndarray],
    bases: Sequence[Sequence[np.ndarray]],
    client_arrays: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float],
) -> list[np.ndarray]:
    """x + sum_k w_k (x_k - base_k) / sum_k w_k: each client's *update* relative to the model it
    started from, so a stale client moves the current model by its own progress instead of
    pulling it back to an old one. With every base equal to x it is the weighted mean of the
    client models (FedAvg)."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative and not all zero")
    w = w / w.sum()
    out = []
    for i, g in enumerate(global_arrays):
        if not np.issubdtype(g.dtype, np.floating):
            out.append(np.asarray(client_arrays[int(np.argmax(w))][i]).copy())
            continue
        delta = np.zeros(g.shape, dtype=np.float64)
        for wk, base, x in zip(w, bases, client_arrays, strict=True):
            delta += wk * (
                np.asarray(x[i], dtype=np.float64) - np.asarray(base[i], dtype=np.float64)
            )
        out.append((g.astype(np.float64) + delta).astype(g.dtype))
    return out


# -- tiers ----------------------------------------------------------------------------------------
def assign_tiers(predicted_s: Mapping[int, float], num_tiers: int) -> dict[int, int]:
    """Tier 0 (fastest) .. num_tiers-1 by predicted round duration, in groups of (nearly)
    equal size as in TiFL (Chai et al., HPDC 2020). Ties broken by client id."""
    if num_tiers < 1:
        raise ValueError("num_tiers must be >= 1")
    order = sorted(predicted_s, key=lambda p: (predicted_s[p], p))
    n = len(order)
    tiers = min(num_tiers, n) or 1
    return {pid: min(i * tiers // max(n, 1), tiers - 1) for i, pid in enumerate(order)}


def allocate_slots(tier_sizes: Sequence[int], k: int) -> list[int]:
    """Split k concurrent training slots over tiers in proportion to their sizes (largest
    remainder), at least one per non-empty tier while k allows, so that no tier starves."""
    sizes = np.asarray(tier_sizes, dtype=float)
    k = int(min(k, sizes.sum()))
    if k <= 0:
        return [0] * len(sizes)
    slots = np.zeros(len(sizes), dtype=int)
    # one guaranteed slot per non-empty tier (largest tiers first when k < number of tiers)
    for t in sorted(np.flatnonzero(sizes > 0), key=lambda t: (-sizes[t], t))[:k]:
        slots[t] = 1
    exact = sizes / sizes.sum() * k
    while slots.sum() < k:  # then the tier furthest below its proportional share
        gap = np.where(slots < sizes, exact - slots, -np.inf)
        slots[int(np.argmax(gap))] += 1
    return [int(s) for s in slots]


def steps_for_window(
    window_s: float, transfer_s: float, step_time_s: float, min_steps: int, max_steps: int
) -> int:
    """Local steps that fit in a window after the transfer, clamped to [min_steps, max_steps]
    (0 when not even min_steps fit: the client should not be given work in this window)."""
    if step_time_s <= 0:
        return max_steps
    fit = math.floor((window_s - transfer_s) / step_time_s)
    if fit < min_steps:
        return 0
    return int(min(fit, max_steps))


def tifl_probabilities(tier_scores: Sequence[float], credits: Sequence[int]) -> np.ndarray:
    """TiFL's adaptive tier choice (Chai et al. 2020, Alg. 2): rank tiers by how badly the
    global model does on them (higher score = worse, e.g. loss), give rank r (0 = worst) a
    probability proportional to T - r, and none to tiers out of credits."""
    scores = np.asarray(tier_scores, dtype=float)
    t = len(scores)
    order = np.argsort(-np.nan_to_num(scores, nan=np.inf), kind="stable")
    p = np.zeros(t)
    p[order] = np.arange(t, 0, -1, dtype=float)
    p[np.asarray(credits) <= 0] = 0.0
    if p.sum() == 0:
        return p
    return p / p.sum()


def full_steps(examples: int | None, config: Mapping[str, Any]) -> int:
    """Local steps of one full round of work for a client with `examples` training rows under
    the round's training config (`batch-size`, `local-epochs`, `max-steps`)."""
    batch = max(int(config.get("batch-size", 32)), 1)
    epochs = max(int(config.get("local-epochs", 1)), 1)
    steps = math.ceil(examples / batch) * epochs if examples else epochs
    cap = int(config.get("max-steps", 0))
    return max(min(steps, cap) if cap > 0 else steps, 1)


# -- what the server knows about each client ------------------------------------------------------
@dataclass
class ClientSpeed:
    step_time_s: float | None = None  # EMA of compute seconds per local step
    transfer_s: float | None = None  # EMA of round-trip time minus compute (model both ways)
    reliability: float = 1.0  # EMA of 1 (replied in time) / 0 (failed, missed, offline)
    successes: int = 0
    failures: int = 0
    participations: int = 0


@dataclass
class ProfileBook:
    """Per-client speed and reliability from observed rounds (EMA with weight `ema` on history)."""

    ema: float = 0.5
    clients: dict[int, ClientSpeed] = field(default_factory=dict)

    def record(self, pid: int) -> ClientSpeed:
        return self.clients.setdefault(pid, ClientSpeed())

    def _blend(self, old: float | None, new: float) -> float:
        return new if old is None else self.ema * old + (1 - self.ema) * new

    def observe(self, pid: int, duration_s: float, steps: float, compute_s: float) -> None:
        """A reply that took `duration_s` from dispatch, for `steps` steps computed in `compute_s`."""
        rec = self.record(pid)
        compute_s = min(max(compute_s, 0.0), duration_s)
        if steps > 0:
            rec.step_time_s = self._blend(rec.step_time_s, compute_s / steps)
        rec.transfer_s = self._blend(rec.transfer_s, duration_s - compute_s)
        rec.reliability = self._blend(rec.reliability, 1.0)
        rec.successes += 1

    def fail(self, pid: int) -> None:
        rec = self.record(pid)
        rec.reliability = self._blend(rec.reliability, 0.0)
        rec.failures += 1

    def known(self, pid: int) -> bool:
        rec = self.clients.get(pid)
        return rec is not None and rec.step_time_s is not None and rec.transfer_s is not None

    def predict(self, pid: int, steps: float) -> float | None:
        """Predicted seconds from dispatch to reply for `steps` local steps (None if unknown)."""
        if not self.known(pid):
            return None
        rec = self.clients[pid]
        return rec.transfer_s + steps * rec.step_time_s

    def tiers(
        self, candidates: set[int], num_tiers: int, steps_of: Callable[[int], int]
    ) -> tuple[dict[int, int], dict[int, float]]:
        """Tier of every candidate by predicted duration of `steps_of(client)` local steps
        (`assign_tiers`), and that prediction (inf if unknown). Clients never measured go to
        the slowest tier until they are (tier 0 when nobody is measured)."""
        pred = {p: self.predict(p, steps_of(p)) for p in candidates}
        known = {p: v for p, v in pred.items() if v is not None}
        tiers = assign_tiers(known, num_tiers)
        slowest = max(tiers.values(), default=0)
        for p in candidates - set(known):
            tiers[p] = min(num_tiers - 1, slowest if known else 0)
        return tiers, {p: (v if v is not None else math.inf) for p, v in pred.items()}
