"""Personalised federated learning: a model per site, kept by the site.

Each strategy here keeps FedAvg's server (a weighted mean of the updates) and adds a client
part that keeps a personal model (or part of one) in the client's persistent state (Flower's
`Context.state`, kept per client under the run's `client_state/` in simulation or the node's
`state-dir` in deployment, fedapp.features.clients.ClientStateStore: it survives a resumed server and
never leaves the node). At the end of a run every client evaluates the global model and its
personal one on its own held-out rows (fedapp.features.sites; `final.sites` in results.json).

- `local_only`: the baseline a site compares against: every client trains one model on its own
  rows only, with the same budget (rounds x local epochs), and sends no model (an empty
  ArrayRecord: only the usual counts and train metrics leave). The global model stays the
  initial one; the per-site metric of the local model is reported as `local_only`.
- `finetune`: FedAvg, then every client fine-tunes the final global model on its own training
  rows for `epochs` local epochs (the personal model; computed at the end, not kept).
- `fedper` (Arivazhagan et al., "Federated Learning with Personalization Layers",
  arXiv:1912.00818): a shared body and a personal head (the model's last linear layer). The
  client trains the body with its own head and sends the body with the head *as received*,
  so its head never leaves it and the global head stays the initial one. `fedrep` (Collins et
  al., "Exploiting Shared Representations for Personalized Federated Learning", ICML 2021)
  is the same split with FedRep's two-phase local round: `head_epochs` epochs on the head with
  the body frozen, then the round's local epochs on the body with the head frozen.
- `fedbn` (Li et al., "FedBN", ICLR 2021): the same mechanism for the normalisation layers
  (`task.norm=batch` gives the tabular MLP and the FEMNIST CNN BatchNorm layers): their
  weights and running statistics stay with the client.
- `ditto` (Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
  Personalization", ICML 2021): the client trains the global model as FedAvg does, and
  separately its personal model v on min_v f(v) + lambda/2 ||v - w||^2 toward the received
  global model w. Deviation, stated: the step is the implicit (proximal-gradient) form
  v <- v - eta (g + lambda (v - w)) / (1 + eta lambda), which equals Ditto's step to first
  order in eta*lambda and stays stable for any lambda; with plain SGD and lambda -> inf it
  returns w (`lam: .inf` makes the personal model the global one exactly).

Under privacy=sample_dp, `local_only` and `fedper` train only inside the DP-SGD pass the
client's ledger accounts (the personal head is trained by the same private steps); `fedrep`,
`ditto` and `finetune` train a second time on the rows, which the ledger does not count, and
`fedbn`'s BatchNorm has no per-sample gradients: they are refused (their declared
`sample_dp_refusal`, read by fedapp.features.privacy.check_combination). With secure=ckks or
privacy=central_dp all are refused (`aggregation_rule = "personal"`): what they aggregate is
not FedAvg's average of whole models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy
from hydra.utils import get_class
from omegaconf import DictConfig
from torch import nn

from fedapp.core.units import ClientUnit, TrainJob
from strategies.base import FedappStrategyMixin, aggregate_scalar_metrics, reply_arrays
from strategies.records import NUM_EXAMPLES, RoundRecord
from tasks import ClientData, Task
from tasks.training import TrainHook, TrainSettings

PERSONAL_MODEL = "fedapp.personal-model"  # a client's whole personal model, in Context.state
PERSONAL_HEAD = "fedapp.personal-head"  # FedPer/FedRep: its head; FedBN: its norm layers


class PersonalError(ValueError):
    """A personalisation method this run cannot honour (the message says why)."""


def head_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the model's last linear layer (its head)."""
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise PersonalError("a personal head needs a model with a linear output layer")
    prefix = f"{names[-1]}." if names[-1] else ""
    return [k for k in model.state_dict() if k.startswith(prefix) and "." not in k[len(prefix) :]]


def _record(state: Mapping[str, torch.Tensor], keys: list[str] | None = None) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items() if keys is None or k in keys})


# -- client units -----------------------------------------------------------------------------
class LocalTraining(ClientUnit):
    """local_only: train this client's own model (from its state; the received initial model
    in its first round) and send no model."""

    def before_train(self, job: TrainJob) -> None:
        check_combination(job.cfg)  # the node refuses on its own composition of the run
        own = job.state.array_records.get(PERSONAL_MODEL)
        if own is not None:
            job.model.load_state_dict(own.to_torch_state_dict())

    def after_train(self, job: TrainJob) -> None:
        job.state.array_records[PERSONAL_MODEL] = _record(job.model.state_dict())
        job.outgoing = ArrayRecord()  # nothing of its model leaves the client


