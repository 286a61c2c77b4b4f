"""Flower's Byzantine-robust aggregators with fedapp's plumbing, and their effective weights.

The aggregation math is Flower's own (`flwr.serverapp.strategy`): FedMedian, FedTrimmedAvg,
Krum, MultiKrum, Bulyan. What this module adds is the share of the aggregate each client
received, so that robustness runs can report `attacker_weight` on the same axis for every
strategy:

- coordinate-wise rules (median, trimmed mean, Bulyan's final step): the fraction of the
  model's coordinates a client's value entered, times its share inside that coordinate
  (1 for the median of an odd count, 1/2 each for the two middle values of an even count,
  1/kept for a trimmed mean), averaged over coordinates;
- selection rules (Krum, MultiKrum): n_k / sum n over the selected clients, 0 for the others
  (Flower averages the selection weighted by examples).

These shares are recomputed with the same NumPy calls Flower makes (and Flower's own
`select_multikrum`), only when the attack harness is active, since they cost a sort of all
clients' weights.

`num_malicious_nodes: auto` gives Krum, MultiKrum and Bulyan the true expected number of
attackers per round (`expected_attackers`: ceil(attack.fraction x clients_per_round), filled
in by the YAML's interpolation) -- knowledge a real operator does not have, so the comparison
favours these baselines.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Message
from flwr.serverapp import strategy as flwr_strategy

from fedapp.core.flower_compat import select_multikrum
from strategies.base import FedappStrategyMixin, num_examples, reply_arrays


def _layers(msg: Message) -> list[np.ndarray]:
    return reply_arrays(msg).to_numpy_ndarrays()


def coordinate_shares(stacked: np.ndarray, keep_lo: int, keep_hi: int) -> np.ndarray:
    """Per-client share of a coordinate-wise rule that averages sorted positions [lo, hi).

    `stacked` is (K, d). Returns (K,) shares summing to 1. Median of odd K: lo = hi - 1 = K//2;
    of even K: [K/2 - 1, K/2 + 1). Ties are broken by index (stable sort), as with np.sort.
    """
    k = stacked.shape[0]
    order = np.argsort(stacked, axis=0, kind="stable")  # (K, d): client index at each rank
    kept = order[keep_lo:keep_hi]  # clients whose values are averaged, per coordinate
    counts = np.bincount(kept.ravel(), minlength=k).astype(np.float64)
    return counts / counts.sum()


def median_bounds(k: int) -> tuple[int, int]:
    return (k // 2, k // 2 + 1) if k % 2 else (k // 2 - 1, k // 2 + 1)


def trimmed_bounds(k: int, beta: float) -> tuple[int, int]:
    lo = int(beta * k)  # as flwr.serverapp.strategy.fedtrimmedavg.trim_mean
    return lo, k - lo


def _flat_stack(msgs: list[Message]) -> np.ndarray:
    return np.stack(
        [np.concatenate([a.ravel() for a in _layers(m)]).astype(np.float64) for m in msgs]
    )


def resolve_malicious(num_malicious_nodes: int | str, expected_attackers: int) -> int:
    """`num_malicious_nodes`, where "auto" is the attack harness's expected attackers."""
    if num_malicious_nodes == "auto":
        return int(expected_attackers)
    return int(num_malicious_nodes)


class FedMedian(FedappStrategyMixin, flwr_strategy.FedMedian):
    """Coordinate-wise median (Yin et al., ICML 2018, arXiv:1803.01498)."""

    aggregation_rule = "robust"

    def client_weights(self, accepted):
        if not self.attackers:
            return None
        return coordinate_shares(_flat_stack(accepted), *median_bounds(len(accepted))).tolist()


class FedTrimmedAvg(FedappStrategyMixin, flwr_strategy.FedTrimmedAvg):
    """Coordinate-wise trimmed mean, a fraction `beta` cut at each end (Yin et al., 2018)."""

    aggregation_rule = "robust"

    def client_weights(self, accepted):
        if not self.attackers:
            return None
        bounds = trimmed_bounds(len(accepted), self.beta)
        return coordinate_shares(_flat_stack(accepted), *bounds).tolist()


