"""The generator's and the discriminator's DP-SGD in the client's one ledger
(fedapp.features.privacy): calibrated once for every generator step a client may take."""

from __future__ import annotations

import math

from flwr.app import (
    ConfigRecord,
)

from fedapp.core import seeds
from fedapp.features.privacy import (
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
from fedapp.features.synthetic.model import (
    generator_batch,
)
from fedapp.features.synthetic.spec import GeneratorSpec, shares_rows

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
        finetune = spec.finetune_epochs if shares_rows(node.cfg) else 0
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


def account(ledger, path, hook, context) -> dict[str, float]:
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
