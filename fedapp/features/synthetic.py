"""Differentially private synthetic rows: a generative model per client, shared instead of
(or before) many rounds of model updates, and synthetic rare-class rows for local training.

Seed 004's pipeline, for the tabular tasks (credit, insurance, bankruptcy, medical):

- **The generator** (`TabularVAE`) is a conditional variational autoencoder over a table's
  rows as the task model reads them (`tasks.tabular.featurize`: numeric columns scaled with
  the federated means and standard deviations and clipped to `zclip`, missing-value
  indicators, one-hot categories), conditioned on the label. Numeric columns get a Gaussian
  with a per-row learned variance, indicators a Bernoulli, each categorical a softmax.
  Written here because no maintained DP tabular synthesizer installs with our pins
  (smartnoise-synth pins opacus 0.14, synthcity torch < 2.3); it is plain `nn.Linear`
  layers, so Opacus' per-sample gradients apply as they do to the task models.
- **Trained with DP-SGD** (Opacus, through the same `DPSGDHook` and training loop as the task
  models) when `privacy=sample_dp`: every step is in the client's one ledger
  (`fedapp.features.privacy.Ledger`), after its statistics release and before any DP-SGD of the task
  model, so the epsilon a client reports covers everything it sent. Sampling rows from the
  trained generator reads no real record: post-processing, no further budget.
- **Federated generator rounds** (`generator.rounds`, the seed's "global representation"):
  clients train the generator locally and the server averages it (FedAvg, whatever the
  run's strategy), `GeneratorPhase`.
- **Refinement** (`generator.refine=discriminator`, the seed's generator-discriminator pair
  and its density-aware selection, done so that DP covers them): a discriminator trained with
  DP-SGD on the client's real rows against candidates from its generator picks which
  candidates to send (`refine_rows`). Its steps are in the same ledger, within the
  generator's `epsilon_share`.
- **Left out, and why.** The seed's selection by clustering *real* records and its
  perturbation of real rows' latent codes read records outside DP-SGD; accounting them would
  need a DP clustering we do not have, so candidates come only from the generator's prior
  and the DP discriminator stands in for the selection. The generator is not trained
  adversarially against the discriminator: that would be a DP-GAN, whose discriminator
  trains throughout the generator's training (many more DP-SGD steps from the same budget,
  and GAN training is fragile under DP noise); one discriminator trained after the generator
  buys the density-ratio correction for a fraction of that.

Client and server sides:
- `generator_round` / `synthesize`: the ClientApp's `train.generator` and `train.synthesize`
  handlers (fedapp/client_app.py);
- `RareClassAugment`: `augment=rare_class`, a client-side unit (stage "augment") adding
  synthetic minority-class rows from the federation's generator to local training. The
  generator is sent to each client once and kept in its state (`GEN_CACHE_KEY`); later
  messages carry only its fingerprint (`GEN_DIGEST`, `GeneratorPhase.holders`);
- `GeneratorPhase`, `rows_record` / `screen_rows` and `quality`: the server's side
  (strategies/synthetic.py, fedapp/server_app.py) and the reports.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import TensorDataset

from fedapp.core import seeds
from fedapp.core.config import ConfigError
from fedapp.core.node import client_seed, load_node, round_prep
from fedapp.core.units import ClientUnit, TrainJob
from fedapp.features.privacy import (
    LABELS_KEY,
    DPSGDHook,
    PrivacyBudgetExhausted,
    PrivacyError,
    PrivacySpec,
    calibrate,
    open_ledger,
    plan_inputs,
    planned_participations,
    run_key,
    save_ledger,
    seeded_noise,
)
from tasks.base import ClientData
from tasks.training import TrainHook, TrainSettings, train_classifier

GEN_KEY = "fedapp.generator"  # the generator's ArrayRecord in augment's training messages
GEN_CACHE_KEY = "fedapp.generator-cache"  # a client's copy of it (augment), in its state
GEN_DIGEST = "generator-digest"  # round config (augment): the generator a client must use
ROW_KEYS = ("numeric", "codes", "y")  # a synthetic rows reply's ArrayRecord


class SyntheticError(ConfigError):
    """Invalid synthetic-data settings or an unusable task; the message says what to set."""


class SyntheticRoundFailed(RuntimeError):
    """Too few clients sent usable synthetic rows: the task model could not be trained."""


@dataclass(frozen=True)
class GeneratorSpec:
    """`strategy.generator` (strategy=synthetic) or `augment.generator` (augment=rare_class)."""

    rounds: int = 0  # federated rounds of the generator before it is used (0: local only)
    latent_dim: int = 8
    hidden: int = 64
    epochs: int = 2  # local epochs per generator round
    finetune_epochs: int = 10  # strategy=synthetic: local epochs before sampling
    batch_size: int = 256
    lr: float = 0.05
    momentum: float = 0.9
    zclip: float = 5.0  # numeric features are modelled (and generated) within +-zclip std
    epsilon_share: float = 1.0  # share of each client's target epsilon the generator may spend
    refine: str = "none"  # none | discriminator (strategy=synthetic: `refine_rows`)
    refine_epochs: int = 5  # the discriminator's local epochs
    refine_candidates: int = 4  # candidates drawn per row sent
    refine_share: float = 0.3  # of the generator's epsilon, for the discriminator

    @property
    def vae_share(self) -> float:
        """The share of the generator's epsilon the VAE itself may spend."""
        return 1.0 - self.refine_share if self.refine == "discriminator" else 1.0

    @classmethod
    def from_config(cls, raw: Mapping[str, Any] | DictConfig | None) -> GeneratorSpec:
        if raw is None:
            return cls()
        if isinstance(raw, DictConfig):
            raw = OmegaConf.to_container(raw, resolve=True)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SyntheticError(f"generator: unknown keys {unknown}; known: {sorted(known)}")
        defaults = cls()
        spec = cls(**{k: type(getattr(defaults, k))(v) for k, v in raw.items()})
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.rounds < 0 or self.epochs < 1 or self.finetune_epochs < 0:
            raise SyntheticError("generator: rounds and finetune_epochs >= 0, epochs >= 1")
        if min(self.latent_dim, self.hidden, self.batch_size) < 1 or not self.lr > 0:
            raise SyntheticError("generator: latent_dim, hidden, batch_size and lr must be > 0")
        if not 0 < self.epsilon_share <= 1:
            raise SyntheticError(f"generator.epsilon_share={self.epsilon_share} must be in (0, 1]")
        if not self.zclip > 0:
            raise SyntheticError("generator.zclip must be > 0")
        if self.refine not in ("none", "discriminator"):
            raise SyntheticError(f"generator.refine={self.refine!r}: use none or discriminator")
        if self.refine_epochs < 1 or self.refine_candidates < 2:
            raise SyntheticError("generator: refine_epochs >= 1 and refine_candidates >= 2")
        if not 0 < self.refine_share < 1:
            raise SyntheticError(f"generator.refine_share={self.refine_share} must be in (0, 1)")


