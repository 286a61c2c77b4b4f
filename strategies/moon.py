"""MOON, model-contrastive federated learning (Li, He, Song, "Model-Contrastive Federated
Learning", CVPR 2021, arXiv:2103.16257).

Under label skew, local training drifts the model's representation away from the global one.
MOON adds a contrastive term to every local step that pulls the representation z of the model
being trained toward z_glob of the received global model and away from z_prev of this client's
own model after its previous participation:

    l = l_sup + mu * l_con,
    l_con = -log( exp(sim(z, z_glob) / tau) / (exp(sim(z, z_glob) / tau) + exp(sim(z, z_prev) / tau)) )

with sim the cosine similarity (the paper's equation 3; mu = 1 and tau = 0.5 by default).

Server part: FedAvg's aggregation; it sends `moon-mu` and `moon-temperature`. Client part:
`MoonTerm`, a unit (fedapp/core/units.py) that keeps the client's last local model in the node's
persistent state (Flower's `Context.state`) and adds the term through a training hook.

Deviations from the paper, stated: (1) the representation is the input of the model's last
linear layer (the penultimate features) instead of a separate projection head, so that every
task's model works unchanged and nothing but the usual weights is aggregated; (2) a client
that has not trained before uses the received global model as its previous model, as the
paper's code initialises its per-client models, which makes the term constant (log 2, no
gradient) in a client's first participation.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import strategy as flwr_strategy
from torch import nn

from fedapp.core.units import ClientUnit, TrainJob
from strategies.base import FedappStrategyMixin
from tasks.training import TrainHook

PREVIOUS_MODEL = "fedapp.moon-previous"  # this client's last local model, in Context.state


def contrastive_loss(
    z: torch.Tensor, z_global: torch.Tensor, z_previous: torch.Tensor, temperature: float
) -> torch.Tensor:
    """l_con of the module docstring, averaged over the batch (rows are samples)."""
    pos = nn.functional.cosine_similarity(z, z_global, dim=1) / temperature
    neg = nn.functional.cosine_similarity(z, z_previous, dim=1) / temperature
    logits = torch.stack([pos, neg], dim=1)
    target = torch.zeros(len(z), dtype=torch.long, device=z.device)
    return nn.functional.cross_entropy(logits, target)


class Representation:
    """The input of a model's last linear layer on every forward pass (a forward pre-hook)."""

    def __init__(self, model: nn.Module) -> None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("MOON needs a model with a linear output layer")
        self.value: torch.Tensor | None = None
        self.handle = linears[-1].register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.value = inputs[0].flatten(1)

    def remove(self) -> None:
        self.handle.remove()


def _frozen(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class MoonHook(TrainHook):
    """Adds mu * l_con to every local step."""

    def __init__(
        self, mu: float, temperature: float, previous: dict[str, torch.Tensor] | None
    ) -> None:
        self.mu, self.temperature, self.previous = float(mu), float(temperature), previous

    def start(self, model: nn.Module, device: torch.device) -> None:
        self.global_model = _frozen(model)  # the received model (training has not started)
        self.previous_model = _frozen(model)
        if self.previous is not None:
            self.previous_model.load_state_dict(self.previous)
        self.taps = [Representation(m) for m in (model, self.global_model, self.previous_model)]

    def extra_loss(self, model, xb, yb, logits) -> torch.Tensor:
        local, glob, prev = self.taps
        with torch.no_grad():
            self.global_model(xb)
            self.previous_model(xb)
        return self.mu * contrastive_loss(local.value, glob.value, prev.value, self.temperature)

    def finish(self) -> None:
        for tap in getattr(self, "taps", []):
            tap.remove()


class MoonTerm(ClientUnit):
    """MOON's client part: the contrastive term, and the last local model kept for the next
    participation."""

    @classmethod
    def wanted(cls, job: TrainJob) -> bool:
        return float(job.config.get("moon-mu", 0.0)) > 0

    def before_train(self, job: TrainJob) -> None:
        previous = job.state.array_records.get(PREVIOUS_MODEL)
        self.hook = MoonHook(
            float(job.config["moon-mu"]),
            float(job.config.get("moon-temperature", 0.5)),
            previous.to_torch_state_dict() if previous is not None else None,
        )
        job.hooks.append(self.hook)

    def after_train(self, job: TrainJob) -> None:
        self.hook.finish()
        job.state.array_records[PREVIOUS_MODEL] = ArrayRecord(job.model.state_dict())


class Moon(FedappStrategyMixin, flwr_strategy.FedAvg):
    """See the module docstring; `conf/strategy/moon.yaml`."""

    client_units = (MoonTerm,)

    def __init__(self, *, mu: float = 1.0, temperature: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mu < 0 or temperature <= 0:
            raise ValueError(f"MOON needs mu >= 0 and temperature > 0, got {mu}, {temperature}")
        self.mu, self.temperature = float(mu), float(temperature)

    def round_config(self, server_round: int, config: ConfigRecord) -> dict[str, Any]:
        return {"moon-mu": self.mu, "moon-temperature": self.temperature}