def _selection_shares(accepted: list[Message], selected: list) -> list[float]:
    ids = {id(c) for c in selected}
    n = np.array([num_examples(m) if id(m.content) in ids else 0.0 for m in accepted])
    return (n / n.sum()).tolist() if n.sum() > 0 else [0.0] * len(accepted)


class MultiKrum(FedappStrategyMixin, flwr_strategy.MultiKrum):
    """Multi-Krum (Blanchard et al., NeurIPS 2017): average the m updates with the best Krum scores."""

    aggregation_rule = "robust"

    def __init__(
        self,
        *,
        num_malicious_nodes: int | str = "auto",
        num_nodes_to_select: int | str = "auto",
        expected_attackers: int = 0,
        **kwargs: Any,
    ) -> None:
        f = resolve_malicious(num_malicious_nodes, expected_attackers)
        m = num_nodes_to_select
        m = max(int(kwargs["min_train_nodes"]) - f, 1) if m == "auto" else int(m)
        super().__init__(num_malicious_nodes=f, num_nodes_to_select=m, **kwargs)

    def client_weights(self, accepted):
        if not self.attackers:
            return None
        contents = [m.content for m in accepted]
        selected = select_multikrum(contents, self.num_malicious_nodes, self.num_nodes_to_select)
        return _selection_shares(accepted, selected)


class Krum(FedappStrategyMixin, flwr_strategy.Krum):
    """Krum (Blanchard et al., NeurIPS 2017): keep the one update closest to its n-f-2 neighbours."""

    aggregation_rule = "robust"

    def __init__(
        self, *, num_malicious_nodes: int | str = "auto", expected_attackers: int = 0, **kwargs
    ) -> None:
        f = resolve_malicious(num_malicious_nodes, expected_attackers)
        super().__init__(num_malicious_nodes=f, **kwargs)

    def client_weights(self, accepted):
        if not self.attackers:
            return None
        contents = [m.content for m in accepted]
        return _selection_shares(accepted, select_multikrum(contents, self.num_malicious_nodes, 1))


class Bulyan(FedappStrategyMixin, flwr_strategy.Bulyan):
    """Bulyan (El Mhamdi et al., ICML 2018): Multi-Krum selection of n-2f updates, then per
    coordinate the mean of the n-4f values closest to the median. Needs n >= 4f + 3."""

    aggregation_rule = "robust"

    def __init__(
        self, *, num_malicious_nodes: int | str = "auto", expected_attackers: int = 0, **kwargs
    ) -> None:
        cap = max((int(kwargs["min_train_nodes"]) - 3) // 4, 0)  # Bulyan needs n >= 4 f + 3
        f = min(resolve_malicious(num_malicious_nodes, expected_attackers), cap)
        super().__init__(num_malicious_nodes=f, **kwargs)

    def client_weights(self, accepted):
        if not self.attackers:
            return None
        f, k = self.num_malicious_nodes, len(accepted)
        if k < 4 * f + 3:
            return None
        theta, beta = k - 2 * f, k - 4 * f
        contents = [m.content for m in accepted]
        selected = self.selection_rule(contents, f, theta)
        index = {id(c): i for i, c in enumerate(contents)}
        sel_idx = [index[id(c)] for c in selected]
        shares = np.zeros(k)
        total = 0
        layers = [_layers(accepted[i]) for i in sel_idx]
        for layer_id in range(len(layers[0])):
            stack = np.stack([lay[layer_id] for lay in layers])
            diffs = np.abs(stack - np.median(stack, axis=0))
            idx = np.argpartition(diffs, beta - 1, axis=0)[:beta]  # same call as Flower's
            counts = np.bincount(idx.ravel(), minlength=len(sel_idx))
            for j, c in zip(sel_idx, counts, strict=True):
                shares[j] += c
            total += idx.size
        return (shares / total).tolist() if total else None
