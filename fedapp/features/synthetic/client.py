"""The ClientApp's side: the `train.generator` and `train.synthesize` handlers, the discriminator's
refinement of the rows sent, and `augment=rare_class`'s client unit."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

from fedapp.core import seeds
from fedapp.core.node import client_seed, load_node, round_prep
from fedapp.core.units import ClientUnit, TrainJob
from fedapp.features.privacy import (
    LABELS_KEY,
    DPSGDHook,
    PrivacyBudgetExhausted,
    PrivacySpec,
    calibrate,
    save_ledger,
)
from fedapp.features.synthetic.ledger import account, client_ledger, generator_ledger
from fedapp.features.synthetic.model import (
    discriminator_log_odds,
    discriminator_settings,
    generator_inputs,
    initial_generator,
    make_generator,
    sample_rows,
    select_by_odds,
    train_generator,
)
from fedapp.features.synthetic.rows import (
    concat_rows,
    generator_digest,
    rows_record,
)
from fedapp.features.synthetic.spec import (
    GEN_CACHE_KEY,
    GEN_DIGEST,
    GEN_KEY,
    AugmentSpec,
    GeneratorSpec,
    SyntheticError,
    augment_active,
    check_generator_message,
    generator_spec,
)
from tasks.base import ClientData


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
        metrics.update(account(ledger, path, hook, context))
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
