"""Baselines users compare against: Flower's FedAvg, FedProx and q-FedAvg with fedapp's plumbing.

The math is Flower's own (`flwr.serverapp.strategy`); the mixin adds seeded sampling, reply
screening and per-round logs. FedProx only sends `proximal-mu`: the ClientApp adds the
proximal term (`tasks.training.train_classifier`).
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp import strategy as flwr_strategy
from omegaconf import DictConfig

from strategies.base import FedappStrategyMixin, cast_like


class FedAvg(FedappStrategyMixin, flwr_strategy.FedAvg):
    """FedAvg (McMahan et al., AISTATS 2017, arXiv:1602.05629)."""


class FedProx(FedappStrategyMixin, flwr_strategy.FedProx):
    """FedProx (Li et al., MLSys 2020, arXiv:1812.06127); clients minimise loss + mu/2 ||w - w_t||^2."""


class QFedAvg(FedappStrategyMixin, flwr_strategy.QFedAvg):
    """q-FedAvg (Li et al., ICLR 2020, openreview ByexElSYDr); Lipschitz estimate L = 1 / train.lr."""

    def client_weights(self, accepted):
        return None  # q-FedAvg scales updates by loss^q / h_k; no per-client share to report

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        # Flower 1.41's q-FedAvg computes in float64 and returns a float64 model; keep the
        # model's own dtypes so clients' float32 updates still match the global layout.
        if arrays is not None and self._global_arrays is not None:
            arrays = cast_like(arrays, self._global_arrays)
        return arrays, metrics

    @classmethod
    def from_config(cls, cfg: DictConfig, params: dict[str, Any], common: dict[str, Any]):
        return cls(client_learning_rate=float(cfg.train.lr), **common, **params)
