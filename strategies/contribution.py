"""Contribution-aware aggregation: every round each client's contribution is scored along
several dimensions, the scores set the aggregation weights, and a ledger accumulates who
contributed how much over the run.

Dimensions (pure functions below, each in [0, 1], higher = more useful):
- `volume`: log(1 + n_k) / log(1 + max n), so size counts, with diminishing returns;
- `diversity`: half the normalised entropy of the client's label histogram, half its
  agreement with the round's pooled histogram (1 - Jensen-Shannon divergence, base 2);
  histograms are what clients report (`label-counts`), untrusted but checked for shape;
- `gain`: the relative drop of the client's local validation loss during its local training
  ((before - after) / before, clipped to [-1, 1] and mapped to [0, 1]); 0.5 (neutral) when a
  client has no validation rows;
- `norm`: update norm relative to the round's median (1 inside [norm_low, norm_high], decaying
  outside; a zero update scores 0), as in the trust strategy;
- `direction`: agreement of the update with the round's sample-weighted mean update,
  max(cosine, 0);
- `marginal` (only when the operator holds validation rows, `server_val_fraction` > 0):
  leave-one-out marginal contribution to the global objective,
  phi_k = L(w_-k) - L(w), where w = sum_j p_j x_j is the round's sample-weighted aggregate,
  w_-k = (w - p_k x_k) / (1 - p_k) the same aggregate without client k, and L the loss on the
  server validation rows (positive: the federation is worse without k). Cost per round:
  K + 1 forward passes over the validation rows and one extra model in memory, no extra
  communication; a round with one client scores it 0. Leave-one-out rather than Shapley
  values: exact Shapley needs 2^K evaluations, truncated Monte-Carlo permutations
  (Ghorbani and Zou 2019) still need O(K x permutations); leave-one-out is the cheapest
  estimator that measures a client's effect on the aggregate itself, at the price of
  under-crediting clients whose updates are redundant with others'.
Each dimension is min-max normalised over the round's clients (a dimension on which all
clients are equal carries no information and becomes 1 for all), mixed with `mix` weights,
and turned into aggregation weights

    w_k  proportional to  n_k * exp((s_k - max s) / temperature)

so a large temperature gives FedAvg, equal scores give FedAvg, and weights are positive and
sum to 1. Without server validation rows the `marginal` dimension is left out of the mix.

Temperature chosen on the server's validation rows (`temperatures`, when
`server_val_fraction` > 0): how peaked the weights should be depends on the federation (under
strong label skew the diverse, helpful clients deserve much more than their sample share; on
IID data any reweighting only lowers the effective sample size). Each round the aggregate is
formed with FedAvg's weights and with every candidate temperature, and the one with the lowest
loss on the validation rows is kept (one forward pass over those rows per candidate, no
communication). FedAvg's weights are always a candidate, so no round's aggregate is worse on
those rows than FedAvg's from the same updates. The choice and every candidate's loss are in
`results.json` under each round's `aggregation`. Without server rows the fixed `temperature`
is used.

Server momentum (`server_momentum`, off by default; `server_learning_rate`): the contribution
weighted aggregate a_t taken as FedAvgM's target, x_{t+1} = x_t - eta u_t with
u_t = beta u_{t-1} + (x_t - a_t) (strategies/aggregation.server_momentum_step). The weights
decide the direction of each round's step, the momentum averages those directions over rounds
(Hsu et al. 2019; Reddi et al. 2021's FedAvgM baseline). With server rows, each candidate
temperature is judged by the validation loss of the model it would become after the step (so
the guarantee above is against FedAvg's weights under the same step). The velocity u_t is
strategy state: a checkpoint holds it and a resumed run continues it; a round that keeps the
previous model leaves it unchanged.

Server Adam (`server_optimizer=adam`, settings in `server_adam`): the weighted aggregate taken as
FedAdam's target instead (Reddi et al. 2021; strategies/aggregation.server_adam_step): the
pseudo-gradient a_t - x_t drives Adam's moments (m_t, v_t), and x_{t+1} = x_t + eta_t m_t /
(sqrt(v_t) + tau), with the bias correction and step count of Flower's FedAdam, so flat weights
take FedAdam's steps on the floating layers (integer layers, such as BatchNorm's batch count,
take the aggregate's value). The moments are strategy state as the velocity is, judged and kept
the same way: a round whose model or moments would not be finite leaves both as they were.

Heterogeneous local work (`normalize_steps`, off by default): clients that take more local steps
move further and pull any weighted average toward their own objective; with `normalize_steps`
the weighted update is FedNova's (each change divided by the client's effective steps, the
mean rescaled by their weighted mean), with the contribution weights in place of n_k / sum n.

Local continual learning (client side, `strategy.local.*`, off for the baselines): a proximal
term mu/2 ||w - w_global||^2 (FedProx's unit, strategies/fedprox.py) and a distillation term
toward the received global model's predictions (`Distillation`, optionally on the not-true
classes only, as FedNTD) keep clients from drifting to their local label mix. The client part
(`client_units`: `ValidationGain`, `ProximalTerm`, `Distillation`) runs on the clients for
this strategy's training messages (fedapp/core/units.py).
"""