def norm_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the model's normalisation layers (weights, biases, statistics)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    if not names:
        raise PersonalError(
            "strategy=fedbn needs a model with normalisation layers: set task.norm=batch"
        )
    return [k for k in model.state_dict() if k.rsplit(".", 1)[0] in names]


def input_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the model's first layer (a linear or convolutional input encoder)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not names:
        raise PersonalError("a personal input encoder needs a model with a linear or conv layer")
    prefix = f"{names[0]}."
    return [k for k in model.state_dict() if k.startswith(prefix) and "." not in k[len(prefix) :]]


def fenda_keys(model: nn.Module) -> list[str]:
    """FENDA: the state-dict keys of the local extractor and the head (kept by the client)."""
    keys = [k for k in model.state_dict() if k.startswith(("local_extractor.", "head."))]
    if not any(k.startswith("global_extractor.") for k in model.state_dict()):
        raise PersonalError("strategy=fenda needs FENDA's model: set task.fenda=true")
    return keys


class PersonalLayers(ClientUnit):
    """FedPer / FedRep (the head) and FedBN (the normalisation layers): train with this
    client's own copy of those layers; send them as received."""

    @staticmethod
    def personal_keys(job: TrainJob) -> list[str]:
        """The strategy's declared `personal_layers`: "head", "norm", "fenda" or "input"."""
        kind = getattr(get_class(str(job.cfg.strategy._target_)), "personal_layers", "head")
        if kind == "norm":
            return norm_keys(job.model)
        if kind == "fenda":
            return fenda_keys(job.model)
        if kind == "input":
            return input_keys(job.model)
        return head_keys(job.model)

    def before_train(self, job: TrainJob) -> None:
        check_combination(job.cfg)
        self.keys = self.personal_keys(job)
        if all(n in self.keys for n, _ in job.model.named_parameters()):
            raise PersonalError(
                f"strategy={job.cfg.strategy.name}: this model has no shared layers besides its "
                "personal ones (e.g. task.model=logreg); use a model with hidden layers"
            )
        own = job.state.array_records.get(PERSONAL_HEAD)
        if own is not None:
            job.model.load_state_dict(own.to_torch_state_dict(), strict=False)
        head_epochs = int(job.cfg.strategy.get("head_epochs", 0) or 0)
        if head_epochs > 0:  # FedRep: the head first, body frozen; then the body, head frozen
            frozen = [p for n, p in job.model.named_parameters() if n not in self.keys]
            settings = replace(job.settings, local_epochs=head_epochs)
            _train_only(job.task, job.model, job.data, settings, job.prep, frozen)
            self.head_frozen = [p for n, p in job.model.named_parameters() if n in self.keys]
            for p in self.head_frozen:
                p.requires_grad_(False)

    def after_train(self, job: TrainJob) -> None:
        for p in getattr(self, "head_frozen", []):
            p.requires_grad_(True)
        trained = job.model.state_dict()
        job.state.array_records[PERSONAL_HEAD] = _record(trained, self.keys)
        received = job.global_state
        job.model.load_state_dict({k: received[k] for k in self.keys}, strict=False)


class ProximalStep(TrainHook):
    """Ditto's personal objective as an implicit step: the gradient g becomes
    (g + lam (v - w)) / (1 + lr lam), w the received global model (see the module docstring)."""

    def __init__(self, lam: float, lr: float, global_params: list[torch.Tensor]) -> None:
        self.lam, self.lr, self.global_params = float(lam), float(lr), global_params

    def after_backward(self, model: nn.Module) -> None:
        scale = 1.0 / (1.0 + self.lr * self.lam)
        with torch.no_grad():
            for p, w in zip(model.parameters(), self.global_params, strict=True):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(p - w.to(p.device), alpha=self.lam).mul_(scale)


class DittoPersonal(ClientUnit):
    """Ditto: after the global model's local training, train this client's personal model
    toward the received global model."""

    def before_train(self, job: TrainJob) -> None:
        check_combination(job.cfg)

    def after_train(self, job: TrainJob) -> None:
        lam = float(job.cfg.strategy.lam)
        if not lam >= 0:  # the node's own check (NaN included), whatever the server checked
            raise PersonalError(f"strategy.lam={lam}: Ditto's lambda must be >= 0 (or .inf)")
        received = job.global_state
        personal = job.task.make_model()
        own = job.state.array_records.get(PERSONAL_MODEL)
        personal.load_state_dict(own.to_torch_state_dict() if own is not None else received)
        if math.isinf(lam):
            personal.load_state_dict(received)
        else:
            anchor = [received[n].detach().clone() for n, _ in personal.named_parameters()]
            hook = ProximalStep(lam, job.settings.lr, anchor)
            job.task.train(personal, job.data, job.settings, job.prep, [hook])
        job.state.array_records[PERSONAL_MODEL] = _record(personal.state_dict())


