"""FedBuff (Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba, "Federated Learning with
Buffered Asynchronous Aggregation", AISTATS 2022, arXiv:2106.06639).

Asynchronous like FedAsync, with FedAsync's dispatch (strategies/fedasync.py
`FedAsyncPolicy`, the same seeded choice of idle clients): `clients_per_round` trainings in
flight on the fedapp clock, a fresh idle client started the moment one lands. A landed
(screened) update is not mixed in at once: its change relative to the model its client
started from, Delta_i = x_i - base_i, goes into a buffer with the staleness weight
s(tau_i) = (1 + tau_i)^-1/2 (tau_i: server steps since the client's model). Once the buffer
holds `buffer_size` (K) updates the server takes one step (Algorithm 1):

    x <- x + eta_g * (1/K) sum_i s(tau_i) Delta_i

and empties the buffer. With eta_g = 1 and fresh updates that is the unweighted mean of the K
client models. K is capped at the concurrency, so every "round" of results.json (every
`clients_per_round` processed replies, as for FedAsync) holds at least one server step; a
client's `weight` is its share eta_g s(tau_i) / K of the step that used it. Updates still in
the buffer when the run ends are not applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message

from strategies.base import layers, reply_arrays, reply_metrics, to_record
from strategies.fedasync import FedAsyncPolicy
from strategies.scheduler import EventDrivenStrategy, Fold, RoundClose, Send
from strategies.scheduling import staleness_discount


def buffered_step(
    global_arrays: Sequence[np.ndarray],
    deltas: Sequence[Sequence[np.ndarray]],
    weights: Sequence[float],
    server_lr: float,
) -> list[np.ndarray]:
    """FedBuff's server step x + eta_g (1/K) sum_i w_i Delta_i over the K buffered changes,
    layer by layer in float64, back in each layer's dtype; integer layers (counters) keep the
    global model's values."""
    k = len(deltas)
    if k == 0 or len(weights) != k:
        raise ValueError("one weight per buffered update, and at least one update")
    out = []
    for i, g in enumerate(global_arrays):
        if not np.issubdtype(g.dtype, np.floating):
            out.append(np.asarray(g).copy())
            continue
        step = np.zeros(g.shape, dtype=np.float64)
        for w, delta in zip(weights, deltas, strict=True):
            step += float(w) * np.asarray(delta[i], dtype=np.float64)
        out.append((g.astype(np.float64) + float(server_lr) * step / k).astype(g.dtype))
    return out


def finite_step(
    global_arrays: Sequence[np.ndarray],
    buffer: Sequence[tuple[float, Sequence[np.ndarray]]],
    server_lr: float,
) -> tuple[list[np.ndarray], int]:
    """The buffered step, leaving out, largest first, updates whose step would not be finite
    in the model's dtypes (a finite float32 update near 3e38 overflows the step): one hostile
    update must not discard the K-1 others. Returns the step and how many were left out."""
    items = list(buffer)
    dropped = 0
    while items:
        new = buffered_step(global_arrays, [d for _, d in items], [w for w, _ in items], server_lr)
        if all(np.all(np.isfinite(a)) for a in new if np.issubdtype(a.dtype, np.floating)):
            return new, dropped
        worst = max(range(len(items)), key=lambda i: max(np.max(np.abs(d)) for d in items[i][1]))
        items.pop(worst)
        dropped += 1
    return [np.asarray(g).copy() for g in global_arrays], dropped


def update_of(client: Sequence[np.ndarray], base: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Delta = x_client - base, in float64 (integer layers: zeros, unused by the step)."""
    return [
        np.asarray(x, dtype=np.float64) - np.asarray(b, dtype=np.float64)
        if np.issubdtype(np.asarray(b).dtype, np.floating)
        else np.zeros(np.shape(b))
        for x, b in zip(client, base, strict=True)
    ]


class FedBuff(EventDrivenStrategy):
    """See the module docstring; knobs in `conf/strategy/fedbuff.yaml`."""

    def __init__(
        self,
        *,
        buffer_size: int = 10,
        server_lr: float = 1.0,
        staleness: str = "polynomial",
        staleness_a: float = 0.5,
        staleness_b: float = 4.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if int(buffer_size) < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if not (np.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be positive, got {server_lr}")
        staleness_discount(0, staleness, staleness_a, staleness_b)  # validates the kind
        self.buffer_size = int(buffer_size)
        self.server_lr = float(server_lr)
        self.staleness = staleness
        self.staleness_a = float(staleness_a)
        self.staleness_b = float(staleness_b)

    def staleness_weight(self, staleness: int, n_k: float = 0.0, mean_n: float = 0.0) -> float:
        """s(tau): (1 + tau)^-a with the paper's a = 1/2 by default (FedAsync's functions)."""
        return staleness_discount(staleness, self.staleness, self.staleness_a, self.staleness_b)

    def make_policy(self, train_config: ConfigRecord, timeout: float) -> FedAsyncPolicy:
        concurrency = min(int(self.min_train_nodes), len(self.partition_nodes))
        self.buffer_k = min(self.buffer_size, concurrency)  # K <= concurrency: a step every "round"
        self._bases: dict[int, list[np.ndarray]] = {}  # ticket -> the model its client got
        self._buffer: list[tuple[float, list[np.ndarray]]] = []  # (s(tau), Delta)
        return FedAsyncPolicy(
            list(self.partition_nodes), concurrency, self.seed, self.staleness_weight
        )

    def _send(self, grid, send: Send) -> None:
        super()._send(grid, send)
        self._bases[send.ticket] = layers(self._arrays)

    def fold_now(
        self, rnd: int, arrays: ArrayRecord, fold: Fold, reply: Message
    ) -> ArrayRecord | None:
        """Buffer the update; the K-th one takes the server step (None until then: the
        policy's model version moves only with a step)."""
        rec = self.round_log(rnd)
        client = [c for c in rec.clients if c.phase == "train"][-1]  # screened on arrival
        base = self._bases.pop(fold.ticket)
        self._buffer.append((fold.rate, update_of(layers(reply_arrays(reply)), base)))
        rec.num_replies += 1
        client.weight = self.server_lr * fold.rate / self.buffer_k
        client.details.update({"staleness": fold.staleness, "staleness_weight": fold.rate})
        m = reply_metrics(reply)
        if "train_loss" in m:
            rec.train_metrics["train_loss"] = float(m["train_loss"])
        if len(self._buffer) < self.buffer_k:
            return None
        new, dropped = finite_step(layers(arrays), self._buffer, self.server_lr)
        self._buffer = []
        if dropped:  # a finite update whose step overflows: left out, the others kept
            rec.aggregation["dropped_overflow"] = dropped
        candidate = self.finite_or_none(rnd, to_record(arrays.keys(), new))
        if candidate is not None:
            rec.aggregated = True
            rec.aggregation["server_steps"] = int(rec.aggregation.get("server_steps", 0)) + 1
        return candidate

    def fold_round(
        self, rnd: int, arrays: ArrayRecord, close: RoundClose, replies: dict[int, Message]
    ) -> ArrayRecord | None:
        """Nothing to aggregate at the end of a round (steps happen as the buffer fills);
        record the failures and forget the bases of trainings no longer in flight."""
        rec = self.round_log(rnd)
        accepted = sum(c.ok for c in rec.clients if c.phase == "train")
        rec.num_failures = len(close.expected) - accepted
        rec.aggregation["buffered"] = len(self._buffer)
        self._bases = {t: b for t, b in self._bases.items() if t in self.policy.inflight}
        return None