def generator_spec(cfg: DictConfig) -> GeneratorSpec:
    """The run's generator settings: strategy=synthetic's, else augment's."""
    if str(cfg.strategy.get("name")) == "synthetic":
        return GeneratorSpec.from_config(cfg.strategy.get("generator"))
    return AugmentSpec.from_config(cfg.get("augment")).generator


def check_generator_message(cfg: DictConfig, policy, sharing: bool) -> None:
    """A client trains a generator only when the run it joined declared one (strategy=
    synthetic, or augment=rare_class for the generator rounds), and sends synthetic rows
    only under strategy=synthetic; never under its `require-secure` policy (the generator and
    the rows travel unencrypted). Anything else is refused (PolicyRefusal): a server cannot
    make a client spend its budget, or send rows, on a phase it did not announce."""
    from fedapp.core.policy import PolicyRefusal

    strategy = str(cfg.strategy.get("name"))
    kind = "train.synthesize (synthetic rows)" if sharing else "train.generator"
    declared = strategy == "synthetic" or (not sharing and augment_active(cfg))
    if not declared:
        raise PolicyRefusal(
            f"{kind}: the run configuration (strategy={strategy}, augment="
            f"{OmegaConf.select(cfg, 'augment.name', default='none')}) has no synthetic-data phase"
        )
    if policy.require_secure:
        raise PolicyRefusal(
            f"{kind}: this institution requires secure=ckks, and a generator or synthetic rows "
            "would leave it unencrypted"
        )


def augment_active(cfg: DictConfig) -> bool:
    augment = cfg.get("augment")
    return augment is not None and str(augment.get("name", "none")) != "none"


# -- the generator -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where each column sits in a featurized row (tasks.tabular.featurize)."""

    numeric: int
    indicators: bool
    categories: tuple[int, ...]  # vocabulary sizes; each block has two more slots: unknown, missing
    num_classes: int = 2

    @classmethod
    def of(cls, task) -> Layout:
        schema = getattr(task, "schema", None)
        if schema is None or not getattr(task, "needs_stats", False):
            raise SyntheticError(
                f"synthetic data is built for tabular tasks (credit, insurance, bankruptcy, "
                f"medical); task={task.name} is not one"
            )
        return cls(
            len(schema.numeric),
            bool(schema.missing_indicators),
            tuple(len(v) for v in schema.categorical.values()),
            int(task.num_classes),
        )

    @property
    def dim(self) -> int:
        return self.numeric * (2 if self.indicators else 1) + sum(k + 2 for k in self.categories)

    @property
    def out_dim(self) -> int:  # numeric means and log-variances, indicator and category logits
        return self.numeric * (3 if self.indicators else 2) + sum(k + 2 for k in self.categories)


