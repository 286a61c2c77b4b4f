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
the model at that moment; `sim_time_s` is the clock at that point.
"""

from __future__ import annotations

from logging import INFO
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from omegaconf import DictConfig

from strategies.base import FedappStrategyMixin, num_examples, reply_arrays, reply_metrics
from strategies.scheduling import mix, staleness_discount


class FedAsync(FedappStrategyMixin, FedAvg):
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

    @classmethod
    def from_config(cls, cfg: DictConfig, params: dict[str, Any], common: dict[str, Any]):
        return cls(**common, **params)

    def mixing_weight(self, staleness: int, n_k: float, mean_n: float) -> float:
        """alpha_t = alpha * s(staleness) (x n_k / mean n, capped at 1, if weight_by_examples)."""
        a = self.alpha * staleness_discount(
            staleness, self.staleness, self.staleness_a, self.staleness_b
        )
        if self.weight_by_examples and mean_n > 0:
            a *= n_k / mean_n
        return float(min(a, 1.0))

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn=None,
    ) -> Result:
        if not hasattr(grid, "submit"):
            raise TypeError("FedAsync needs the fedapp clock (fedapp.hetero.ClockGrid) as its grid")
        train_config = train_config or ConfigRecord()
        arrays, version = initial_arrays, 0
        self._global_arrays = arrays
        if evaluate_fn:
            evaluate_fn(0, arrays)
        concurrency = min(int(self.min_train_nodes), len(self.partition_nodes))
        inflight: dict[str, tuple[int, int]] = {}  # message id -> (partition id, model version)
        rng = np.random.default_rng([self.seed, 0xA5C])
        sizes: dict[int, float] = {}
        dispatched = 0

        def dispatch(rnd: int) -> None:
            nonlocal dispatched
            busy = {p for p, _ in inflight.values()}
            idle = sorted(set(self.partition_nodes) - busy)
            if not idle:
                return
            pid = int(rng.choice(idle))
            cfg = ConfigRecord({**dict(train_config), "server-round": rnd})
            msg = Message(
                RecordDict({"arrays": arrays, "config": cfg}),
                dst_node_id=self.partition_nodes[pid],
                message_type=MessageType.TRAIN,
            )
            (mid,) = grid.submit([msg])
            inflight[mid] = (pid, version)
            dispatched += 1
            self.round_log(rnd).bytes_down += arrays.count_bytes()

        for _ in range(concurrency):
            dispatch(1)
        result = Result()
        for rnd in range(1, num_rounds + 1):
            if self.over_budget(grid):
                break
            self._round = rnd
            rlog = self.round_log(rnd)
            processed = 0
            while processed < concurrency and inflight:
                event = grid.next_event()
                if event is None:
                    break
                entry = inflight.pop(event.flight.msg_id, None)
                if entry is None:
                    continue
                pid, base = entry
                processed += 1
                rlog.sampled_train.append(pid)
                accepted = self.screen_replies(rnd, [event.reply], "train")
                if accepted:
                    msg = accepted[0]
                    sizes[pid] = num_examples(msg)
                    stale = version - base
                    a = self.mixing_weight(stale, sizes[pid], float(np.mean(list(sizes.values()))))
                    new = mix(
                        [x.numpy() for x in arrays.values()],
                        [x.numpy() for x in reply_arrays(msg).values()],
                        a,
                    )
                    candidate = ArrayRecord(
                        {k: Array(v) for k, v in zip(arrays.keys(), new, strict=True)}
                    )
                    if self.finite_or_none(rnd, candidate) is not None:
                        arrays, version = candidate, version + 1
                        self._global_arrays = arrays
                        rlog.num_replies += 1
                        rlog.aggregated = True
                        entry_log = rlog.clients[-1]
                        entry_log.update({"weight": a, "staleness": stale, "version": version})
                        m = reply_metrics(msg)
                        if "train_loss" in m:
                            rlog.train_metrics["train_loss"] = float(m["train_loss"])
                else:
                    rlog.num_failures += 1
                dispatch(rnd if processed < concurrency else rnd + 1)
            rlog.schedule = {"model_version": version, "in_flight": len(inflight)}
            log(INFO, "[fedasync] round %d: model version %d, sim_t=%.1fs", rnd, version, grid.now)
            result.arrays = arrays
            if evaluate_fn:
                evaluate_fn(rnd, arrays)
        grid.discard(list(inflight))
        result.arrays = arrays
        return result
