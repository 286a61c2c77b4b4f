"""FedNova (Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", NeurIPS 2020, arXiv:2007.07481).

Clients that take more local steps move further; averaging their models (FedAvg) then
optimises a different objective, biased toward the clients that did more work. FedNova
normalises each client's change by its number of effective local steps a_k before averaging,
and rescales the average by the effective steps tau_eff = sum_k p_k a_k:

    d_k = (x - y_k) / a_k,     x <- x - tau_eff * sum_k p_k d_k,     p_k = n_k / sum n

With plain SGD a_k = tau_k (steps taken, reported by the client as `train_steps`); with
momentum rho, a_k = (tau_k - rho (1 - rho^tau_k) / (1 - rho)) / (1 - rho) (the paper's
momentum case). Weight decay is not folded into a_k. When every client takes the same number
of steps, FedNova is FedAvg (tested). Flower's core has no FedNova; this is written from the
paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from strategies.base import (
    FedappStrategyMixin,
    layers,
    num_examples,
    reply_arrays,
    reply_metrics,
    to_record,
)


def effective_steps(tau: float, momentum: float = 0.0) -> float:
    """a_k of FedNova for `tau` local SGD steps with heavy-ball momentum `momentum`."""
    if tau <= 0:
        raise ValueError(f"a client must report at least one local step, got {tau}")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if momentum == 0.0:
        return float(tau)
    rho = momentum
    return float((tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho))


def fednova_aggregate(
    global_arrays: Sequence[np.ndarray],
    client_arrays: Sequence[Sequence[np.ndarray]],
    num_examples: Sequence[float],
    steps: Sequence[float],
    momentum: float = 0.0,
) -> list[np.ndarray]:
    """The FedNova update of the module docstring, layer by layer in each layer's dtype.
    Non-float buffers (counters) take the sample-weighted mean, rounded."""
    p = np.asarray(num_examples, dtype=np.float64)
    if len(p) == 0 or p.sum() <= 0 or np.any(p < 0):
        raise ValueError("num_examples must be non-negative and not all zero")
    p = p / p.sum()
    a = np.array([effective_steps(t, momentum) for t in steps])
    tau_eff = float(p @ a)
    out = []
    for i, g in enumerate(global_arrays):
        g64 = g.astype(np.float64)
        if not np.issubdtype(g.dtype, np.floating):
            mean = sum(
                pk * np.asarray(c[i], np.float64) for pk, c in zip(p, client_arrays, strict=True)
            )
            out.append(np.rint(mean).astype(g.dtype))
            continue
        d = sum(
            (pk / ak) * (g64 - np.asarray(c[i], np.float64))
            for pk, ak, c in zip(p, a, client_arrays, strict=True)
        )
        out.append((g64 - tau_eff * d).astype(g.dtype))
    return out


class FedNova(FedappStrategyMixin, FedAvg):
    """See the module docstring; `conf/strategy/fednova.yaml`."""

    aggregation_rule = "normalized_mean"

    divides_by_steps = True  # replies with train_steps < 1 are rejected by the screening

    def __init__(self, *, momentum: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        effective_steps(1, momentum)  # validates
        self.momentum = float(momentum)

    def aggregate_accepted(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global_arrays is None:
            raise RuntimeError("FedNova needs the global model of the round")
        keys = list(self._global_arrays.keys())
        taus = [float(reply_metrics(m).get("train_steps", 0.0)) for m in accepted]
        new = fednova_aggregate(
            layers(self._global_arrays, keys),
            [layers(reply_arrays(m), keys) for m in accepted],
            [num_examples(m) for m in accepted],
            taus,
            self.momentum,
        )
        metrics = self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
        by_pid = self.round_log(server_round).accepted("train")
        for m, tau in zip(accepted, taus, strict=True):
            client = by_pid.get(self.partition_of(m.metadata.src_node_id))
            if client is not None:
                client.details["fednova_a"] = effective_steps(tau, self.momentum)
        return to_record(keys, new), metrics