class TabularVAE(nn.Module):
    """Conditional VAE; `forward` takes featurized rows with the one-hot label appended and
    returns each row's negative evidence lower bound (so the task models' training loop, with
    `MeanLoss`, trains it, DP-SGD included)."""

    def __init__(self, layout: Layout, latent_dim: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.layout, self.latent_dim = layout, int(latent_dim)
        c = layout.num_classes
        self.enc = nn.Sequential(
            nn.Linear(layout.dim + c, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2 * latent_dim),
        )
        self.dec = nn.Sequential(
            nn.Linear(latent_dim + c, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, layout.out_dim),
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        lay = self.layout
        x, cond = inputs[:, : lay.dim], inputs[:, lay.dim :]
        mu, logvar = self.enc(inputs).chunk(2, dim=1)
        logvar = logvar.clamp(-8.0, 8.0)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        out = self.dec(torch.cat([z, cond], dim=1))
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
        return self.nll(x, out) + kl

    def nll(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of rows `x` under decoder outputs `out` (per row)."""
        lay, n = self.layout, self.layout.numeric
        mean, logv = out[:, :n], out[:, n : 2 * n].clamp(-6.0, 3.0)
        loss = 0.5 * ((x[:, :n] - mean).pow(2) / logv.exp() + logv).sum(dim=1)
        xo, oo = n, 2 * n
        if lay.indicators:
            loss = loss + nn.functional.binary_cross_entropy_with_logits(
                out[:, oo : oo + n], x[:, xo : xo + n], reduction="none"
            ).sum(dim=1)
            xo, oo = xo + n, oo + n
        for k in lay.categories:
            width = k + 2
            logp = torch.log_softmax(out[:, oo : oo + width], dim=1)
            loss = loss - (x[:, xo : xo + width] * logp).sum(dim=1)
            xo, oo = xo + width, oo + width
        return loss


class MeanLoss(nn.Module):
    """The batch mean of the per-row losses the generator's forward returns."""

    def forward(self, per_row: torch.Tensor, _labels: torch.Tensor) -> torch.Tensor:
        return per_row.mean()


def make_generator(task, spec: GeneratorSpec) -> TabularVAE:
    return TabularVAE(Layout.of(task), spec.latent_dim, spec.hidden)


def initial_generator(task, spec: GeneratorSpec, seed: int) -> TabularVAE:
    """The run's initial generator: the same on the server and on every client (from the
    run's seed), so that it need not be sent when there are no generator rounds."""
    with torch.random.fork_rng():
        torch.manual_seed(seeds.torch_seed("synthetic.generator-init", seed))
        return make_generator(task, spec)


def generator_inputs(task, rows, prep: Mapping[str, list[float]], zclip: float) -> TensorDataset:
    """Featurized rows (numerics clipped to +-zclip) with the one-hot label appended."""
    from tasks.tabular import featurize

    x, y = featurize(rows, task.schema, dict(prep)).tensors
    n = len(task.schema.numeric)
    x = x.clone()
    x[:, :n] = x[:, :n].clamp(-zclip, zclip)
    onehot = nn.functional.one_hot(y, int(task.num_classes)).to(x.dtype)
    return TensorDataset(torch.cat([x, onehot], dim=1), y)


def generator_batch(spec: GeneratorSpec, n: int) -> int:
    """The generator's batch size on `n` rows: `batch_size`, but at most n / 8, so that a
    small client still samples (under DP-SGD: amplification by subsampling) rather than
    taking every row in every step."""
    return max(1, min(spec.batch_size, n // 8))


class ClipGradients(TrainHook):
    """Without DP: clip the batch gradient's norm (the DP hook clips per sample instead). The
    learned variances make the likelihood steep; unclipped steps can blow a generator up."""

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = float(max_norm)

    def after_backward(self, model: nn.Module) -> None:
        nn.utils.clip_grad_norm_(model.parameters(), self.max_norm)


def train_generator(vae, task, rows, prep, spec: GeneratorSpec, epochs: int, seed: int, hooks=()):
    """Local training of the generator (DP-SGD when `hooks` holds the DP hook, else with
    clipped batch gradients)."""
    settings = TrainSettings(
        local_epochs=int(epochs),
        batch_size=generator_batch(spec, len(rows)),
        lr=spec.lr,
        momentum=spec.momentum,
        seed=int(seed),
    )
    dataset = generator_inputs(task, rows, prep, spec.zclip)
    hooks = list(hooks) or [ClipGradients()]
    return train_classifier(vae, dataset, settings, loss_fn=MeanLoss(), hooks=hooks)


@torch.no_grad()
def sample_rows(
    vae: TabularVAE, labels: np.ndarray, prep: Mapping[str, list[float]], zclip: float, seed: int
):
    """Rows (tasks.tabular.Rows, in the task's numeric units) for the given labels, drawn
    from the generator's prior: numerics within mean +- zclip std, NaN where the generated
    indicator says missing, categories from the vocabulary or missing (never "unknown")."""
    from tasks.tabular import Rows

    lay = vae.layout
    vae.eval()
    gen = torch.Generator().manual_seed(seeds.torch_seed("synthetic.sample", seed))
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    cond = nn.functional.one_hot(torch.from_numpy(labels), lay.num_classes).float()
    z = torch.randn(n, vae.latent_dim, generator=gen)
    out = vae.dec(torch.cat([z, cond], dim=1))
    k = lay.numeric
    mean, logv = out[:, :k], out[:, k : 2 * k].clamp(-3.0, 3.0)
    zs = (mean + torch.exp(0.5 * logv) * torch.randn(mean.shape, generator=gen)).clamp(
        -zclip, zclip
    )
    mu = np.asarray(prep["prep.mean"], dtype=np.float64)
    sd = np.asarray(prep["prep.std"], dtype=np.float64)
    numeric = zs.double().numpy() * sd + mu
    oo = 2 * k
    if lay.indicators:
        p_missing = torch.sigmoid(out[:, oo : oo + k])
        numeric[torch.bernoulli(p_missing, generator=gen).bool().numpy()] = np.nan
        oo += k
    codes = np.zeros((n, len(lay.categories)), dtype=np.int64)
    for j, size in enumerate(lay.categories):
        logits = out[:, oo : oo + size + 2].clone()
        logits[:, size] = -math.inf  # the "unknown" slot marks values outside the vocabulary
        if n:
            codes[:, j] = torch.multinomial(torch.softmax(logits, 1), 1, generator=gen)[:, 0]
        oo += size + 2
    vae.train()
    return Rows(numeric, codes, labels.copy())


# -- refinement by a DP discriminator (generator.refine=discriminator) --------------------------
# The seed's last two client steps, density-aware selection of representative candidates and
# refinement with a generator-discriminator pair, read real records; here only a discriminator
# trained with DP-SGD reads them. It learns to tell the client's real rows from candidates the
# DP generator drew; its odds estimate the density ratio p_real(x, y) / p_generator(x, y)
# (Azadi et al. 2019, discriminator rejection sampling), and the rows sent are drawn from the
# candidates with weights proportional to those odds, without replacement and within each
# label, so the label histogram is the one drawn before. The generator itself is not trained
# against the discriminator (no adversarial updates); candidates and selection are
# post-processing of DP outputs, so the discriminator's DP-SGD is all the refinement spends.
class Discriminator(nn.Module):
    """Real against generated, on generator inputs (featurized rows, one-hot label appended)."""

    def __init__(self, in_features: int, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2),  # logits: generated, real
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)


def select_by_odds(
    log_odds: np.ndarray, labels: np.ndarray, wanted: np.ndarray, seed: int
) -> np.ndarray:
    """Indices of `len(wanted)` candidates, as many of each label as `wanted` holds, drawn
    without replacement with probability proportional to exp(log_odds) (Efraimidis-Spirakis
    keys: log(u) / w, the largest per label)."""
    rng = seeds.rng("synthetic.select", seed)
    w = np.exp(np.clip(np.asarray(log_odds, dtype=np.float64), -30.0, 30.0))
    keys = np.log(rng.random(len(w))) / w
    chosen = []
    for c, k in zip(*np.unique(wanted, return_counts=True), strict=True):
        pool = np.flatnonzero(labels == c)
        if len(pool) < k:
            raise ValueError(f"{len(pool)} candidates of label {c} for {k} rows")
        chosen.append(pool[np.argsort(-keys[pool], kind="stable")[:k]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def discriminator_log_odds(
    real: torch.Tensor, fake: torch.Tensor, spec: GeneratorSpec, seed: int, hook=None
) -> np.ndarray:
    """Train a `Discriminator` on generator inputs (`generator_inputs`) of real rows against
    generated ones, `spec.refine_epochs` epochs (DP-SGD when `hook` is the DP hook, its batches
    drawn from real and generated rows alike); return its log-odds of "real" for each
    generated row."""
    with torch.random.fork_rng():
        torch.manual_seed(seeds.torch_seed("synthetic.discriminator", seed))
        disc = Discriminator(real.shape[1], spec.hidden)
    target = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))]).long()
    dataset = TensorDataset(torch.cat([real, fake]), target)
    settings = discriminator_settings(spec, len(dataset), seed)
    train_classifier(disc, dataset, settings, hooks=[hook] if hook is not None else [])
    disc.eval()
    with torch.no_grad():
        logits = disc(fake)
    return (logits[:, 1] - logits[:, 0]).double().numpy()


def discriminator_settings(spec: GeneratorSpec, n: int, seed: int) -> TrainSettings:
    return TrainSettings(
        local_epochs=spec.refine_epochs,
        batch_size=generator_batch(spec, n),
        lr=spec.lr,
        momentum=spec.momentum,
        seed=int(seed) ^ 0xD15,
    )


def refine_rows(node, context, spec: GeneratorSpec, vae, prep, labels, seed: int):
    """Rows for `labels`, selected from `refine_candidates` x as many candidates by a
    discriminator trained on the client's real rows against them (DP-SGD under sample_dp,
    calibrated so that the client's generator spending ends at its `epsilon_share`). Returns
    (rows, metrics)."""
    task = node.task
    candidates = sample_rows(
        vae, np.repeat(labels, spec.refine_candidates), prep, spec.zclip, seed ^ 0x5E7
    )
    real = generator_inputs(task, node.data.train, prep, spec.zclip).tensors[0]
    fake = generator_inputs(task, candidates, prep, spec.zclip).tensors[0]
    metrics: dict[str, Any] = {"synthetic-candidates": len(fake)}
    ledger = hook = None
    pspec = PrivacySpec.from_config(node.cfg.get("privacy"))
    if pspec.sample_level:
        ledger, path = client_ledger(node, context, pspec, len(real))
        share = ledger.share(spec.epsilon_share)
        if ledger.epsilon() >= share * (1 - 1e-6):
            raise PrivacyBudgetExhausted(
                f"client {node.partition_id}: nothing of the generator's epsilon share "
                f"{share:g} is left for the discriminator (spent {ledger.epsilon():.3f})"
            )
        n = len(real) + len(fake)
        steps_per_epoch = math.ceil(n / discriminator_settings(spec, n, seed).batch_size)
        sigma = calibrate(
            share,
            ledger.delta,
            1.0 / steps_per_epoch,
            spec.refine_epochs * steps_per_epoch,
            ledger.accountant,
            prefix=ledger.history,
        )
        hook = DPSGDHook(sigma, pspec.max_grad_norm, seeds.torch_seed("dp.refine", seed))
        metrics["dp_refine_noise_multiplier"] = sigma
    log_odds = discriminator_log_odds(real, fake, spec, seed, hook)
    if ledger is not None:
        if hook.steps:
            ledger.record(hook.noise_multiplier, hook.sample_rate, hook.steps)
        save_ledger(ledger, context.state, path)
        metrics["dp_epsilon"] = ledger.epsilon()
    keep = select_by_odds(log_odds, candidates.y, labels, seed)
    return candidates.take(keep), metrics


# -- rows on the wire --------------------------------------------------------------------------
def rows_record(rows, prep: Mapping[str, list[float]]) -> ArrayRecord:
    """Synthetic rows as they travel: numerics as float16 z-scores (the federation's means and
    standard deviations; within +-zclip, where float16 keeps about three digits; NaN =
    missing), category codes and labels as int8 (int16 for vocabularies over 125 values)."""
    mu = np.asarray(prep["prep.mean"], dtype=np.float64)
    sd = np.asarray(prep["prep.std"], dtype=np.float64)
    codes = rows.codes
    code_type = np.int8 if codes.size == 0 or codes.max() < 127 else np.int16
    return ArrayRecord(
        {
            "numeric": Array(np.ascontiguousarray((rows.numeric - mu) / sd, dtype=np.float16)),
            "codes": Array(np.ascontiguousarray(codes, dtype=code_type)),
            "y": Array(np.ascontiguousarray(rows.y, dtype=np.int8)),
        }
    )


def screen_rows(
    record: ArrayRecord,
    layout: Layout,
    prep: Mapping[str, list[float]],
    zclip: float,
    max_rows: int,
):
    """(Rows, None) for a client's synthetic rows that respect the schema, else (None, why):
    the three arrays with consistent shapes, at most `max_rows` rows, numerics finite or
    missing and within +-zclip standard deviations, codes in the vocabulary or missing,
    labels valid. A broken or hostile client's rows are refused whole, never repaired."""
    from tasks.tabular import Rows

    if set(record.keys()) != set(ROW_KEYS):
        return None, f"rejected: synthetic rows must be the arrays {list(ROW_KEYS)}"
    z, codes, y = (record[k].numpy() for k in ROW_KEYS)
    n = len(y)
    if y.ndim != 1 or z.shape != (n, layout.numeric) or codes.shape != (n, len(layout.categories)):
        return None, (
            f"rejected: synthetic rows have shapes numeric {z.shape}, codes {codes.shape}, "
            f"y {y.shape}; the schema has {layout.numeric} numeric and "
            f"{len(layout.categories)} categorical columns"
        )
    if not 0 < n <= max_rows:
        return None, f"rejected: {n} synthetic rows (expected 1 to max_rows={max_rows})"
    z = z.astype(np.float64)
    if np.isinf(z).any():
        return None, "rejected: infinite numeric values in synthetic rows"
    with np.errstate(invalid="ignore"):
        beyond = np.abs(z) > zclip * (1 + 1e-3)
    if beyond.any():
        return None, f"rejected: numeric values beyond +-{zclip:g} std in synthetic rows"
    if not layout.indicators and np.isnan(z).any():
        return None, "rejected: missing numerics, but the schema has no missing indicators"
    sizes = np.asarray(layout.categories, dtype=np.int64)
    codes = codes.astype(np.int64)
    if codes.size and ((codes < 0).any() or (codes > sizes + 1).any() or (codes == sizes).any()):
        return None, "rejected: category codes outside the vocabulary in synthetic rows"
    y = y.astype(np.int64)
    if ((y < 0) | (y >= layout.num_classes)).any():
        return None, "rejected: label values outside the task's classes in synthetic rows"
    mu = np.asarray(prep["prep.mean"], dtype=np.float64)
    sd = np.asarray(prep["prep.std"], dtype=np.float64)
    return Rows(z * sd + mu, codes, y), None


def concat_rows(parts: list):
    from tasks.tabular import Rows

    return Rows(
        np.concatenate([p.numeric for p in parts]),
        np.concatenate([p.codes for p in parts]),
        np.concatenate([p.y for p in parts]),
    )


# -- privacy of the generator (one ledger per client, fedapp.features.privacy) ------------------------------
def client_ledger(node, context, pspec: PrivacySpec, n: int):
    """(the client's ledger, its file) for DP-SGD on its `n` real rows; refuses a delta that
    is not below 1 / n."""
    ledger, path = open_ledger(
        pspec, node.task, node.partition_id, context.state, context.node_config, run_key(context)
    )
    if ledger.delta >= 1.0 / n:
        raise PrivacyError(
            f"privacy.delta={ledger.delta:g} is not below 1/n = 1/{n} for client "
            f"{node.partition_id}; lower privacy.delta"
        )
    return ledger, path


def generator_ledger(
    node, context, job_config: ConfigRecord, spec: GeneratorSpec, n: int, epochs: int
):
    """(ledger, its file, DP hook) for `epochs` local epochs of the generator, or
    (None, None, None) without sample-level DP. The noise multiplier is calibrated once, at a
    client's first generator step, for every generator step it may take in the run (the
    planned generator rounds, plus the fine-tuning of strategy=synthetic), after its
    statistics release, to `epsilon_share` of its target (`vae_share` of that when a
    discriminator refines the rows and spends the rest); a round that would take it beyond
    that share raises PrivacyBudgetExhausted (it does not train)."""
    pspec = PrivacySpec.from_config(node.cfg.get("privacy"))
    if not pspec.sample_level:
        return None, None, None
    ledger, path = client_ledger(node, context, pspec, n)
    steps_per_epoch = max(1, math.ceil(n / generator_batch(spec, n)))
    q = 1.0 / steps_per_epoch
    target = ledger.share(spec.epsilon_share * spec.vae_share)
    if not ledger.generator_noise_multiplier:
        _, per_round = plan_inputs(job_config)
        rounds = planned_participations(spec.rounds, per_round, node.num_clients)
        finetune = spec.finetune_epochs if str(node.cfg.strategy.name) == "synthetic" else 0
        planned = (rounds * spec.epochs + finetune) * steps_per_epoch
        ledger.generator_noise_multiplier = calibrate(
            target, ledger.delta, q, max(planned, 1), ledger.accountant, prefix=ledger.history
        )
    sigma = ledger.generator_noise_multiplier
    after = ledger.epsilon([(sigma, q, epochs * steps_per_epoch)])
    if after > target * (1 + 1e-9):
        raise PrivacyBudgetExhausted(
            f"client {node.partition_id}: the generator has spent epsilon={ledger.epsilon():.3f}; "
            f"{epochs} more epochs would take it to {after:.3f} > its share {target:g}"
        )
    seed = seeds.torch_seed(
        "dp.generator",
        int(job_config.get("seed", 0)),
        int(job_config.get("server-round", 0)),
        node.partition_id,
    )
    hook = DPSGDHook(sigma, pspec.max_grad_norm, seed)
    return ledger, path, hook


def _account(ledger, path, hook, context) -> dict[str, float]:
    if ledger is None:
        return {}
    hook.finish()
    if hook.steps:
        ledger.record(ledger.generator_noise_multiplier, hook.sample_rate, hook.steps)
    save_ledger(ledger, context.state, path)
    return {
        "dp_epsilon": ledger.epsilon(),
        "dp_target_epsilon": ledger.target_epsilon,
        "dp_noise_multiplier": ledger.generator_noise_multiplier,
        "dp_delta": ledger.delta,
        **({"dp_noise_seeded": 1} if seeded_noise() else {}),
    }


def _local_generator(msg: Message, context: Context, sharing: bool):
    """Load the node and the received generator, and train it locally (DP when configured):
    `generator.epochs` in a generator round, `generator.finetune_epochs` before sharing.
    Returns (node, spec, generator, prep, seed, reply metrics)."""
    node = load_node(context)
    check_generator_message(node.cfg, node.policy, sharing)
    spec = generator_spec(node.cfg)
    epochs = spec.finetune_epochs if sharing else spec.epochs
    config = msg.content["config"]
    prep = round_prep(config)
    received = msg.content["arrays"]
    if len(received):
        vae = make_generator(node.task, spec)
        vae.load_state_dict(received.to_torch_state_dict())
    else:  # generator.rounds=0: every client starts from the run's common initial generator
        vae = initial_generator(node.task, spec, int(node.cfg.seed))
    data = node.data
    seed = client_seed(config, node.partition_id)
    torch.manual_seed(seed)
    metrics: dict[str, Any] = {"num-examples": data.num_train}
    if epochs > 0:
        ledger, path, hook = generator_ledger(node, context, config, spec, data.num_train, epochs)
        hooks = [hook] if hook is not None else []
        trained = train_generator(vae, node.task, data.train, prep, spec, epochs, seed, hooks)
        metrics.update(train_steps=trained["train_steps"], train_time_s=trained["train_time_s"])
        if ledger is None:  # a statistic of the rows: sent only without DP
            metrics["train_loss"] = trained["train_loss"]
        metrics.update(_account(ledger, path, hook, context))
    return node, spec, vae, prep, seed, metrics


def generator_round(msg: Message, context: Context) -> Message:
    """`train.generator`: local (DP) epochs of the received generator; the generator back."""
    _, _, vae, _, _, metrics = _local_generator(msg, context, sharing=False)
    content = RecordDict(
        {"arrays": ArrayRecord(vae.state_dict()), "metrics": MetricRecord(metrics)}
    )
    return Message(content, reply_to=msg)


def synthesize(msg: Message, context: Context) -> Message:
    """`train.synthesize`: fine-tune the generator locally (DP), then send `rows_factor` x
    (training rows) synthetic rows, labels drawn from the client's own (under DP: released)
    label histogram, and no model."""
    node, spec, vae, prep, seed, metrics = _local_generator(msg, context, sharing=True)
    strategy = node.cfg.strategy
    n_rows = min(
        int(strategy.max_rows), max(1, round(float(strategy.rows_factor) * node.data.num_train))
    )
    labels = draw_labels({"prep.label_counts": own_label_counts(node, context)}, n_rows, seed)
    if spec.refine == "discriminator":
        rows, refined = refine_rows(node, context, spec, vae, prep, labels, seed)
        metrics.update(refined)
    else:
        rows = sample_rows(vae, labels, prep, spec.zclip, seed ^ 0x5E7)
    metrics["synthetic-rows"] = n_rows
    content = RecordDict({"rows": rows_record(rows, prep), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def own_label_counts(node, context: Context) -> list[float]:
    """This client's label histogram as it may use it: under sample_dp the noisy one it
    released with its statistics (post-processing, no further budget), else its own counts.
    Labels drawn from the federation's histogram instead would misstate how a client's kind
    of rows relates to the label whenever clients differ (they do: natural splits)."""
    if not PrivacySpec.from_config(node.cfg.get("privacy")).sample_level:
        return [float(c) for c in node.data.label_counts]
    if LABELS_KEY not in context.state.config_records:
        raise SyntheticError(
            f"client {node.partition_id} has no released label histogram in its state (its "
            "statistics release is kept with the client's state; was its state-dir lost?)"
        )
    return [max(float(c), 0.0) for c in context.state.config_records[LABELS_KEY]["counts"]]


def draw_labels(
    prep: Mapping[str, list[float]], n: int, seed: int, only: int | None = None
) -> np.ndarray:
    """`n` labels drawn from the histogram `prep.label_counts`, or all `only`."""
    if only is not None:
        return np.full(n, int(only), dtype=np.int64)
    counts = np.maximum(np.asarray(prep["prep.label_counts"], dtype=np.float64), 0.0)
    if counts.sum() <= 0:  # a noisy histogram can be all <= 0: then no preference
        counts = np.ones_like(counts)
    p = counts / counts.sum()
    return seeds.rng("synthetic.labels", seed).choice(len(p), size=n, p=p)


# -- rare-class augmentation (augment=rare_class) --------------------------------------------------
@dataclass(frozen=True)
class AugmentSpec:
    """The `augment` config group."""

    name: str = "none"
    target_fraction: float = 0.3  # the minority class's share of local training after augmenting
    generator: GeneratorSpec = GeneratorSpec(
        rounds=3, epochs=3, finetune_epochs=0, epsilon_share=0.3
    )

    @classmethod
    def from_config(cls, cfg: DictConfig | None) -> AugmentSpec:
        if cfg is None:
            return cls()
        raw = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(raw, dict)
        unknown = sorted(set(raw) - {"name", "target_fraction", "generator"})
        if unknown:
            raise SyntheticError(f"augment: unknown keys {unknown}")
        name = str(raw.get("name", "none"))
        if name not in ("none", "rare_class"):
            raise SyntheticError(f"augment={name}: use none or rare_class")
        frac = float(raw.get("target_fraction", 0.3))
        if not 0 < frac < 1:
            raise SyntheticError(f"augment.target_fraction={frac} must be in (0, 1)")
        return cls(name, frac, GeneratorSpec.from_config(raw.get("generator")))


def generator_digest(arrays: ArrayRecord) -> str:
    """A fingerprint of the generator's weights: a client's cached copy is used only when it is
    the generator the server means (an integrity check across rounds and resumed runs, not a
    security measure; the transport is authenticated by TLS)."""
    h = hashlib.sha256()
    for name, arr in arrays.items():
        h.update(f"{name}|{arr.dtype}|{arr.shape}|".encode())
        h.update(arr.data)
    return h.hexdigest()[:16]


def client_generator(job: TrainJob) -> ArrayRecord:
    """augment=rare_class: the federation's generator for this training message: the copy it
    carries (then kept in the client's state), else the client's kept copy, if it is the one
    the server names. A client that lost its copy (a restarted node without a `state-dir`)
    fails this message with the reason; the server sends the generator with its next one."""
    wanted = str(job.config.get(GEN_DIGEST, ""))
    sent = job.content.array_records.get(GEN_KEY)
    if sent is not None:
        if wanted and generator_digest(sent) != wanted:
            raise SyntheticError(
                "augment=rare_class: the generator in the message does not match the round "
                "config's generator-digest; is the ServerApp from another fedapp version?"
            )
        job.state.array_records[GEN_CACHE_KEY] = sent
        return sent
    kept = job.state.array_records.get(GEN_CACHE_KEY)
    if not wanted:
        raise SyntheticError(
            "augment=rare_class: the training message carries no generator and no "
            "generator-digest; is the ServerApp from another fedapp version?"
        )
    if kept is None or generator_digest(kept) != wanted:
        raise SyntheticError(
            "augment=rare_class: this client holds no copy of the federation's generator "
            f"{wanted} (its node restarted or lost its state); the server sends it again "
            "with this client's next training message"
        )
    return kept


def rare_class_count(labels: np.ndarray, minority: int, fraction: float) -> int:
    """How many minority rows to add so that they make `fraction` of the training rows."""
    return rare_class_rows(len(labels), int((np.asarray(labels) == minority).sum()), fraction)


def rare_class_rows(n: int, have: int, fraction: float) -> int:
    """How many rows to add to `have` of `n` so that they make `fraction` of the rows."""
    n, have = int(n), int(have)
    k = max(0, math.ceil((fraction * n - have) / (1.0 - fraction)))
    # the closed form can land one above in floating point (n=1, fraction=0.9: 9.000...02)
    while k > 0 and (have + k - 1) / (n + k - 1) >= fraction:
        k -= 1
    return k


class RareClassAugment(ClientUnit):
    """augment=rare_class: before local training, add synthetic rows of the federation's
    minority class (by the DP-released label histogram) from the federation's generator (sent
    with the client's first training message and kept; `client_generator`) until they make
    `target_fraction` of this client's training rows. DP-SGD
    (stage "privacy", after this one) then samples from real and synthetic rows alike; the
    synthetic ones are a function of the DP generator, so the accounting of real rows holds."""

    stage = "augment"

    @classmethod
    def wanted(cls, job: TrainJob) -> bool:
        return augment_active(job.cfg)

    def before_train(self, job: TrainJob) -> None:
        generator = client_generator(job)
        spec = AugmentSpec.from_config(job.cfg.get("augment"))
        vae = make_generator(job.task, spec.generator)
        vae.load_state_dict(generator.to_torch_state_dict())
        minority = int(np.argmin(np.asarray(job.prep["prep.label_counts"])))
        if PrivacySpec.from_config(job.cfg.get("privacy")).sample_level:
            # the reply's row count must not reveal the exact minority count: it comes from
            # the noisy histogram the client released with its statistics (post-processing)
            released = job.state.config_records.get(LABELS_KEY)
            if released is None:
                raise SyntheticError(
                    f"client {job.partition_id} has no released label histogram in its state "
                    "(kept from its statistics release); was its state-dir lost?"
                )
            n = len(job.data.train.y)
            have = min(max(round(float(released["counts"][minority])), 0), n)
            k = rare_class_rows(n, have, spec.target_fraction)
        else:
            k = rare_class_count(job.data.train.y, minority, spec.target_fraction)
        job.reply_metrics["synthetic-rows"] = k
        job.synthetic_rows = k
        if not k:
            return
        extra = sample_rows(
            vae,
            draw_labels(job.prep, k, 0, only=minority),
            job.prep,
            spec.generator.zclip,
            job.seed ^ 0xA06,
        )
        train = concat_rows([job.data.train, extra])
        job.data = ClientData(
            train=train,
            val=job.data.val,
            label_counts=np.bincount(train.y, minlength=int(job.task.num_classes)),
        )


# -- the server's generator rounds ----------------------------------------------------------------
class GeneratorPhase:
    """Rounds 1..`spec.rounds` of a run: the generator trained federatedly (FedAvg of the
    clients' local, DP, epochs), through the run's strategy's sampling, screening and round
    records, whatever its own aggregation rule (a trust or robust rule is about task-model
    updates). Its state (`arrays`) is an attribute of the strategy, so checkpoints carry it.

    augment=rare_class then sends the final generator to each client once: `holders` are the
    partitions whose last training message (after the generator rounds) carried it or found
    it kept, and that replied without an error. A client that errs or does not reply leaves
    them (it may have lost its copy) and gets the generator again the next time."""

    record_key = (
        GEN_KEY  # fedapp.core.plugins.PrePhase: the generator's record in training messages
    )

    def __init__(self, spec: GeneratorSpec, initial: ArrayRecord) -> None:
        self.spec = spec
        self.arrays = initial
        self.holders: set[int] = set()

    def train_config(self, num_rounds: int) -> dict[str, Any]:
        """What every training round's ConfigRecord says: the rounds DP-SGD is planned for
        (those after the generator's) and the generator a client must use."""
        return {
            "dp-rounds": max(1, num_rounds - self.spec.rounds),
            GEN_DIGEST: generator_digest(self.arrays),
        }

    def note_replies(self, expected: Iterable[int], ok: Iterable[int]) -> None:
        """A training round's outcome: the partitions that replied without an error hold the
        generator; the other expected ones may not."""
        ok = set(ok)
        self.holders = (self.holders | ok) - (set(expected) - ok)

    def resumed(self) -> None:
        """A resumed run cannot know whether clients kept their copies (a deployed node
        without `state-dir` keeps `Context.state` for one Flower run only): send it again."""
        self.holders = set()

    def run(
        self, strategy, grid, config, timeout, evaluate_fn, task_arrays, start_round: int
    ) -> None:
        # strategies.base imports this module (GEN_KEY): its helpers are imported here
        from strategies.aggregation import weighted_aggregate
        from strategies.base import layers, num_examples, to_record

        for rnd in range(start_round, self.spec.rounds + 1):
            if strategy.stop_for_budget(grid):
                return
            strategy._round, task_global = rnd, strategy._global_arrays
            strategy._global_arrays = self.arrays  # replies are screened against the generator
            try:
                msgs = strategy._messages(
                    rnd,
                    self.arrays,
                    ConfigRecord({**dict(config), "server-round": rnd}),
                    grid,
                    f"{MessageType.TRAIN}.generator",
                )
                replies = grid.send_and_receive(msgs, timeout=timeout)
                accepted = strategy.screen_replies(rnd, list(replies), "train")
            finally:
                strategy._global_arrays = task_global
            rec = strategy.round_log(rnd)
            rec.aggregation["phase"] = "generator"
            rec.num_replies = len(accepted)
            rec.num_failures = len(rec.expected) - len(accepted)
            if len(accepted) < strategy.min_replies:
                log(
                    WARNING,
                    "round %d: %d generator updates < min_replies; generator kept",
                    rnd,
                    len(accepted),
                )
            else:
                n = np.array([num_examples(m) for m in accepted])
                keys = list(self.arrays.keys())
                clients = [layers(m.content["arrays"], keys) for m in accepted]
                new = weighted_aggregate(
                    layers(self.arrays, keys), clients, n / n.sum(), np.ones(len(n))
                )
                self.arrays = to_record(keys, new)
                rec.aggregated = True
                strategy.set_weights(rec, accepted, (n / n.sum()).tolist())
                log(INFO, "round %d: generator averaged over %d clients", rnd, len(accepted))
            if evaluate_fn:
                evaluate_fn(rnd, task_arrays)


# -- quality of synthetic rows (reports; never a privacy guarantee) ---------------------------------
def _features(task, rows, prep) -> np.ndarray:
    from tasks.tabular import featurize

    return featurize(rows, task.schema, dict(prep)).tensors[0].numpy().astype(np.float64)


def closest_distances(a: np.ndarray, b: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """For each row of `a`, the Euclidean distance to its closest row of `b`."""
    tb = torch.from_numpy(b)
    out = [
        torch.cdist(torch.from_numpy(a[i : i + chunk]), tb).min(dim=1).values
        for i in range(0, len(a), chunk)
    ]
    return torch.cat(out).numpy() if out else np.zeros(0)


def quality(synth, real, task, prep, max_rows: int = 3000, seed: int = 0) -> dict[str, Any]:
    """How close synthetic rows are to real ones, column by column, and how close each is to
    its nearest real record (in the task model's feature space: scaled numerics, indicators,
    one-hot categories; up to `max_rows` of each, drawn with `seed`):

    - `ks_numeric`: per numeric column, the Kolmogorov-Smirnov statistic between the present
      values (0 = same distribution, 1 = disjoint); `missing_rate_gap` the difference of the
      shares of missing values;
    - `tv_categorical` and `tv_label`: total-variation distance of the category and label
      frequencies (0 = same, 1 = disjoint);
    - `dcr`: distance from each synthetic row to the closest real row (median and 5th
      percentile). Small distances to members with larger ones to non-members would suggest
      copied records; bench/synthetic.py compares the two."""
    from scipy.stats import ks_2samp

    schema = task.schema
    ks, gaps = {}, {}
    for j, col in enumerate(schema.numeric):
        a, b = synth.numeric[:, j], real.numeric[:, j]
        pa, pb = a[~np.isnan(a)], b[~np.isnan(b)]
        ks[col] = float(ks_2samp(pa, pb).statistic) if len(pa) and len(pb) else 1.0
        gaps[col] = float(abs(np.isnan(a).mean() - np.isnan(b).mean()))
    tv = {}
    for j, (col, vocab) in enumerate(schema.categorical.items()):
        ca = np.bincount(synth.codes[:, j], minlength=len(vocab) + 2) / max(len(synth), 1)
        cb = np.bincount(real.codes[:, j], minlength=len(vocab) + 2) / max(len(real), 1)
        tv[col] = float(0.5 * np.abs(ca - cb).sum())
    k = int(task.num_classes)
    la = np.bincount(synth.y, minlength=k) / max(len(synth), 1)
    lb = np.bincount(real.y, minlength=k) / max(len(real), 1)
    rng = seeds.rng("synthetic.quality", seed)
    sa = rng.permutation(len(synth))[:max_rows]
    sb = rng.permutation(len(real))[:max_rows]
    d = closest_distances(
        _features(task, synth.take(sa), prep), _features(task, real.take(sb), prep)
    )
    return {
        "rows": int(len(synth)),
        "real_rows": int(len(real)),
        "ks_numeric_mean": float(np.mean(list(ks.values()))) if ks else None,
        "tv_categorical_mean": float(np.mean(list(tv.values()))) if tv else None,
        "tv_label": float(0.5 * np.abs(la - lb).sum()),
        "dcr_median": float(np.median(d)) if len(d) else None,
        "dcr_p05": float(np.percentile(d, 5)) if len(d) else None,
        "ks_numeric": ks,
        "missing_rate_gap": gaps,
        "tv_categorical": tv,
    }


# -- the run's checks and wiring (fedapp.server_app) -------------------------------------------------
def check(cfg: DictConfig, task=None) -> None:
    """Refuse a synthetic-data run that cannot be honest: on composing the config (no task),
    and with the task at the ServerApp's start, before any statistic is asked for."""
    synthetic = str(cfg.strategy.get("name")) == "synthetic"
    augment = augment_active(cfg)
    if not (synthetic or augment):
        AugmentSpec.from_config(cfg.get("augment"))  # still catch a misspelled augment key
        return
    what = "strategy=synthetic" if synthetic else "augment=rare_class"
    if synthetic and augment:
        raise SyntheticError("strategy=synthetic shares synthetic rows already; use augment=none")
    if task is not None:
        Layout.of(task)
    if generator_spec(cfg).refine != "none" and not synthetic:
        raise SyntheticError(
            "augment.generator.refine: the discriminator refines the rows strategy=synthetic "
            "sends; rare-class augmentation samples from the federation's generator as it is "
            "(set augment.generator.refine=none)"
        )
    privacy = str((cfg.get("privacy") or {}).get("name", "none"))
    if privacy not in ("none", "sample_dp"):
        raise SyntheticError(
            f"{what} runs with privacy=sample_dp (or none): under privacy={privacy} the "
            "generator's updates would not be covered by the guarantee"
        )
    for group in ("secure", "compression"):
        name = str((cfg.get(group) or {}).get("name", "none"))
        if name != "none":
            raise SyntheticError(f"{what} is not built for {group}={name} yet; use {group}=none")
    if augment:
        from hydra.utils import get_class

        cls = get_class(str(cfg.strategy._target_))
        if cls.schedules_rounds:
            raise SyntheticError(
                f"augment=rare_class runs with round-based strategies (fedavg, fedprox, trust, "
                f"...); strategy={cfg.strategy.name} schedules its own rounds"
            )
        rounds = AugmentSpec.from_config(cfg.augment).generator.rounds
        if int(cfg.rounds) <= rounds:
            raise SyntheticError(
                f"rounds={cfg.rounds} leaves no training round after augment.generator.rounds="
                f"{rounds}; set rounds > {rounds}"
            )


def attach(strategy, cfg: DictConfig, task, prep, settings: TrainSettings) -> None:
    """Give the strategy its generator phase (and, strategy=synthetic, the task)."""
    synthetic = str(cfg.strategy.get("name")) == "synthetic"
    if not (synthetic or augment_active(cfg)):
        return
    spec = generator_spec(cfg)
    phase = GeneratorPhase(
        spec, ArrayRecord(initial_generator(task, spec, int(cfg.seed)).state_dict())
    )
    if synthetic:
        strategy.bind_task(task, prep, settings, phase)
    else:
        strategy.generator_phase = phase
