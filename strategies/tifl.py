"""TiFL (Chai et al., "TiFL: A Tier-based Federated Learning System", HPDC 2020, arXiv:2001.09249).

Synchronous FedAvg rounds, but each round trains clients of a single tier, so a round waits
only for clients of similar speed. Clients are profiled once before round 1 (the same probe as
the tiered scheduler: model down, a few local steps, model up) and grouped into `num_tiers`
equal-size tiers by measured duration of a full round of work; the grouping is refreshed from
every round's measured durations. The tier of each round is drawn (seeded) with TiFL's
adaptive policy: tiers where the model does worse get higher probability, optionally limited
by per-tier `credits`.

Deviation from the paper, for lack of a per-tier test set: "does worse" is the mean training
loss the tier's clients last reported (TiFL uses the global model's accuracy on the tier's
held-out data). `adaptive: false` gives the paper's static uniform policy.

The schedule is `TiflPolicy`, a pure state machine over the scheduler core's events
(strategies/scheduler.py), with the tier assignment of the tiered scheduler's `ProfileBook`;
the aggregation is Flower's FedAvg over the round's replies.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message

from fedapp.core import seeds
from strategies.base import sample_partitions
from strategies.scheduler import (
    Cancel,
    Decision,
    EventDrivenStrategy,
    Landed,
    Policy,
    Report,
    RoundClose,
    Send,
)
from strategies.scheduling import ProfileBook, full_steps, tifl_probabilities


class TiflPolicy(Policy):
    """One tier per round (adaptive, seeded choice), `sample_size` of its clients (seeded),
    a synchronous round of at most `timeout` seconds."""

    probes = True

    def __init__(
        self,
        clients: list[int],
        num_tiers: int,
        sample_size: int,
        seed: int,
        config: dict[str, Any],
        timeout: float,
        adaptive: bool = True,
        credits: int = 0,
        ema: float = 0.5,
    ) -> None:
        super().__init__()
        self.clients = sorted(clients)
        self.num_tiers = int(num_tiers)
        self.sample_size = int(sample_size)
        self.seed = int(seed)
        self.config = dict(config)
        self.timeout = float(timeout)
        self.adaptive = bool(adaptive)
        self.credits = [int(credits)] * self.num_tiers if credits else [1 << 30] * self.num_tiers
        self.book = ProfileBook(ema=float(ema))
        self.examples: dict[int, int] = {}
        self.tier_loss = [math.nan] * self.num_tiers

    def on_probe(self, partition_id: int, report: Report | None) -> None:
        if report is None:
            self.book.fail(partition_id)
            return
        if report.num_examples is not None:
            self.examples[partition_id] = report.num_examples
        self.book.observe(
            partition_id, report.duration_s, report.train_steps or 0.0, report.train_time_s
        )

    def tier_probabilities(self) -> np.ndarray:
        if self.adaptive:
            probs = tifl_probabilities(self.tier_loss, self.credits)
        else:
            probs = np.array([1.0 if c > 0 else 0.0 for c in self.credits])
            probs = probs / probs.sum() if probs.sum() else probs
        if probs.sum() == 0:  # every tier out of credits: TiFL stops choosing; we go uniform
            probs = np.full(self.num_tiers, 1.0 / self.num_tiers)
        return probs

    def open_round(
        self, rnd: int, started: float, now: float, alive: set[int] | None
    ) -> list[Decision]:
        tiers, _ = self.book.tiers(
            set(self.clients),
            self.num_tiers,
            lambda p: full_steps(self.examples.get(p), self.config),
        )
        rng = seeds.rng("tifl.tier", self.seed, rnd)
        probs = self.tier_probabilities()
        self.tier = int(rng.choice(self.num_tiers, p=probs))
        self.credits[self.tier] -= 1
        self.schedule = {
            "tier": self.tier,
            "tier_probabilities": [float(p) for p in probs],
            "tier_sizes": [sum(t == k for t in tiers.values()) for k in range(self.num_tiers)],
        }
        members = [p for p, t in tiers.items() if t == self.tier]
        chosen = sample_partitions(members, min(self.sample_size, len(members)), self.seed, rnd)
        self.rnd, self.expected, self.landed, self.losses = rnd, chosen, [], []
        self.pending = {self.new_ticket(): p for p in chosen}
        self.deadline, self.timed_out = now + self.timeout, False
        return [Send(t, p, rnd) for t, p in self.pending.items()]

    def on_reply(self, ticket: int, now: float, report: Report | None) -> list[Decision]:
        pid = self.pending.pop(ticket, None)
        if pid is None:
            return []
        self.landed.append(Landed(ticket, pid, self.rnd))
        if report is None:
            self.book.fail(pid)
            return []
        if report.num_examples is not None:
            self.examples[pid] = report.num_examples
        if report.train_steps is not None:
            self.book.observe(pid, report.duration_s, report.train_steps, report.train_time_s)
        if report.train_loss is not None and math.isfinite(report.train_loss):
            self.losses.append(report.train_loss)
        return []

    def wake_at(self) -> float:
        return self.deadline

    def on_timer(self, now: float) -> list[Decision]:
        if now < self.deadline:
            return []
        self.timed_out = True  # no reply before the deadline: a failure
        for pid in self.pending.values():
            self.book.fail(pid)
        cancels: list[Decision] = [Cancel(t) for t in self.pending]
        self.pending = {}
        return cancels

    def round_over(self, now: float) -> bool:
        return self.timed_out or not self.pending

    def close_round(self, rnd: int) -> RoundClose:
        if self.losses:
            self.tier_loss[self.tier] = float(np.mean(self.losses))
        return RoundClose(self.landed, self.expected, self.schedule)


class TiFL(EventDrivenStrategy):
    """See the module docstring; knobs in `conf/strategy/tifl.yaml`."""

    def __init__(
        self,
        *,
        num_tiers: int = 3,
        probe_steps: int = 5,
        profile_timeout_s: float = 600.0,
        adaptive: bool = True,
        credits: int = 0,
        ema: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_tiers = int(num_tiers)
        self.probe_steps = int(probe_steps)
        self.profile_timeout_s = float(profile_timeout_s)
        self.adaptive = bool(adaptive)
        self.credits = int(credits)
        self.ema = float(ema)

    def make_policy(self, train_config: ConfigRecord, timeout: float) -> TiflPolicy:
        n = len(self.partition_nodes)
        size = max(int(n * self.fraction_train), int(self.min_train_nodes))  # Flower's size
        return TiflPolicy(
            list(self.partition_nodes),
            self.num_tiers,
            size,
            self.seed,
            dict(train_config),
            timeout,
            self.adaptive,
            self.credits,
            self.ema,
        )

    def fold_round(
        self, rnd: int, arrays: ArrayRecord, close: RoundClose, replies: dict[int, Message]
    ) -> ArrayRecord | None:
        """FedAvg (Flower's) over the tier's replies, in arrival order."""
        new, _ = self.aggregate_train(rnd, [replies[x.ticket] for x in close.landed])
        return new