from __future__ import annotations

import copy
import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp.strategy import FedAvg
from torch import nn

from fedapp.core.units import ClientUnit, TrainJob
from strategies.aggregation import (
    check_server_adam,
    check_server_step,
    finite_layers,
    flatten,
    sanity_scores,
    server_adam_step,
    server_momentum_step,
    weighted_aggregate,
)
from strategies.base import (
    FedappStrategyMixin,
    layers,
    num_examples,
    reply_arrays,
    reply_metrics,
    to_record,
)
from strategies.fednova import effective_steps, fednova_aggregate
from strategies.fedprox import ProximalTerm
from tasks.training import TrainHook, distillation_term, not_true_logits

DIMENSIONS = ("volume", "diversity", "gain", "norm", "direction", "marginal")
SERVER_OPTIMIZERS = ("sgd", "adam")
# Flower's FedAdam defaults (conf/strategy/fedadam.yaml; beta_1, beta_2, tau are Reddi et al.'s)
ADAM_DEFAULTS = {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.001}


# -- dimensions -----------------------------------------------------------------------------------
def _finite_state(state: list[np.ndarray] | tuple[list[np.ndarray], list[np.ndarray]]) -> bool:
    """Whether a server step's state (sgd's velocity, or Adam's (m_t, v_t)) is finite."""
    if isinstance(state, tuple):
        return finite_layers([*state[0], *state[1]])
    return finite_layers(state)


def volume_scores(n: np.ndarray) -> np.ndarray:
    n = np.asarray(n, dtype=np.float64)
    top = math.log1p(float(n.max())) if len(n) else 1.0
    return np.log1p(n) / top if top > 0 else np.ones_like(n)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits (0 = same distribution, 1 = disjoint supports)."""
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)
    return max(0.0, _entropy(m) - 0.5 * _entropy(p) - 0.5 * _entropy(q))


def diversity_scores(histograms: np.ndarray) -> np.ndarray:
    """0.5 x normalised entropy + 0.5 x (1 - JS divergence to the pooled histogram)."""
    h = np.asarray(histograms, dtype=np.float64)
    if h.ndim != 2 or h.shape[1] < 2:
        return np.ones(len(h))
    pooled = h.sum(axis=0)
    out = np.full(len(h), 0.5)
    if pooled.sum() <= 0:
        return out
    for i, row in enumerate(h):
        if row.sum() <= 0:
            continue
        ent = _entropy(row / row.sum()) / math.log2(h.shape[1])
        out[i] = 0.5 * ent + 0.5 * (1.0 - js_divergence(row, pooled))
    return out


def gain_scores(loss_before: np.ndarray, loss_after: np.ndarray) -> np.ndarray:
    """(clip((before - after) / before, -1, 1) + 1) / 2; 0.5 where unknown (NaN)."""
    b, a = np.asarray(loss_before, np.float64), np.asarray(loss_after, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(b > 0, (b - a) / b, np.nan)
    out = (np.clip(rel, -1.0, 1.0) + 1.0) / 2.0
    return np.where(np.isfinite(out), out, 0.5)


def direction_scores(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """max(cosine(update_k, weighted mean update), 0); 1 for all when the mean is zero."""
    mean = np.asarray(weights, np.float64) @ updates / max(float(np.sum(weights)), 1e-300)
    mn = np.linalg.norm(mean)
    if mn == 0:
        return np.ones(len(updates))
    norms = np.linalg.norm(updates, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = updates @ mean / (norms * mn)
    return np.clip(np.nan_to_num(cos, nan=0.0), 0.0, 1.0)


def leave_one_out(
    clients: Sequence[Sequence[np.ndarray]],
    p: np.ndarray,
    loss: Callable[[list[np.ndarray]], float],
) -> tuple[np.ndarray, float]:
    """(phi_k = L(w_-k) - L(w) for each client, L(w)), w = sum_k p_k x_k (layer-wise)."""
    p = np.asarray(p, np.float64)
    p = p / p.sum()
    layers = range(len(clients[0]))
    w = [sum(p[k] * np.asarray(c[i], np.float64) for k, c in enumerate(clients)) for i in layers]
    full = float(loss(w))
    phi = np.zeros(len(clients))
    if len(clients) < 2:
        return phi, full
    for k, c in enumerate(clients):
        if p[k] >= 1.0 - 1e-12:
            continue  # nobody else carries weight: there is no aggregate without k
        w_k = [(w[i] - p[k] * np.asarray(c[i], np.float64)) / (1.0 - p[k]) for i in layers]
        phi[k] = float(loss(w_k)) - full
    return phi, full


def minmax(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] over clients; a constant dimension becomes all ones (no information)."""
    x = np.asarray(x, np.float64)
    lo, hi = float(x.min()), float(x.max())
    return np.ones_like(x) if hi - lo <= 1e-12 else (x - lo) / (hi - lo)


