"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in
Heterogeneous Networks", MLSys 2020, arXiv:1812.06127): clients minimise
loss + mu/2 ||w - w_t||^2, which keeps their local models near the global one.

Server part: Flower's FedProx (FedAvg aggregation) with fedapp's plumbing; it sends
`proximal-mu` in every training config. Client part: `ProximalTerm`, a unit that adds the
term to the local loss whenever a training message carries `proximal-mu` > 0 (the contribution
strategy sends it too, for its local continual learning).
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.serverapp import strategy as flwr_strategy
from torch import nn

from fedapp.core.units import ClientUnit, TrainJob
from strategies.base import FedappStrategyMixin
from tasks.training import TrainHook, proximal_term

MU_KEY = "proximal-mu"


class ProximalHook(TrainHook):
    """Adds mu/2 ||w - w_global||^2, w_global = the model as received. The term does not
    depend on the samples: under DP-SGD its gradient mu (w - w_global) is added after the
    noise."""

    sample_independent = True

    def __init__(self, mu: float) -> None:
        self.mu = float(mu)

    def start(self, model: nn.Module, device: torch.device) -> None:
        self.global_params = [p.detach().clone() for p in model.parameters()]

    def extra_loss(self, model, xb, yb, logits) -> torch.Tensor:
        return 0.5 * self.mu * proximal_term(model, self.global_params)

    def private_gradient(self, model: nn.Module) -> None:
        with torch.no_grad():
            for p, g in zip(model.parameters(), self.global_params, strict=True):
                if p.requires_grad and p.grad is not None:
                    p.grad.add_(p - g, alpha=self.mu)


class ProximalTerm(ClientUnit):
    """FedProx's client part."""

    @classmethod
    def wanted(cls, job: TrainJob) -> bool:
        return float(job.config.get(MU_KEY, 0.0)) > 0

    def before_train(self, job: TrainJob) -> None:
        job.hooks.append(ProximalHook(float(job.config[MU_KEY])))


class FedProx(FedappStrategyMixin, flwr_strategy.FedProx):
    """See the module docstring; `conf/strategy/fedprox.yaml`."""

    client_units = (ProximalTerm,)

    def round_config(self, server_round: int, config: ConfigRecord) -> dict[str, Any]:
        return {MU_KEY: self.proximal_mu}
