"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", ICML 2020, arXiv:1910.06378), option II.

Client drift under non-IID data is corrected with control variates: the server keeps c, each
client keeps c_i in its persistent state (Flower's `Context.state`, across rounds). Every
local step follows g(y) - c_i + c; afterwards the client sets

    c_i+ = c_i - c + (x - y) / (K * lr)        (K local steps taken, lr the local step size)

and sends its model y and delta_c = c_i+ - c_i. The server averages the models
(x <- x + server_lr * (sum_k p_k y_k - x), p_k = n_k / sum n: the paper averages uniformly;
sample weighting makes SCAFFOLD equal to FedAvg when every control variate is zero) and
updates c <- c + |S|/N * mean_k delta_c_k over the |S| participants of N clients.

Controls cover trainable parameters only (buffers such as running statistics have no
gradient). Both c and delta_c travel as extra ArrayRecords (`scaffold-c`, `scaffold-dc`),
doubling the bytes per round, as in the paper. Flower's core has no SCAFFOLD; this is
written from the paper. The client half is the unit `ScaffoldClient` (fedapp/core/units.py) over
the pure functions `client_correction` / `client_control_update`; it takes part whenever a
training message carries `scaffold-c`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedapp.core.flower_compat import aggregate_arrayrecords
from fedapp.core.units import ClientUnit, TrainJob
from strategies.base import FedappStrategyMixin, reply_arrays, reply_metrics
from tasks.training import TrainHook

SERVER_CONTROL = "scaffold-c"
CONTROL_DELTA = "scaffold-dc"
CLIENT_CONTROL_STATE = "fedapp.scaffold-ci"  # the client's c_i in Context.state


def client_correction(
    names: list[str],
    shapes: Mapping[str, tuple],
    c: Mapping[str, np.ndarray],
    ci: Mapping[str, np.ndarray],
) -> list[np.ndarray]:
    """c - c_i per trainable parameter (missing controls are zero: the first round)."""
    out = []
    for n in names:
        zero = np.zeros(shapes[n], dtype=np.float32)
        out.append(np.asarray(c.get(n, zero), np.float32) - np.asarray(ci.get(n, zero), np.float32))
    return out


def client_control_update(
    names: list[str],
    c: Mapping[str, np.ndarray],
    ci: Mapping[str, np.ndarray],
    x: Mapping[str, np.ndarray],
    y: Mapping[str, np.ndarray],
    steps: float,
    lr: float,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(c_i+, delta_c) of option II: c_i+ = c_i - c + (x - y) / (K lr)."""
    if steps <= 0 or lr <= 0:
        raise ValueError("SCAFFOLD needs at least one local step and a positive learning rate")
    new, delta = {}, {}
    for n in names:
        zero = np.zeros_like(x[n], dtype=np.float32)
        ci_n = np.asarray(ci.get(n, zero), np.float32)
        c_n = np.asarray(c.get(n, zero), np.float32)
        new[n] = (ci_n - c_n + (x[n] - y[n]) / (steps * lr)).astype(np.float32)
        delta[n] = new[n] - ci_n
    return new, delta


def server_control_update(
    c: Mapping[str, np.ndarray], deltas: list[Mapping[str, np.ndarray]], num_clients: int
) -> dict[str, np.ndarray]:
    """c + |S|/N * mean_k delta_c_k = c + sum_k delta_c_k / N."""
    if num_clients <= 0:
        raise ValueError("num_clients must be positive")
    names = sorted({n for d in deltas for n in d} | set(c))
    out = {}
    for n in names:
        total = sum(np.asarray(d[n], np.float64) for d in deltas if n in d)
        base = np.asarray(c[n], np.float64) if n in c else 0.0
        out[n] = (base + total / num_clients).astype(np.float32)
    return out


# -- client part -----------------------------------------------------------------------------------
def _named(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()} if record is not None else {}


class CorrectionHook(TrainHook):
    """Every local step follows g + (c - c_i); the correction does not depend on the samples
    (under DP-SGD it is added after the noise)."""

    sample_independent = True

    def __init__(self, correction: list[torch.Tensor]) -> None:
        self.correction = correction

    def private_gradient(self, model) -> None:
        self.after_backward(model)

    def after_backward(self, model) -> None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        for p, corr in zip(trainable, self.correction, strict=True):
            if p.grad is not None:
                p.grad.add_(corr.to(p.grad.device, p.grad.dtype))


class ScaffoldClient(ClientUnit):
    """SCAFFOLD's client part: c_i in the node's persistent state, the corrected local steps,
    and delta_c in the reply."""

    @classmethod
    def wanted(cls, job: TrainJob) -> bool:
        return SERVER_CONTROL in job.content.array_records

    def before_train(self, job: TrainJob) -> None:
        params = dict(job.model.named_parameters())
        self.names = [n for n, p in params.items() if p.requires_grad]
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        self.c = _named(job.content[SERVER_CONTROL])
        self.ci = _named(job.state.array_records.get(CLIENT_CONTROL_STATE))
        correction = client_correction(self.names, shapes, self.c, self.ci)
        job.hooks.append(CorrectionHook([torch.from_numpy(a) for a in correction]))

    def after_train(self, job: TrainJob) -> None:
        """Store c_i+ in the node's state and send delta_c."""
        steps = float(job.metrics["train_steps"])
        if steps <= 0:  # no local training (an attack harness free rider): controls unchanged
            zero = {
                n: np.zeros(tuple(p.shape), np.float32) for n, p in job.model.named_parameters()
            }
            job.reply_records[CONTROL_DELTA] = ArrayRecord({n: Array(zero[n]) for n in self.names})
            return
        global_state = job.global_state
        x = {n: global_state[n].detach().cpu().numpy() for n in self.names}
        y = {n: p.detach().cpu().numpy() for n, p in job.model.named_parameters() if n in x}
        new, delta = client_control_update(
            self.names, self.c, self.ci, x, y, steps, job.settings.lr
        )
        job.state.array_records[CLIENT_CONTROL_STATE] = ArrayRecord(
            {n: Array(v) for n, v in new.items()}
        )
        job.reply_records[CONTROL_DELTA] = ArrayRecord({n: Array(v) for n, v in delta.items()})


# -- server part -----------------------------------------------------------------------------------
class Scaffold(FedappStrategyMixin, FedAvg):
    """See the module docstring; `conf/strategy/scaffold.yaml`."""

    client_units = (ScaffoldClient,)
    extra_array_records = (CONTROL_DELTA,)

    def __init__(self, *, server_lr: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if server_lr <= 0:
            raise ValueError("server_lr must be positive")
        self.server_lr = float(server_lr)
        self.control: dict[str, np.ndarray] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ):
        messages = list(super().configure_train(server_round, arrays, config, grid))
        c = ArrayRecord({n: Array(v) for n, v in self.control.items()})
        for msg in messages:
            msg.content[SERVER_CONTROL] = c
        self.round_log(server_round).bytes_down += c.count_bytes() * len(messages)
        return messages

    def aggregate_accepted(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        records = [
            RecordDict({"arrays": reply_arrays(m), "metrics": reply_metrics(m)}) for m in accepted
        ]
        avg = aggregate_arrayrecords(records, self.weighted_by_key)
        if self.server_lr != 1.0 and self._global_arrays is not None:
            x = self._global_arrays
            avg = ArrayRecord(
                {
                    k: Array(
                        (x[k].numpy() + self.server_lr * (avg[k].numpy() - x[k].numpy())).astype(
                            x[k].numpy().dtype
                        )
                    )
                    for k in x
                }
            )
        deltas = [
            {n: a.numpy() for n, a in m.content.array_records[CONTROL_DELTA].items()}
            for m in accepted
        ]
        self.control = server_control_update(self.control, deltas, len(self.node_partitions))
        metrics = self.train_metrics_aggr_fn(records, self.weighted_by_key)
        return avg, metrics