def combined_score(scores: dict[str, np.ndarray], mix: dict[str, float]) -> np.ndarray:
    """s_k = sum_d mix_d / sum(mix) x minmax(score_d)_k, in [0, 1]."""
    if any(float(v) < 0 for v in mix.values()):
        raise ValueError(f"contribution mix weights must be >= 0, got {dict(mix)}")
    total = sum(float(v) for v in mix.values())
    if total <= 0:
        raise ValueError("the contribution mix needs at least one positive weight")
    k = len(next(iter(scores.values())))
    s = np.zeros(k)
    for dim, m in mix.items():
        if m > 0:
            s += (m / total) * minmax(scores[dim])
    return s


def score_weights(s: np.ndarray, n: np.ndarray, temperature: float | None) -> np.ndarray:
    """w_k ~ n_k exp((s_k - max s) / temperature), summing to 1; temperature None: FedAvg's
    n_k / sum n (the limit of a large temperature)."""
    n = np.asarray(n, np.float64)
    if temperature is None:
        return n / n.sum()
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    w = n * np.exp((s - s.max()) / temperature)
    return w / w.sum()


def combine(
    scores: dict[str, np.ndarray], mix: dict[str, float], n: np.ndarray, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """(combined score s_k, weights w_k ~ n_k exp((s_k - max s) / temperature))."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    s = combined_score(scores, mix)
    return s, score_weights(s, n, temperature)


def select_temperature(
    s: np.ndarray,
    n: np.ndarray,
    candidates: Sequence[float],
    server_loss: Callable[[np.ndarray], float],
) -> tuple[float | None, np.ndarray, dict[float | None, float]]:
    """Pick the weighting whose aggregate has the lowest loss on the server's validation rows.

    The candidates are each temperature in `candidates` and FedAvg's weights (None), so the
    chosen aggregate is never worse on those rows than FedAvg's from the same clients; ties
    go to FedAvg, then to the larger temperature (the less peaked weights).
    `server_loss(weights)` evaluates the aggregate made with `weights`.
    Returns (chosen temperature or None, its weights, loss of every candidate)."""
    order: list[float | None] = [None, *sorted({float(t) for t in candidates}, reverse=True)]
    losses: dict[float | None, float] = {}
    best, best_w, best_loss = None, None, math.inf
    for t in order:
        w = score_weights(s, n, t)
        loss = float(server_loss(w))
        losses[t] = loss
        better = math.isfinite(loss) and (not math.isfinite(best_loss) or loss < best_loss)
        if best_w is None or better:  # a NaN or infinite loss never wins
            best, best_w, best_loss = t, w, loss
    return best, best_w, losses


def contribution_scores(
    n: np.ndarray,
    histograms: np.ndarray | None,
    loss_before: np.ndarray,
    loss_after: np.ndarray,
    updates: np.ndarray,
    norm_low: float = 0.1,
    norm_high: float = 3.0,
    marginal: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every dimension of the module docstring for one round's clients (`diversity` only with
    the clients' label histograms, `marginal` only when given: `leave_one_out` needs the
    server's validation loss)."""
    norms = np.linalg.norm(updates, axis=1)
    med = float(np.median(norms))
    ratio = norms / med if med > 0 else np.ones_like(norms)
    out = {"volume": volume_scores(n)}
    if histograms is not None:
        out["diversity"] = diversity_scores(histograms)
    out |= {
        "gain": gain_scores(loss_before, loss_after),
        "norm": sanity_scores(ratio, norm_low, norm_high),
        "direction": direction_scores(updates, n),
    }
    if marginal is not None:
        out["marginal"] = np.asarray(marginal, np.float64)
    return out


# -- ledger ---------------------------------------------------------------------------------------
@dataclass
class Ledger:
    """Cumulative contribution per client over the run."""

    rows: dict[int, dict[str, float]] = field(default_factory=dict)
    measured: set[str] = field(default_factory=set)  # dimensions scored at least once

    def add(self, pid: int, weight: float, scores: dict[str, float]) -> None:
        row = self.rows.setdefault(
            pid, {"rounds": 0, "total_weight": 0.0, **{d: 0.0 for d in DIMENSIONS}}
        )
        row["rounds"] += 1
        row["total_weight"] += weight
        for d in DIMENSIONS:
            row[d] += scores.get(d, 0.0)
        self.measured.update(scores)

    def table(self) -> list[dict[str, Any]]:
        total = sum(r["total_weight"] for r in self.rows.values()) or 1.0
        out = []
        for pid, r in sorted(self.rows.items()):
            out.append(
                {
                    "partition_id": pid,
                    "rounds": int(r["rounds"]),
                    "total_weight": r["total_weight"],
                    "share": r["total_weight"] / total,
                    **{f"mean_{d}": r[d] / r["rounds"] for d in DIMENSIONS if d in self.measured},
                }
            )
        return out

    def write(self, out_dir: Path) -> None:
        rows = self.table()
        if not rows:
            return
        with (out_dir / "contribution_ledger.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        top = sorted(rows, key=lambda r: -r["share"])[:40]
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(top)), 3.5))
        ax.bar([str(r["partition_id"]) for r in top], [r["share"] for r in top])
        ax.set_xlabel("client (partition id)")
        ax.set_ylabel("share of total aggregation weight")
        ax.set_title("contribution ledger" + (" (top 40)" if len(rows) > 40 else ""))
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "contribution_ledger.png", dpi=110)
        plt.close(fig)


