"""FedAsync (Xie, Koyejo, Gupta, "Asynchronous Federated Optimization", arXiv:1903.03934).

Flower's strategies are round-based; FedAsync has no rounds. The server keeps
`clients_per_round` trainings in flight on the Grid's push/pull (through the fedapp clock, so
"in flight" means simulated time too). The moment one update lands, the server mixes it in,

    x <- (1 - alpha_t) x + alpha_t x_k,   alpha_t = alpha * s(t - tau_k)

where tau_k is the model version the client started from and s the staleness function
(constant, polynomial (1 + staleness)^-a, or hinge), and sends the new model to a fresh idle
client. Failures (offline nodes, crashes, malformed or NaN updates) are logged and replaced
by another client at once.

For logging and comparison, every `clients_per_round` processed replies make one "round" in
results.json (the same number of client trainings as a synchronous round), evaluated with
the model at that moment; `sim_time_s` is the clock at that point. A client's `weight` is
its update's share of the model at the end of that round, alpha_j x prod_{i>j} (1 - alpha_i)
over the updates mixed in after it (the previous model keeps the rest), and `mixing_rate`
is its alpha_j.

The schedule is `FedAsyncPolicy`, a pure state machine over the scheduler core's events
(strategies/scheduler.py); `FedAsync` adds the mixing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedapp.core import seeds
from strategies.base import layers, reply_arrays, reply_metrics, to_record
from strategies.scheduler import (
    Decision,
    EventDrivenStrategy,
    Fold,
    Policy,
    Report,
    RoundClose,
    Send,
)
from strategies.scheduling import mix, staleness_discount


class FedAsyncPolicy(Policy):
    """`concurrency` trainings in flight over `clients`; every landed update is folded in
    at once with `rate(staleness, n_k, mean n)`, and an idle client (seeded choice) gets the
    newest model. A round ends after `concurrency` replies."""

    screen_on_arrival = True

    def __init__(self, clients: list[int], concurrency: int, seed: int, rate) -> None:
        super().__init__()
        self.clients = sorted(clients)
        self.k = int(concurrency)
        self.rng = seeds.rng("fedasync.dispatch", seed)
        self.rate = rate
        self.version = 0
        self.sizes: dict[int, float] = {}
        self.inflight: dict[int, tuple[int, int | None]] = {}  # ticket -> (client, version)
        self.rnd = 0

    def dispatch(self, rnd: int) -> Send | None:
        busy = {p for p, _ in self.inflight.values()}
        idle = sorted(set(self.clients) - busy)
        if not idle:
            return None
        pid = int(self.rng.choice(idle))
        ticket = self.new_ticket()
        self.inflight[ticket] = (pid, None)  # the version is the one it is sent with
        return Send(ticket, pid, rnd)

    def sent(self, send: Send) -> None:
        self.inflight[send.ticket] = (send.partition_id, self.version)

    def open_round(
        self, rnd: int, started: float, now: float, alive: set[int] | None
    ) -> list[Decision]:
        self.rnd, self.processed, self.expected, self.stalled = rnd, 0, [], False
        if rnd > 1 or self.inflight:
            return []
        return [s for s in (self.dispatch(1) for _ in range(self.k)) if s is not None]

    def on_reply(self, ticket: int, now: float, report: Report | None) -> list[Decision]:
        entry = self.inflight.pop(ticket, None)
        if entry is None:
            return []
        pid, base = entry
        self.processed += 1
        self.expected.append(pid)
        out: list[Decision] = []
        if report is not None:
            self.sizes[pid] = float(report.num_examples)
            stale = self.version - base
            a = self.rate(stale, self.sizes[pid], float(np.mean(list(self.sizes.values()))))
            out.append(Fold(ticket, a, stale))
        send = self.dispatch(self.rnd if self.processed < self.k else self.rnd + 1)
        return out + ([send] if send is not None else [])

    def folded(self, ticket: int, applied: bool) -> None:
        if applied:
            self.version += 1

    def on_timer(self, now: float) -> list[Decision]:
        self.stalled = True  # nothing in flight can land any more
        return []

    def round_over(self, now: float) -> bool:
        return self.stalled or self.processed >= self.k or not self.inflight

    def close_round(self, rnd: int) -> RoundClose:
        schedule = {"model_version": self.version, "in_flight": len(self.inflight)}
        return RoundClose([], self.expected, schedule)


class FedAsync(EventDrivenStrategy):
    """See the module docstring; knobs in `conf/strategy/fedasync.yaml`."""

    def __init__(
        self,
        *,
        alpha: float = 0.6,
        staleness: str = "polynomial",
        staleness_a: float = 0.5,
        staleness_b: float = 4.0,
        weight_by_examples: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        staleness_discount(0, staleness, staleness_a, staleness_b)  # validates the kind
        self.alpha = float(alpha)
        self.staleness = staleness
        self.staleness_a = float(staleness_a)
        self.staleness_b = float(staleness_b)
        self.weight_by_examples = bool(weight_by_examples)

    def mixing_weight(self, staleness: int, n_k: float, mean_n: float) -> float:
        """alpha_t = alpha * s(staleness) (x n_k / mean n, capped at 1, if weight_by_examples)."""
        a = self.alpha * staleness_discount(
            staleness, self.staleness, self.staleness_a, self.staleness_b
        )
        if self.weight_by_examples and mean_n > 0:
            a *= n_k / mean_n
        return float(min(a, 1.0))

    def make_policy(self, train_config: ConfigRecord, timeout: float) -> FedAsyncPolicy:
        self._mixed: dict[int, list] = {}  # round -> [(client record, rate)] applied in order
        concurrency = min(int(self.min_train_nodes), len(self.partition_nodes))
        return FedAsyncPolicy(
            list(self.partition_nodes), concurrency, self.seed, self.mixing_weight
        )

    def fold_now(
        self, rnd: int, arrays: ArrayRecord, fold: Fold, reply: Message
    ) -> ArrayRecord | None:
        rec = self.round_log(rnd)
        client = [c for c in rec.clients if c.phase == "train"][-1]  # screened on arrival
        new = mix(layers(arrays), layers(reply_arrays(reply)), fold.rate)
        candidate = self.finite_or_none(rnd, to_record(arrays.keys(), new))
        if candidate is None:
            client.weight = 0.0
            return None
        rec.num_replies += 1
        rec.aggregated = True
        client.details.update(
            {
                "mixing_rate": fold.rate,
                "staleness": fold.staleness,
                "version": self.policy.version + 1,
            }
        )
        self._mixed.setdefault(rnd, []).append((client, fold.rate))
        m = reply_metrics(reply)
        if "train_loss" in m:
            rec.train_metrics["train_loss"] = float(m["train_loss"])
        return candidate

    def fold_round(
        self, rnd: int, arrays: ArrayRecord, close: RoundClose, replies: dict[int, Message]
    ) -> ArrayRecord | None:
        """Nothing left to aggregate (updates were mixed in on arrival); record each update's
        share of the round's final model and the failures."""
        rec = self.round_log(rnd)
        keep = 1.0
        for client, rate in reversed(self._mixed.get(rnd, [])):
            client.weight = rate * keep
            keep *= 1.0 - rate
        accepted = sum(c.ok for c in rec.clients if c.phase == "train")
        rec.num_failures = len(close.expected) - accepted
        return None
