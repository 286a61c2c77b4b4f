"""Plumbing shared by every fedapp strategy, written once.

`FedappStrategyMixin` sits in front of a Flower Message-API strategy (FedAvg family) and adds:
- reproducible client sampling: the same seed picks the same partitions in every run, even
  though Flower's node ids are random (Flower's own sampler uses an unseeded `random.sample`);
- reply screening: error replies, replies whose arrays do not match the global model, and
  replies with NaN/Inf are dropped and reported instead of crashing the ServerApp or
  poisoning the average;
- a per-round log (who was sampled, who replied, per-client metrics, bytes up and down) that
  the results recorder reads.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from omegaconf import DictConfig

from tasks.metrics import confusion_metrics

NUM_EXAMPLES = "num-examples"


def reply_metrics(msg: Message) -> MetricRecord | None:
    """The (single) MetricRecord of a reply, or None if it has none."""
    return next(iter(msg.content.metric_records.values()), None)


def reply_arrays(msg: Message) -> ArrayRecord | None:
    """The model a reply carries: its ArrayRecord "arrays", else its only one, else None."""
    records = msg.content.array_records
    if "arrays" in records:
        return records["arrays"]
    return next(iter(records.values()), None) if len(records) == 1 else None


def num_examples(msg: Message) -> float:
    """The `num-examples` a (screened) reply claims."""
    return float(reply_metrics(msg)[NUM_EXAMPLES])


def sample_partitions(
    available: Iterable[int], k: int, seed: int, server_round: int, stream: int = 0
) -> list[int]:
    """Choose `k` distinct partition ids from `available`, determined by (seed, round, stream)."""
    pool = np.array(sorted(set(available)), dtype=np.int64)
    if k > len(pool):
        raise ValueError(f"cannot sample {k} clients from {len(pool)} available")
    rng = np.random.default_rng([int(seed), int(server_round), int(stream)])
    return sorted(int(p) for p in rng.choice(pool, size=k, replace=False))


def aggregate_scalar_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Flower's weighted metric average over scalar metrics only.

    List-valued metrics (label histograms) are per-client facts read from the round log;
    averaging them across clients means nothing, so they are left out.
    """
    scalar_only = [
        RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        k: v
                        for k, v in next(iter(r.metric_records.values())).items()
                        if not isinstance(v, list)
                    }
                )
            }
        )
        for r in records
    ]
    return aggregate_metricrecords(scalar_only, weighted_by_key)


def pooled_confusion_metrics(replies: list[Message]) -> dict[str, float]:
    """Sum clients' confusion matrices (`eval-confusion`) and compute pooled metrics.

    Precision, recall and F1 do not average over clients; pooled counts give the metric of
    the global model on the union of the evaluated clients' validation rows.
    """
    mats = [
        np.asarray(m["eval-confusion"], dtype=np.int64)
        for m in map(reply_metrics, replies)
        if "eval-confusion" in m
    ]
    if not mats or len({len(x) for x in mats}) != 1:
        return {}
    total = np.sum(mats, axis=0)
    k = math.isqrt(len(total))
    return {f"eval_{name}": v for name, v in confusion_metrics(total.reshape(k, k)).items()}


def arrays_are_finite(arrays: ArrayRecord) -> bool:
    return all(np.isfinite(a.numpy()).all() for a in arrays.values() if a.numpy().dtype.kind == "f")


def metrics_are_finite(metrics: Mapping[str, Any]) -> bool:
    for value in metrics.values():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            return False
    return True