# -- client part -----------------------------------------------------------------------------------
def validation_loss(job: TrainJob) -> float:
    """Loss of the job's model on the client's validation rows (0.0 when it has none:
    'unknown' to the server)."""
    if not len(job.data.val):
        return 0.0
    # evaluating draws from torch's global generator (DataLoader seeds); fork it so that the
    # training that follows (dropout) is the same whether or not the server asked for this
    with torch.random.fork_rng(devices=[]):
        loss = job.task.loss(job.model, job.data.val, job.prep)
    return loss if np.isfinite(loss) else 0.0


class ValidationGain(ClientUnit):
    """Reports the client's validation loss before and after local training (`gain`)."""

    @classmethod
    def wanted(cls, job: TrainJob) -> bool:
        return bool(job.config.get("report-val-gain", 0))

    def before_train(self, job: TrainJob) -> None:
        self.before = validation_loss(job)

    def after_train(self, job: TrainJob) -> None:
        job.reply_metrics["val_loss_before"] = self.before
        job.reply_metrics["val_loss_after"] = validation_loss(job)


class DistillationHook(TrainHook):
    """weight x T^2 KL(received model's predictions || local predictions), on the not-true
    classes only when `not_true` (FedNTD, Lee et al. 2022: the local labels are learnt freely,
    the global model's knowledge of the other classes is kept)."""

    def __init__(self, weight: float, temperature: float, not_true: bool) -> None:
        self.weight, self.temperature, self.not_true = weight, temperature, not_true

    def start(self, model: nn.Module, device: torch.device) -> None:
        self.teacher = copy.deepcopy(model).eval()  # the received global model, frozen
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def extra_loss(self, model, xb, yb, logits) -> torch.Tensor:
        student, target = logits, self.teacher(xb)
        if self.not_true and logits.shape[1] > 2:
            student, target = not_true_logits(logits, yb), not_true_logits(target, yb)
        return self.weight * distillation_term(student, target, self.temperature)


class Distillation(ClientUnit):
    """Distillation toward the received global model (`strategy.local.distill_*`)."""

    @classmethod
    def wanted(cls, job: TrainJob) -> bool:
        return float(job.config.get("distill-weight", 0.0)) > 0

    def before_train(self, job: TrainJob) -> None:
        job.hooks.append(
            DistillationHook(
                float(job.config["distill-weight"]),
                float(job.config.get("distill-temperature", 2.0)),
                bool(job.config.get("distill-not-true", 0)),
            )
        )