def _train_only(task: Task, model, data, settings, prep, frozen: list[nn.Parameter]) -> None:
    for p in frozen:
        p.requires_grad_(False)
    try:
        task.train(model, data, settings, prep)
    finally:
        for p in frozen:
            p.requires_grad_(True)


# -- the personal model of a site at the end of a run (fedapp.features.sites) ---------------------------
def site_models(
    method: str,
    task: Task,
    data: ClientData,
    state: RecordDict,
    global_state: dict[str, torch.Tensor],
    cfg: DictConfig,
    settings: TrainSettings,
    prep: dict[str, list[float]],
) -> dict[str, nn.Module]:
    """{"personal": ..., "local_only": ...}: the models this client evaluates beside the
    global one, per `method` (a strategy class's `personalisation`); {} when it has none."""

    def model_from(states: dict[str, torch.Tensor], strict: bool = True) -> nn.Module:
        model = task.make_model()
        model.load_state_dict(global_state)
        model.load_state_dict(states, strict=strict)
        return model

    own = state.array_records.get(PERSONAL_MODEL)
    if method == "local_only":
        return {"local_only": model_from(own.to_torch_state_dict())} if own is not None else {}
    if method == "state":  # Ditto
        return {"personal": model_from(own.to_torch_state_dict())} if own is not None else {}
    if method == "layers":
        head = state.array_records.get(PERSONAL_HEAD)
        return {"personal": model_from(head.to_torch_state_dict(), False)} if head else {}
    if method == "finetune":
        model = model_from(global_state)
        epochs = int(cfg.strategy.epochs)
        task.train(model, data, replace(settings, local_epochs=epochs), prep)
        return {"personal": model}
    return {}


def check_combination(cfg: DictConfig) -> None:
    """Refuse what the cross-feature checks (fedapp.checks) cannot see: a strategy that needs
    settings of the task's model (declared `task_requires`: FedBN's normalisation layers,
    FENDA's two extractors) on a model without them. (Privacy and encryption read the
    declared `sample_dp_refusal` and `aggregation_rule`.)"""
    cls = get_class(str(cfg.strategy._target_))
    for key, need in getattr(cls, "task_requires", {}).items():
        have = cfg.task.get(key)
        if have != need:
            want = str(need).lower() if isinstance(need, bool) else need
            raise PersonalError(
                f"strategy={cfg.strategy.name} needs the task's model with task.{key}={want} "
                f"(it has task.{key}={have}): set task.{key}={want}"
            )


