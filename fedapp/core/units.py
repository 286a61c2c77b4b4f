"""Client-side units: everything that changes what a client does in a training round.

A unit is a small class with two hooks around local training, `before_train(job)` and
`after_train(job)`, that reads and changes one `TrainJob` (the round's model, data, settings,
the node's persistent state and the reply being built) and may add `TrainHook`s to the local
training loop (loss terms, gradient changes; `tasks.training`). Units live with what they
belong to:

| stage | units | home |
|---|---|---|
| attack | the attack harness (label flip, poisoning, free riders, crashes) | `fedapp/features/attacks.py` |
| augment | synthetic rare-class rows from the federation's DP generator (`augment=rare_class`) | `fedapp/features/synthetic/` |
| privacy | sample-level DP-SGD with Opacus, its accountant and budget | `fedapp/features/privacy.py` |
| strategy | a strategy's client part (FedProx's proximal term, SCAFFOLD's controls, contribution's validation gain and distillation, MOON's contrastive term) | its module in `strategies/`, listed in the strategy class's `client_units` |

The ClientApp (`fedapp/client_app.py`, `compose_units`) composes them for every training
message in one order, stated once here (`STAGES`, outermost first); this module is the
interface only and imports none of them. They nest like middleware: every
`before_train` runs in that order, then local training, then every `after_train` in the
reverse order. So the strategy's part sees the model its own training produced, the attack
harness tampers with what an otherwise honest client would send, and DP-SGD wraps the
training that the strategy's terms shape (sample-independent terms go after its noise).

Device emulation (a real-clock hetero profile: offline, slow, crashing nodes) wraps whole
messages, probes and heartbeats included, so it is a Flower mod registered per handler
(`fedapp.features.hetero.device_emulation_mod`), outside every unit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from omegaconf import DictConfig
from torch import nn

from tasks import ClientData, Task
from tasks.training import TrainHook, TrainSettings

# Composition order, outermost first: before_train in this order, after_train in reverse.
STAGES = ("attack", "augment", "privacy", "strategy")


@dataclass
class TrainJob:
    """One training message as the units see it (built by the ClientApp)."""

    cfg: DictConfig  # the run's resolved config
    task: Task
    data: ClientData  # this client's rows (a unit may replace it, e.g. flipped labels)
    partition_id: int  # -1 for a deployed node holding its own data
    content: RecordDict  # the message as received (model, config, extra records)
    config: ConfigRecord  # the round's training config (content["config"])
    received: ArrayRecord  # the global model as received
    model: nn.Module  # starts as the received model; training changes it in place
    settings: TrainSettings
    prep: dict[str, list[float]]  # federated preprocessing parameters (prep.*)
    state: RecordDict  # the node's persistent state for this run (Flower's Context.state)
    seed: int  # this client's seed for this round
    node_config: dict[str, Any] = field(default_factory=dict)  # Flower's, of this node
    run_id: int = 0
    run_key: str = ""  # the server run (chain of resumed runs): fedapp.features.privacy.run_key
    num_clients: int = 0  # the federation's size (fedapp.core.node.Node.num_clients)
    hooks: list[TrainHook] = field(default_factory=list)  # added to the training loop
    # False: a unit sends made-up weights instead of training (attack harness); it then sets
    # `metrics` itself.
    trains: bool = True
    metrics: dict[str, float] = field(default_factory=dict)  # from training (or made up)
    reply_metrics: dict[str, Any] = field(default_factory=dict)  # extra reply metrics
    reply_records: dict[str, ArrayRecord] = field(default_factory=dict)  # extra ArrayRecords
    withheld: set[str] = field(default_factory=set)  # reply metrics not to send (privacy)
    synthetic_rows: int = 0  # rows a unit added to `data.train` (augment); not the client's own
    # The model to send, when a unit replaces it by something else than the trained model's
    # state dict (compressed or encrypted arrays); None: ArrayRecord(model.state_dict()).
    outgoing: ArrayRecord | None = None

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        """The received model as a state dict (fresh tensors each call)."""
        return self.received.to_torch_state_dict()

    @property
    def server_round(self) -> int:
        return int(self.config.get("server-round", 0))


class ClientUnit:
    """Base class of client-side units; see the module docstring."""

    stage: ClassVar[str] = "strategy"

    @classmethod
    def wanted(cls, job: TrainJob) -> bool:
        """Whether this unit takes part in this training message (e.g. FedProx's term only
        when the server sent `proximal-mu` > 0)."""
        return True

    def before_train(self, job: TrainJob) -> None:
        """Before local training: change data or settings, add hooks, refuse (raise)."""

    def after_train(self, job: TrainJob) -> None:
        """After local training: change or add to what the reply carries."""


def run_units(job: TrainJob, units: list[ClientUnit]) -> None:
    """before_train outermost first, local training (unless a unit replaced it), after_train
    innermost first."""
    for unit in units:
        unit.before_train(job)
    if job.trains:
        job.metrics = job.task.train(job.model, job.data, job.settings, job.prep, job.hooks)
    for unit in reversed(units):
        unit.after_train(job)