# -- server part -----------------------------------------------------------------------------------
class ContributionAware(FedappStrategyMixin, FedAvg):
    """See the module docstring; `conf/strategy/contribution.yaml`."""

    aggregation_rule = "data_dependent"

    client_units = (ValidationGain, ProximalTerm, Distillation)

    def __init__(
        self,
        *,
        mix: dict[str, float] | None = None,
        temperature: float = 0.25,
        temperatures: Sequence[float] = (),
        norm_low: float = 0.1,
        norm_high: float = 3.0,
        normalize_steps: bool = False,
        momentum: float = 0.0,
        local: dict[str, float] | None = None,
        server_momentum: float = 0.0,
        server_learning_rate: float = 1.0,
        server_optimizer: str = "sgd",
        server_adam: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.mix = {d: float((mix or {}).get(d, 1.0)) for d in DIMENSIONS}
        unknown = set(mix or {}) - set(DIMENSIONS)
        if unknown:
            raise ValueError(f"unknown contribution dimensions {sorted(unknown)}; use {DIMENSIONS}")
        combine(
            {d: np.zeros(1) for d in DIMENSIONS}, self.mix, np.ones(1), temperature
        )  # validates
        self.temperature = float(temperature)
        self.temperatures = [float(t) for t in temperatures or ()]
        if any(t <= 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be positive, got {self.temperatures}")
        self.norm_low, self.norm_high = float(norm_low), float(norm_high)
        self.normalize_steps = bool(normalize_steps)
        effective_steps(1, momentum)  # validates
        self.momentum = float(momentum)
        self.local = {k.replace("_", "-"): float(v) for k, v in (local or {}).items()}
        check_server_step(server_momentum, server_learning_rate)
        self.server_momentum = float(server_momentum)
        self.server_learning_rate = float(server_learning_rate)
        self.server_velocity: list[np.ndarray] | None = None  # u_t; strategy state (checkpoint)
        if server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(
                f"unknown server_optimizer {server_optimizer!r}; use one of {SERVER_OPTIMIZERS}"
            )
        self.server_optimizer = server_optimizer
        adam = {**ADAM_DEFAULTS, **(server_adam or {})}
        if set(adam) != set(ADAM_DEFAULTS):
            raise ValueError(
                f"unknown server_adam settings {sorted(set(adam) - set(ADAM_DEFAULTS))}; "
                f"use {sorted(ADAM_DEFAULTS)}"
            )
        self.server_adam = {k: float(v) for k, v in adam.items()}
        check_server_adam(**self.server_adam)
        if server_optimizer == "adam" and (server_momentum != 0 or server_learning_rate != 1):
            raise ValueError(
                "server_optimizer=adam takes its rate from server_adam.eta; leave "
                "server_momentum at 0 and server_learning_rate at 1 (they belong to sgd)"
            )
        if server_optimizer == "sgd" and self.server_adam != ADAM_DEFAULTS:
            # a setting that would be ignored is refused, not silently dropped
            changed = sorted(k for k in ADAM_DEFAULTS if self.server_adam[k] != ADAM_DEFAULTS[k])
            raise ValueError(
                f"server_adam {changed} changed but server_optimizer=sgd ignores it; set "
                "server_optimizer=adam, or leave server_adam at its defaults"
            )
        # Adam's (m_t, v_t); strategy state (checkpoint)
        self.server_moments: tuple[list[np.ndarray], list[np.ndarray]] | None = None
        self.ledger = Ledger()
        self._told_no_marginal = False

    def round_config(self, server_round: int, config: ConfigRecord) -> dict[str, Any]:
        # ask clients for their validation loss before and after training, and send the
        # local continual-learning terms
        return {"report-val-gain": 1, **self.local}

    def client_weights(self, accepted: list[Message]) -> None:
        return None  # logged by aggregate_accepted with the scores behind them

    def aggregate_accepted(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        keys = list(self._global_arrays.keys())
        g = layers(self._global_arrays, keys)
        clients = [layers(reply_arrays(m), keys) for m in accepted]
        n = np.array([num_examples(m) for m in accepted])
        metrics = [reply_metrics(m) for m in accepted]
        counts = [list(m["label-counts"]) if "label-counts" in m else None for m in metrics]
        width = max((len(c) for c in counts if c is not None), default=0)
        # no histograms at all (privacy=sample_dp does not send them): diversity is left out
        hist = (
            np.array([c if c and len(c) == width else [0] * width for c in counts], np.float64)
            if width
            else None
        )
        before = np.array([float(m.get("val_loss_before", np.nan)) for m in metrics])
        after = np.array([float(m.get("val_loss_after", np.nan)) for m in metrics])
        g_flat = flatten(g, floats_only=False)
        updates = np.stack([flatten(c, floats_only=False) - g_flat for c in clients])
        marginal = None
        if self.server_loss is not None and self.mix["marginal"] > 0:
            marginal, _ = leave_one_out(clients, n, self.server_loss)
        elif self.mix["marginal"] > 0 and not self._told_no_marginal:
            self._told_no_marginal = True
            log(
                INFO,
                "[fedapp] contribution: no server validation rows (server_val_fraction=0); "
                "the `marginal` dimension is left out",
            )
        scores = contribution_scores(
            n, hist, before, after, updates, self.norm_low, self.norm_high, marginal
        )
        mix = {d: m for d, m in self.mix.items() if d in scores}
        if sum(mix.values()) <= 0:  # only `marginal` was asked for and there is no server data
            mix = dict.fromkeys(scores, 1.0)
        combined, weights = combine(scores, mix, n, self.temperature)
        if self.normalize_steps:  # FedNova's normalisation, with the contribution weights as p_k
            steps = [float(m.get("train_steps", 0.0)) for m in metrics]

            def aggregate(w: np.ndarray) -> list[np.ndarray]:
                return fednova_aggregate(g, clients, w, steps, self.momentum)
        else:
            ones = np.ones(len(clients))

            def aggregate(w: np.ndarray) -> list[np.ndarray]:
                return weighted_aggregate(g, clients, w, ones)

        if self.server_loss is not None and self.temperatures:
            # each candidate judged as the model it would become (after the server step)
            chosen, weights, losses = select_temperature(
                combined,
                n,
                self.temperatures,
                lambda w: self.server_loss(self.step(server_round, g, w, aggregate)[0]),
            )
            self.round_log(server_round).aggregation = {
                "temperature": chosen,  # null: FedAvg's weights had the lowest loss
                "server_val_loss": {
                    ("fedavg" if t is None else f"{t:g}"): v for t, v in losses.items()
                },
            }
        new, state = self.step(server_round, g, weights, aggregate)
        by_pid = self.round_log(server_round).accepted("train")
        for i, m in enumerate(accepted):
            pid = self.partition_of(m.metadata.src_node_id)
            per = {d: float(scores[d][i]) for d in scores}
            self.ledger.add(pid, float(weights[i]), per)
            client = by_pid.get(pid)
            if client is not None:
                client.details.update({f"contrib_{d}": v for d, v in per.items()})
                client.details["contrib_score"] = float(combined[i])
                client.weight = float(weights[i])
        agg = self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
        record = to_record(keys, new)
        # the optimizer's state moves on only with a model the round loop keeps: a step that
        # is not finite is refused there (the previous model stays), and so is a round that
        # raised. A finite model whose state overflows (Adam's v_t is float64: a float64
        # layer's d_t of 1e160 makes it inf, and v_t inf freezes every later step) keeps the
        # previous model and state too.
        if state is not None and finite_layers(new):
            if not _finite_state(state):
                self.round_log(server_round).aggregation["server_state_not_finite"] = True
                log(
                    WARNING,
                    "round %d: the server optimizer's state would not be finite; keeping the "
                    "previous global model and state",
                    server_round,
                )
                return None, agg
            if self.server_optimizer == "adam":
                self.server_moments = state
            else:
                self.server_velocity = state
        return record, agg

    def step(
        self, server_round: int, g: list[np.ndarray], weights: np.ndarray, aggregate: Callable
    ) -> tuple[list[np.ndarray], Any]:
        """The round's new model from the weights: their aggregate, after the server step
        when there is one, and the optimizer state it would leave (None without a step: the
        velocity u_t under sgd, Adam's (m_t, v_t)). Pure: the strategy's state is set by the
        caller once the model is kept."""
        a = aggregate(weights)
        if self.server_optimizer == "adam":
            # t as Flower's FedAdam counts it (server_round + 1), so flat weights take its steps
            return server_adam_step(g, a, self.server_moments, server_round + 1, **self.server_adam)
        if self.server_momentum == 0 and self.server_learning_rate == 1.0:
            return a, None
        return server_momentum_step(
            g, a, self.server_velocity, self.server_momentum, self.server_learning_rate
        )

    def write_reports(self, out_dir: Path) -> None:
        """Called by the recorder at the end of the run: the contribution ledger."""
        self.ledger.write(Path(out_dir))
