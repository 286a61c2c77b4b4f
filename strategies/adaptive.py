"""Server optimizers over FedAvg's mean: FedAdam, FedYogi, FedAdagrad (Reddi, Charles, Zaheer,
Garrett, Rush, Konecny, Kumar, McMahan, "Adaptive Federated Optimization", ICLR 2021,
arXiv:2003.00295) and FedAvgM (Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data
Distribution for Federated Visual Classification", 2019, arXiv:1909.06335).

The clients train as under FedAvg; the server takes FedAvg's weighted mean of their models,
and treats delta_t = mean - x_t as a pseudo-gradient for its own optimizer (Reddi et al.,
Algorithm 2):

- m_t = beta_1 m_{t-1} + (1 - beta_1) delta_t;
- v_t = v_{t-1} + delta_t^2 (Adagrad), beta_2 v_{t-1} + (1 - beta_2) delta_t^2 (Adam),
  v_{t-1} - (1 - beta_2) delta_t^2 sign(v_{t-1} - delta_t^2) (Yogi); v_{-1} = 0;
- x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau). Flower's FedAdam scales eta by Adam's bias
  correction sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1)), t the round (Kingma & Ba; not in
  the paper's Algorithm 2);
- FedAvgM: u_t = beta u_{t-1} + (x_t - mean) (u_1 = x_1 - mean), x_{t+1} = x_t - eta u_t.

The math is Flower's own (`flwr.serverapp.strategy`); fedapp's mixin adds seeded sampling,
screening, claim caps and records. The optimizer state (m_t, v_t, the momentum) is strategy
state, so a checkpoint holds it and a resumed run continues it (fedapp.checkpoint).

Declared `aggregation_rule = "server_optimizer"`: the new model is a non-linear function of
the plaintext mean and of state built from earlier means, so central DP (whose noise is
calibrated to the mean itself) and CKKS (the server never sees the mean) refuse these
strategies.
"""

from __future__ import annotations

import copy
from logging import WARNING
from typing import ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy

from strategies.base import FedappStrategyMixin, arrays_are_finite, cast_like


class ServerOptimizerMixin(FedappStrategyMixin):
    """What the four share: the pseudo-gradient is taken against the model this round's
    clients were sent, and the new model keeps the global model's dtypes."""

    aggregation_rule: ClassVar[str] = "server_optimizer"

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ):
        # Flower's configure_train keeps x_t for the update; the mixin's replaces it, so keep
        # it here (every round: a round that kept the previous model leaves x_t unchanged)
        self.current_arrays = self.current_arrays_of(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def current_arrays_of(self, arrays: ArrayRecord):
        return {k: a.numpy() for k, a in arrays.items()}  # FedOpt's form

    # the optimizer's state (Flower's attribute names), kept only when it stays finite
    STATE: ClassVar[tuple[str, ...]] = ("m_t", "v_t", "momentum_vector", "current_arrays")

    def aggregate_accepted(self, server_round: int, accepted: list[Message]):
        before = {k: copy.deepcopy(getattr(self, k, None)) for k in self.STATE}
        arrays, metrics = super().aggregate_accepted(server_round, accepted)
        # Flower's FedAdam multiplies by a float64 scalar (NumPy 2 promotes float32 to it);
        # clients' float32 replies must still match the global model's layout
        if arrays is not None and self._global_arrays is not None:
            arrays = cast_like(arrays, self._global_arrays)
        # A finite reply can overflow the state (delta_t^2 of 3e37 in float32 is inf: v_t
        # inf makes every later step 0, the run frozen). Such a round keeps the previous
        # model, and the state as it was before it.
        if arrays is None or not arrays_are_finite(arrays) or not _finite_state(self):
            for k, v in before.items():
                setattr(self, k, v)
            if arrays is not None:
                log(
                    WARNING,
                    "round %d: the server optimizer's state would not be finite; keeping the "
                    "previous global model and state",
                    server_round,
                )
            return None, metrics
        return arrays, metrics


def _finite_state(strategy: ServerOptimizerMixin) -> bool:
    for name in ("m_t", "v_t", "momentum_vector"):
        value = getattr(strategy, name, None)
        if not value:
            continue
        values = value.values() if isinstance(value, dict) else value
        if not all(np.all(np.isfinite(np.asarray(v))) for v in values):
            return False
    return True


class FedAdam(ServerOptimizerMixin, flwr_strategy.FedAdam):
    """FedAdam (Reddi et al. 2021); see the module docstring; `conf/strategy/fedadam.yaml`."""


class FedYogi(ServerOptimizerMixin, flwr_strategy.FedYogi):
    """FedYogi (Reddi et al. 2021); see the module docstring; `conf/strategy/fedyogi.yaml`."""


class FedAdagrad(ServerOptimizerMixin, flwr_strategy.FedAdagrad):
    """FedAdagrad (Reddi et al. 2021); see the module docstring;
    `conf/strategy/fedadagrad.yaml`."""


class FedAvgM(ServerOptimizerMixin, flwr_strategy.FedAvgM):
    """FedAvgM (Hsu et al. 2019): server SGD with momentum on x_t - mean;
    `conf/strategy/fedavgm.yaml`."""

    def current_arrays_of(self, arrays: ArrayRecord):
        return arrays  # FedAvgM's form (it reads x_t with `to_numpy_ndarrays`)
