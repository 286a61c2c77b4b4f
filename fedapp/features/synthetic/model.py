"""The generator (a conditional VAE over a table's featurized rows), its training and sampling,
and the DP discriminator that refines which sampled rows a client sends. Pure models and
functions of their inputs: no node, no ledger, no message."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedapp.core import seeds
from fedapp.features.synthetic.spec import (
    GeneratorSpec,
    SyntheticError,
)
from tasks.training import TrainHook, TrainSettings, train_classifier

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