def cast_like(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Return `arrays` with each array cast to the dtype of the same key in `reference`."""
    return ArrayRecord(
        {k: Array(np.asarray(arrays[k].numpy(), dtype=reference[k].numpy().dtype)) for k in arrays}
    )


def same_layout(a: ArrayRecord, b: ArrayRecord) -> bool:
    """True when both records hold the same keys with the same shapes and dtypes."""
    if list(a.keys()) != list(b.keys()):
        return False
    return all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)


@dataclass
class RoundLog:
    """What happened in one round, as the recorder writes it."""

    sampled_train: list[int] = field(default_factory=list)  # partition ids
    sampled_eval: list[int] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    num_replies: int = 0  # accepted training replies
    num_failures: int = 0  # training replies that were errors or were rejected
    aggregated: bool = False  # a new global model was produced
    train_metrics: dict[str, Any] = field(default_factory=dict)
    eval_metrics: dict[str, Any] = field(default_factory=dict)
    clients: list[dict[str, Any]] = field(default_factory=list)
    schedule: dict[str, Any] = field(
        default_factory=dict
    )  # scheduling strategies: tiers, deadlines...
    aggregation: dict[str, Any] = field(default_factory=dict)  # round-level choices of a strategy

    def accepted_entries(self, phase: str = "train") -> dict[int, dict[str, Any]]:
        """Per-client log entries of the replies accepted in `phase`, by partition id."""
        return {
            e["partition_id"]: e
            for e in self.clients
            if e["phase"] == phase and e["status"] == "ok"
        }


class BudgetExhausted(Exception):
    """Raised inside Flower's round loop when the run's simulated-time budget is spent."""


class FedappStrategyMixin:
    """Mixin for Flower `FedAvg`-family strategies; list it first among the bases."""

    seed: int = 0
    min_replies: int = 1
    sim_time_budget_s: float = 0.0  # stop starting rounds once the clock passes this (0 = never)
    # ArrayRecords besides the model that replies must carry (SCAFFOLD's control-variate change)
    extra_array_records: tuple[str, ...] = ()
    # Keys of the client MetricRecord copied into the per-client log.
    logged_metrics: tuple[str, ...] = (
        NUM_EXAMPLES,
        "train_loss",
        "train_steps",
        "train_time_s",
        "eval_loss",
        "eval_accuracy",
    )

    @classmethod
    def from_config(cls, cfg: DictConfig, params: dict[str, Any], common: dict[str, Any]):
        """Build from the Hydra config; subclasses add arguments Flower needs (e.g. q-FedAvg's lr)."""
        return cls(**common, **params)

    def bind(
        self,
        node_partitions: Mapping[int, int],
        seed: int,
        min_replies: int = 1,
        attackers: Iterable[int] = (),
        sim_time_budget_s: float = 0.0,
    ) -> None:
        """Attach the node-id -> partition-id map (from the discovery QUERY) and the seed.

        `attackers` are the partition ids the attack harness corrupts (known to the server
        only to *report* how much weight they got; no strategy may read it to decide).
        """
        self.attackers = frozenset(int(a) for a in attackers)
        self.node_partitions = dict(node_partitions)
        self.partition_nodes = {p: n for n, p in self.node_partitions.items()}
        self.seed = int(seed)
        self.min_replies = int(min_replies)
        self.sim_time_budget_s = float(sim_time_budget_s)
        self.rounds: dict[int, RoundLog] = {}
        self._global_arrays: ArrayRecord | None = None

    # Loss of a model (list of arrays, state-dict order) on operator-held validation rows, set
    # by the ServerApp when `server_val_fraction` > 0; strategies that do not use it ignore it.
    server_loss: Any = None

    def bind_server_validation(self, loss_fn: Any) -> None:
        self.server_loss = loss_fn

    # -- time budget -------------------------------------------------------------------------
    def over_budget(self, grid: Grid) -> bool:
        """True once the clock (fedapp.hetero.ClockGrid) has passed `sim_time_budget_s`."""
        now = getattr(grid, "now", None)
        return bool(self.sim_time_budget_s) and now is not None and now >= self.sim_time_budget_s

    def start(self, grid: Grid, initial_arrays: ArrayRecord, *args: Any, **kwargs: Any):
        """Flower's round loop, ended early (keeping the last global model) when the
        simulated-time budget runs out, so strategies can be compared at equal time."""
        try:
            return super().start(grid, initial_arrays, *args, **kwargs)  # type: ignore[misc]
        except BudgetExhausted:
            from flwr.serverapp.strategy import Result

            log(
                INFO,
                "[fedapp] simulated-time budget of %.0fs spent; stopping",
                self.sim_time_budget_s,
            )
            result = Result()
            result.arrays = self._global_arrays
            return result

    # -- bookkeeping -------------------------------------------------------------------------
    def round_log(self, server_round: int) -> RoundLog:
        return self.rounds.setdefault(server_round, RoundLog())

    def partition_of(self, node_id: int) -> int:
        return self.node_partitions.get(node_id, -1)

    # -- sampling ----------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.over_budget(grid):
            raise BudgetExhausted
        self._grid, self._round, self._global_arrays = grid, server_round, arrays
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._grid, self._round = grid, server_round
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]

    def _construct_messages(
        self, record: RecordDict, node_ids: list[int], message_type: str
    ) -> Iterable[Message]:
        """Replace Flower's unseeded random node choice by a seeded choice of partitions."""
        stream = 0 if message_type == MessageType.TRAIN else 1
        connected = [n for n in self._grid.get_node_ids() if n in self.node_partitions]
        available = [self.node_partitions[n] for n in connected]
        chosen = sample_partitions(
            available, min(len(node_ids), len(available)), self.seed, self._round, stream
        )
        rlog = self.round_log(self._round)
        if message_type == MessageType.TRAIN:
            rlog.sampled_train = chosen
        else:
            rlog.sampled_eval = chosen
        arrays = record.array_records.get("arrays")
        if arrays is not None:
            rlog.bytes_down += arrays.count_bytes() * len(chosen)
        return [
            Message(content=record, message_type=message_type, dst_node_id=self.partition_nodes[p])
            for p in chosen
        ]

    # -- screening ---------------------------------------------------------------------------
    def screen_replies(
        self, server_round: int, replies: Iterable[Message], phase: str
    ) -> list[Message]:
        """Return the replies fit to aggregate; log every reply's fate in the round log."""
        rlog = self.round_log(server_round)
        replies = list(replies)
        candidates: list[tuple[Message, dict[str, Any]]] = []
        for msg in replies:
            entry: dict[str, Any] = {
                "phase": phase,
                "partition_id": self.partition_of(msg.metadata.src_node_id),
                "node_id": msg.metadata.src_node_id,
            }
            rlog.clients.append(entry)
            if msg.has_error():
                entry["status"] = f"error: {msg.error.reason}".strip()[:500]
                continue
            content = msg.content
            if phase == "train":
                arrays = reply_arrays(msg)
                if arrays is not None:
                    rlog.bytes_up += arrays.count_bytes()
                extra = set(content.array_records) - {"arrays", *self.extra_array_records}
                if arrays is None or (len(content.array_records) > 1 and extra):
                    entry["status"] = "rejected: reply must carry exactly one model ArrayRecord"
                    continue
                missing = set(self.extra_array_records) - set(content.array_records)
                if missing:
                    entry["status"] = f"rejected: reply lacks the ArrayRecord(s) {sorted(missing)}"
                    continue
                for name in self.extra_array_records:
                    if not arrays_are_finite(content.array_records[name]):
                        entry["status"] = f"rejected: non-finite values in {name}"
                        break
                    rlog.bytes_up += content.array_records[name].count_bytes()
                if entry.get("status"):
                    continue
                if self._global_arrays is not None and not same_layout(arrays, self._global_arrays):
                    entry["status"] = "rejected: arrays do not match the global model's layout"
                    continue
                if not arrays_are_finite(arrays):
                    entry["status"] = "rejected: non-finite values in arrays"
                    continue
            metrics = reply_metrics(msg)
            if metrics is None or len(content.metric_records) != 1:
                entry["status"] = "rejected: reply must carry exactly one MetricRecord"
                continue
            entry.update({k: metrics[k] for k in self.logged_metrics if k in metrics})
            n = metrics.get(NUM_EXAMPLES)
            if not isinstance(n, int | float) or n <= 0 or not math.isfinite(n):
                entry["status"] = f"rejected: '{NUM_EXAMPLES}' must be a positive number, got {n!r}"
                continue
            if not metrics_are_finite(metrics):
                entry["status"] = "rejected: non-finite metrics"
                continue
            entry["status"] = "ok"
            candidates.append((msg, entry))
        # Flower aborts the whole run on replies with different metric keys; drop the odd ones.
        if candidates:
            key_sets = Counter(tuple(sorted(reply_metrics(m).keys())) for m, _ in candidates)
            majority = key_sets.most_common(1)[0][0]
            for msg, entry in candidates:
                keys = tuple(sorted(reply_metrics(msg).keys()))
                if keys != majority:
                    entry["status"] = (
                        f"rejected: metric keys {list(keys)} differ from {list(majority)}"
                    )
        # Replies arrive in whatever order clients finish; floating-point sums depend on order,
        # so aggregate in partition order to make runs with the same seed bit-for-bit equal.
        accepted = sorted(
            (m for m, e in candidates if e["status"] == "ok"),
            key=lambda m: self.partition_of(m.metadata.src_node_id),
        )
        for entry in rlog.clients:
            if entry["phase"] == phase and entry["status"] != "ok":
                log(
                    WARNING,
                    "round %d %s: client %s %s",
                    server_round,
                    phase,
                    entry["partition_id"],
                    entry["status"],
                )
        return accepted

    # -- aggregation -------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        accepted = self.screen_replies(server_round, replies, "train")
        rlog = self.round_log(server_round)
        rlog.num_replies = len(accepted)
        rlog.num_failures = len(rlog.sampled_train) - len(accepted)
        if len(accepted) < self.min_replies:
            log(
                WARNING,
                "round %d: %d valid replies < min_replies=%d; keeping the previous global model",
                server_round,
                len(accepted),
                self.min_replies,
            )
            return None, None
        self._log_weights(rlog, accepted)
        arrays, metrics = self.aggregate_accepted(server_round, accepted)
        arrays = self.finite_or_none(server_round, arrays)
        rlog.aggregated = arrays is not None
        rlog.train_metrics = dict(metrics) if metrics is not None else {}
        return arrays, metrics

    def aggregate_accepted(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The aggregation rule proper, over screened replies in partition order.

        Flower's own rule by default; strategies with their own math (trust) override this
        and keep the screening, `min_replies`, NaN guard and round log above.
        """
        return super().aggregate_train(server_round, accepted)  # type: ignore[misc]

    def finite_or_none(self, server_round: int, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """Refuse an aggregate with NaN/Inf (finite updates can still overflow when summed, e.g.
        under boosted model poisoning): the previous global model is kept and the round logged."""
        if arrays is not None and not arrays_are_finite(arrays):
            log(
                WARNING,
                "round %d: the aggregate has non-finite values; keeping the previous global model",
                server_round,
            )
            return None
        return arrays

    # -- influence ---------------------------------------------------------------------------
    def client_weights(self, accepted: list[Message]) -> list[float] | None:
        """Share of the aggregate each accepted reply gets (sums to 1), or None if undefined.

        FedAvg family: n_k / sum n. Robust aggregators override this with their effective
        share (see strategies.robust); it is logged per client as `weight` and summed over
        the attack harness's clients into the round's `attacker_weight`.
        """
        n = np.array([num_examples(m) for m in accepted])
        return (n / n.sum()).tolist() if n.sum() > 0 else None

    def _log_weights(self, rlog: RoundLog, accepted: list[Message]) -> None:
        weights = self.client_weights(accepted)
        if weights is None:
            return
        by_pid = rlog.accepted_entries("train")
        for msg, w in zip(accepted, weights, strict=True):
            entry = by_pid.get(self.partition_of(msg.metadata.src_node_id))
            if entry is not None:
                entry["weight"] = float(w)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        accepted = self.screen_replies(server_round, replies, "evaluate")
        if not accepted:
            return None
        metrics = super().aggregate_evaluate(server_round, accepted)  # type: ignore[misc]
        pooled = dict(metrics) if metrics is not None else {}
        pooled.update(pooled_confusion_metrics(accepted))
        self.round_log(server_round).eval_metrics = pooled
        if pooled:
            log(INFO, "round %d federated evaluation: %s", server_round, pooled)
        return metrics
