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
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from omegaconf import DictConfig

from strategies.base import FedappStrategyMixin, reply_metrics
from strategies.scheduling import ProfileBook, assign_tiers, tifl_probabilities
from strategies.tiered import full_steps, probe_clients


class TiFL(FedappStrategyMixin, FedAvg):
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
        self.credits = [int(credits)] * self.num_tiers if credits else [1 << 30] * self.num_tiers
        self.book = ProfileBook(ema=float(ema))
        self._examples: dict[int, int] = {}
        self._tier_loss = [math.nan] * self.num_tiers
        self._profiled = False

    @classmethod
    def from_config(cls, cfg: DictConfig, params: dict[str, Any], common: dict[str, Any]):
        return cls(**common, **params)

    def tiers(self, config: ConfigRecord) -> dict[int, int]:
        pids = set(self.partition_nodes)
        pred = {p: self.book.predict(p, full_steps(self._examples.get(p), config)) for p in pids}
        known = {p: v for p, v in pred.items() if v is not None}
        tiers = assign_tiers(known, self.num_tiers)
        for p in pids - set(known):  # never answered: slowest tier
            tiers[p] = self.num_tiers - 1
        return tiers

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self._profiled:
            self._profiled = True
            probe_clients(self, grid, arrays, config, self.probe_steps, self.profile_timeout_s)
        self._tier_of = self.tiers(config)
        rng = np.random.default_rng([self.seed, server_round, 0x7F1])
        if self.adaptive:
            probs = tifl_probabilities(self._tier_loss, self.credits)
        else:
            probs = np.array([1.0 if c > 0 else 0.0 for c in self.credits])
            probs = probs / probs.sum() if probs.sum() else probs
        if probs.sum() == 0:  # every tier out of credits: TiFL stops choosing; we go uniform
            probs = np.full(self.num_tiers, 1.0 / self.num_tiers)
        self._tier_now = int(rng.choice(self.num_tiers, p=probs))
        self.credits[self._tier_now] -= 1
        self.round_log(server_round).schedule = {
            "tier": self._tier_now,
            "tier_probabilities": [float(p) for p in probs],
            "tier_sizes": [
                sum(t == k for t in self._tier_of.values()) for k in range(self.num_tiers)
            ],
        }
        return super().configure_train(server_round, arrays, config, grid)

    def _construct_messages(self, record: RecordDict, node_ids: list[int], message_type: str):
        if message_type != MessageType.TRAIN:
            return super()._construct_messages(record, node_ids, message_type)
        # Restrict the seeded sampler to this round's tier.
        tier_nodes = {
            self.partition_nodes[p] for p, t in self._tier_of.items() if t == self._tier_now
        }
        inner = self._grid

        class _TierView:
            def get_node_ids(self):
                return [n for n in inner.get_node_ids() if n in tier_nodes]

        self._grid = _TierView()
        try:
            return super()._construct_messages(record, node_ids, message_type)
        finally:
            self._grid = inner

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        losses = []
        for reply in replies:
            pid = self.partition_of(reply.metadata.src_node_id)
            sent, arrived = self._grid.timing(reply)
            if reply.has_error():
                self.book.fail(pid)
                continue
            m = reply_metrics(reply) or {}
            if "num-examples" in m:
                self._examples[pid] = int(m["num-examples"])
            if "train_steps" in m:
                self.book.observe(
                    pid, arrived - sent, float(m["train_steps"]), float(m.get("train_time_s", 0.0))
                )
            if "train_loss" in m and math.isfinite(float(m["train_loss"])):
                losses.append(float(m["train_loss"]))
        for pid in set(self.round_log(server_round).sampled_train) - {
            self.partition_of(r.metadata.src_node_id) for r in replies
        }:
            self.book.fail(pid)  # no reply before the deadline
        if losses:
            self._tier_loss[self._tier_now] = float(np.mean(losses))
        return super().aggregate_train(server_round, replies)
