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
- `GeneratorPhase`: the server's side (fedapp/server_app.py attaches it; the strategy's round
  loop plays its rounds, and strategy=synthetic screens, pools and scores the clients' rows
  through it: `rows_record` / `screen_rows` and `quality`, so strategies/synthetic.py imports
  no feature).

The modules: `spec` (settings, record keys, which runs may ask for a generator), `model` (the
VAE and the discriminator), `rows` (rows on the wire, their quality), `ledger` (their DP-SGD in
the client's ledger), `client` (the ClientApp's handlers and unit), `server` (the generator
rounds, the checks, the wiring). This package re-exports what the apps and tests use.
"""

from __future__ import annotations

from fedapp.features.synthetic.client import (
    RareClassAugment,
    client_generator,
    draw_labels,
    generator_round,
    own_label_counts,
    rare_class_count,
    rare_class_rows,
    refine_rows,
    synthesize,
)
from fedapp.features.synthetic.ledger import account, client_ledger, generator_ledger
from fedapp.features.synthetic.model import (
    ClipGradients,
    Discriminator,
    Layout,
    MeanLoss,
    TabularVAE,
    discriminator_log_odds,
    discriminator_settings,
    generator_batch,
    generator_inputs,
    initial_generator,
    make_generator,
    sample_rows,
    select_by_odds,
    train_generator,
)
from fedapp.features.synthetic.rows import (
    closest_distances,
    concat_rows,
    feature_matrix,
    generator_digest,
    quality,
    rows_record,
    screen_rows,
)
from fedapp.features.synthetic.server import GeneratorPhase, attach, check, resumed
from fedapp.features.synthetic.spec import (
    GEN_CACHE_KEY,
    GEN_DIGEST,
    GEN_KEY,
    ROW_KEYS,
    AugmentSpec,
    GeneratorSpec,
    SyntheticError,
    augment_active,
    check_generator_message,
    generator_spec,
)
from strategies.synthetic import SyntheticRoundFailed

__all__ = [
    "AugmentSpec",
    "ClipGradients",
    "Discriminator",
    "GEN_CACHE_KEY",
    "GEN_DIGEST",
    "GEN_KEY",
    "GeneratorPhase",
    "GeneratorSpec",
    "Layout",
    "MeanLoss",
    "ROW_KEYS",
    "RareClassAugment",
    "SyntheticError",
    "SyntheticRoundFailed",
    "TabularVAE",
    "account",
    "attach",
    "augment_active",
    "check",
    "check_generator_message",
    "client_generator",
    "client_ledger",
    "closest_distances",
    "concat_rows",
    "discriminator_log_odds",
    "discriminator_settings",
    "draw_labels",
    "feature_matrix",
    "generator_batch",
    "generator_digest",
    "generator_inputs",
    "generator_ledger",
    "generator_round",
    "generator_spec",
    "initial_generator",
    "make_generator",
    "own_label_counts",
    "quality",
    "rare_class_count",
    "rare_class_rows",
    "resumed",
    "refine_rows",
    "rows_record",
    "sample_rows",
    "screen_rows",
    "select_by_odds",
    "synthesize",
    "train_generator",
]