class _Personal(FedappStrategyMixin, flwr_strategy.FedAvg):
    """FedAvg's server with a personal client part (see the module docstring)."""

    # how a client builds its personal model at the end (site_models); "" = none
    personalisation: ClassVar[str] = ""
    # PersonalLayers: which layers stay with the client: "head" (the last linear layer),
    # "norm" (the normalisation layers), "fenda" (the local extractor and the head), "input"
    # (the first layer: a per-site input encoder)
    personal_layers: ClassVar[str] = "head"
    # settings of the task's model the strategy needs (check_combination), e.g. {"norm": "batch"}
    task_requires: ClassVar[dict[str, Any]] = {}
    # FedAvg's mean of the shared part only (central DP and CKKS refuse it: their guarantee
    # and sum are for whole-model averages)
    aggregation_rule: ClassVar[str] = "personal"
    # its personal training is a second pass over the rows the DP ledger does not count
    sample_dp_refusal: ClassVar[str] = (
        "it trains the client's personal model in a second pass over its rows that the DP "
        "ledger does not count; use strategy=fedper or local_only (their personal parts are "
        "trained by the accounted DP-SGD steps)"
    )

    def aggregate_accepted(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg's mean in the model's own dtypes: floating-point arrays cast back, integer
        buffers (BatchNorm's batch counter, sent back as received) kept as they were."""
        arrays, metrics = super().aggregate_accepted(server_round, accepted)
        if arrays is None or self._global_arrays is None:
            return arrays, metrics
        ref = self._global_arrays
        out = {}
        for k in arrays:
            dtype = ref[k].numpy().dtype
            value = arrays[k].numpy() if dtype.kind == "f" else ref[k].numpy()
            out[k] = Array(np.asarray(value, dtype=dtype))
        return ArrayRecord(out), metrics


class LocalOnly(_Personal):
    """Every client trains on its own rows only; nothing is aggregated. conf/strategy/local_only.yaml."""

    client_units = (LocalTraining,)
    personalisation = "local_only"
    sample_dp_refusal = ""

    def _screen_train_arrays(self, msg: Message, rec: RoundRecord) -> str | None:
        arrays = reply_arrays(msg)
        # empty, or a codec's empty encoding of nothing (compression: '#int8' of 0 values)
        values = sum(int(np.prod(a.shape)) for a in arrays.values()) if arrays is not None else 0
        if arrays is None or values or len(msg.content.array_records) != 1:
            return "rejected: under local_only a client sends no model (one empty ArrayRecord)"
        return None

    def aggregate_accepted(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        metrics = aggregate_scalar_metrics([m.content for m in accepted], NUM_EXAMPLES)
        return self._global_arrays, metrics  # the global model stays the initial one

    def client_weights(self, accepted: list[Message]) -> list[float] | None:
        return [0.0] * len(accepted)


class FineTune(_Personal):
    """FedAvg, then each client fine-tunes the final model locally. conf/strategy/finetune.yaml."""

    personalisation = "finetune"

    def __init__(self, *, epochs: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(epochs) < 1:
            raise PersonalError(f"strategy.epochs={epochs}: fine-tune for at least 1 epoch")


class FedPer(_Personal):
    """Shared body, personal head. conf/strategy/fedper.yaml."""

    client_units = (PersonalLayers,)
    personalisation = "layers"
    sample_dp_refusal = ""


class FedRep(_Personal):
    """FedPer's split with FedRep's head-then-body local round. conf/strategy/fedrep.yaml."""

    client_units = (PersonalLayers,)
    personalisation = "layers"

    def __init__(self, *, head_epochs: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(head_epochs) < 1:
            raise PersonalError(f"strategy.head_epochs={head_epochs}: FedRep needs >= 1")


class FedBN(_Personal):
    """Local normalisation layers (Li et al., "FedBN: Federated Learning on Non-IID Features
    via Local Batch Normalization", ICLR 2021): every BatchNorm layer's weights and statistics
    stay with the client; the rest is FedAvg. Needs `task.norm=batch`. conf/strategy/fedbn.yaml."""

    client_units = (PersonalLayers,)
    personalisation = "layers"
    personal_layers = "norm"
    task_requires = {"norm": "batch"}
    sample_dp_refusal = (
        "BatchNorm mixes the rows of a batch, so DP-SGD's per-sample gradients are undefined"
    )


class Fenda(_Personal):
    """FENDA-FL (Tian et al., "FENDA-FL: Personalized Federated Learning on Heterogeneous
    Clinical Datasets", 2022): the model (`task.fenda=true`, tasks.models.Fenda) has a global
    feature extractor, federated by FedAvg, and a local one and a head on both extractors'
    features, which stay with the client (sent back as received). Trained in one pass, like
    FedPer, so it runs under sample-level DP. conf/strategy/fenda.yaml."""

    client_units = (PersonalLayers,)
    personalisation = "layers"
    personal_layers = "fenda"
    task_requires = {"fenda": True}
    sample_dp_refusal = ""


class LGFedAvg(_Personal):
    """A per-site input encoder (after LG-FedAvg: Liang et al., "Think Locally, Act Globally:
    Federated Learning with Local and Global Representations", 2020): the model's first layer
    stays with the client, which maps its own columns (or its own recording of them) into
    the representation the shared rest of the model, federated by FedAvg, reads. LG-FedAvg
    keeps several lower layers local; this keeps the first. For sites whose feature spaces
    differ (fedapp's tables map every site's columns into one declared space, with missing-
    value indicators). Trained in one pass, so it runs under sample-level DP.
    conf/strategy/lg_fedavg.yaml."""

    client_units = (PersonalLayers,)
    personalisation = "layers"
    personal_layers = "input"
    sample_dp_refusal = ""


class Ditto(_Personal):
    """FedAvg plus a personal model regularised toward the global. conf/strategy/ditto.yaml."""

    client_units = (DittoPersonal,)
    personalisation = "state"

    def __init__(self, *, lam: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not float(lam) >= 0:
            raise PersonalError(f"strategy.lam={lam}: Ditto's lambda must be >= 0 (or .inf)")
