"""Baselines users compare against: Flower's FedAvg and q-FedAvg with fedapp's plumbing.

The math is Flower's own (`flwr.serverapp.strategy`); the mixin adds seeded sampling, reply
screening and round records. FedProx, whose client adds a proximal term, is in fedprox.py.
"""

from __future__ import annotations

from flwr.serverapp import strategy as flwr_strategy

from strategies.base import FedappStrategyMixin, cast_like


class FedAvg(FedappStrategyMixin, flwr_strategy.FedAvg):
    """FedAvg (McMahan et al., AISTATS 2017, arXiv:1602.05629)."""


class QFedAvg(FedappStrategyMixin, flwr_strategy.QFedAvg):
    """q-FedAvg (Li et al., ICLR 2020, openreview ByexElSYDr); Lipschitz estimate L = 1 /
    `client_learning_rate` (the clients' `train.lr`, by interpolation in the YAML)."""

    aggregation_rule = "fair"

    required_metrics = ("train_loss",)  # F_k(w^t), the loss that weights each update

    def client_weights(self, accepted):
        return None  # q-FedAvg scales updates by loss^q / h_k; no per-client share to report

    def configure_train(self, server_round, arrays, config, grid):
        self.current_arrays = arrays.copy()  # what Flower's q-FedAvg keeps for its update
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        # Flower 1.41's q-FedAvg computes in float64 and returns a float64 model; keep the
        # model's own dtypes so clients' float32 updates still match the global layout.
        if arrays is not None and self._global_arrays is not None:
            arrays = cast_like(arrays, self._global_arrays)
        return arrays, metrics
