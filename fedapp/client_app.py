"""fedapp ClientApp: thin glue from Flower messages to the task and the client-side units.

Named handlers, one per kind of message the server sends:
- `train`: the round's units (fedapp/core/units.py: attack harness, the strategy's client part)
  around the task's local training;
- `train.generator`, `train.synthesize`: the synthetic-data generator's local rounds and
  the synthetic rows a client sends once (fedapp/features/synthetic/);
- `evaluate`: the global model on this client's validation rows;
- `evaluate.sites`: after the last round, the final and the personal models' scores on those
  rows (fedapp.features.sites);
- `query` (discovery: which partition this node holds), `query.stats` (sufficient statistics
  of its training rows), `query.probe` (a timed few local steps, for schedulers) and
  `query.heartbeat` (an empty answer: alive).
The device-emulation mod (fedapp.features.hetero) wraps the handlers that a real-clock device profile
slows down or fails. Every reply of a kind has the same schema; errors raise and reach the
server as Flower error replies (the run continues without this client).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from hydra.utils import get_class
from omegaconf import DictConfig

from fedapp.checks import combination_mod
from fedapp.core.node import client_seed, load_node, round_prep
from fedapp.core.policy import NodePolicy, PolicyRefusal, registered_strategy
from fedapp.core.units import STAGES, ClientUnit, TrainJob, run_units
from fedapp.features import sites, synthetic
from fedapp.features.attacks import AttackHarness
from fedapp.features.clients import IDENTITY_RECORD, virtual_client_mod
from fedapp.features.compression import compression_mod
from fedapp.features.hetero import device_emulation_mod
from fedapp.features.identity import sign_claim
from fedapp.features.privacy import (
    CentralDPClient,
    PrivacySpec,
    SampleDP,
    central_clipping_mod,
    ledger_lock_mod,
    private_stats,
    run_key,
)
from fedapp.features.secure import keys_reply, secure_mod
from tasks.training import TrainSettings

# What a training reply carries when the node sends no metric computed on the received model
# (NodePolicy.model_metrics_allowed): counts and timings, and its DP ledger's values.
MODEL_FREE = ("num-examples", "train_steps", "train_time_s", "label-counts")

# Outermost: a message for a virtual client (several clients on one simulation SuperNode)
# runs with that client's partition and state (fedapp.features.clients); then a message that may spend
# privacy holds its institution's ledger lock (fedapp.features.privacy.ledger_lock_mod).
app = ClientApp(mods=[virtual_client_mod, combination_mod, ledger_lock_mod])


# -- the units of a training message (fedapp.core.units.STAGES: stage -> its unit classes) ----------
StageResolver = Callable[[DictConfig], list[type[ClientUnit]]]


def strategy_units(cfg: DictConfig) -> list[type[ClientUnit]]:
    """The configured strategy's client part (`client_units` of its class), imported only
    when registered in the node's own conf/strategy/ (fedapp.core.policy.registered_strategy)."""
    target = registered_strategy(str(cfg.strategy._target_))
    return list(getattr(get_class(target), "client_units", ()))


RESOLVERS: dict[str, StageResolver] = {
    "attack": lambda cfg: [AttackHarness],
    "augment": lambda cfg: [synthetic.RareClassAugment],
    "privacy": lambda cfg: [SampleDP, CentralDPClient],
    "strategy": strategy_units,
}


def compose_units(job: TrainJob) -> list[ClientUnit]:
    """The units of this training message, outermost first (see fedapp.core.units.STAGES)."""
    units: list[ClientUnit] = []
    for stage in STAGES:
        for cls in RESOLVERS[stage](job.cfg):
            if cls.wanted(job):
                units.append(cls())
    return units


def _job(msg: Message, context: Context) -> TrainJob:
    node = load_node(context)
    config = msg.content["config"]
    received = msg.content["arrays"]
    model = node.task.make_model()
    model.load_state_dict(received.to_torch_state_dict())
    seed = client_seed(config, node.partition_id)
    torch.manual_seed(seed)
    return TrainJob(
        cfg=node.cfg,
        task=node.task,
        data=node.data,
        partition_id=node.partition_id,
        content=msg.content,
        config=config,
        received=received,
        model=model,
        settings=TrainSettings.from_config({**dict(config), "seed": seed}),
        prep=round_prep(config),
        state=context.state,
        seed=seed,
        node_config=dict(context.node_config),
        run_id=int(context.run_id),
        run_key=run_key(context),
        num_clients=node.num_clients,
    )


@app.train(mods=[device_emulation_mod, secure_mod, compression_mod, central_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    job = _job(msg, context)
    run_units(job, compose_units(job))
    metrics = {
        "num-examples": job.data.num_train - job.synthetic_rows,  # its own rows only
        "train_loss": float(job.metrics["train_loss"]),
        "train_steps": float(job.metrics["train_steps"]),
        "train_time_s": float(job.metrics["train_time_s"]),
        "label-counts": [int(c) for c in job.data.label_counts],
        **job.reply_metrics,
    }
    if "train_skipped_steps" in job.metrics:  # train.precision=fp16 (never under sample_dp)
        metrics["train_skipped_steps"] = float(job.metrics["train_skipped_steps"])
    if not NodePolicy.from_node_config(job.node_config).model_metrics_allowed(job.cfg):
        metrics = {k: v for k, v in metrics.items() if k in MODEL_FREE or k.startswith("dp_")}
    reply = MetricRecord({k: v for k, v in metrics.items() if k not in job.withheld})
    arrays = job.outgoing if job.outgoing is not None else ArrayRecord(job.model.state_dict())
    content = RecordDict({"arrays": arrays, "metrics": reply})
    for name, record in job.reply_records.items():
        content[name] = record
    return Message(content, reply_to=msg)


@app.train("generator", mods=[device_emulation_mod])
def train_generator(msg: Message, context: Context) -> Message:
    """Local (DP) epochs of the synthetic-data generator (fedapp.features.synthetic)."""
    return synthetic.generator_round(msg, context)


@app.train("synthesize", mods=[device_emulation_mod])
def train_synthesize(msg: Message, context: Context) -> Message:
    """Synthetic rows from the locally fine-tuned generator, sent once (strategy=synthetic)."""
    return synthetic.synthesize(msg, context)


@app.evaluate(mods=[secure_mod])
def evaluate(msg: Message, context: Context) -> Message:
    node = load_node(context)
    if not node.policy.model_metrics_allowed(node.cfg):
        raise PolicyRefusal(
            "evaluate under secure=ckks: this institution sends no metric computed on a "
            "received model (its node config ckks-metrics=false)"
        )
    data = node.data
    model = node.task.make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    t0 = time.perf_counter()
    metrics = node.task.evaluate(model, data.val, round_prep(msg.content["config"]))
    reply = {
        "eval_time_s": time.perf_counter() - t0,  # compute only (the overhead profile's part)
        "num-examples": len(data.val),  # 0 -> the server leaves this client out of the average
        "eval_loss": float(metrics["loss"]) if len(data.val) else 0.0,
        "eval_accuracy": float(metrics["accuracy"]) if len(data.val) else 0.0,
    }
    # pooled into precision/recall/F1 over clients by the server; not under sample_dp, where
    # exact counts on the validation rows, for any model the server sends, would reveal rows
    if "confusion" in metrics and not PrivacySpec.from_config(node.cfg.get("privacy")).sample_level:
        reply["eval-confusion"] = [int(c) for c in metrics["confusion"]]
    return Message(RecordDict({"metrics": MetricRecord(reply)}), reply_to=msg)


@app.evaluate("sites")
def evaluate_sites(msg: Message, context: Context) -> Message:
    """After the last round: the final model's (and this client's personal model's) score on
    its own held-out rows (fedapp.features.sites)."""
    return sites.site_reply(msg, context)


@app.query()
def discovery(msg: Message, context: Context) -> Message:
    """Which partition this node holds (node ids are random in Flower), the federation size
    it was told, and whether it holds its own data file; a node with its own data signs its
    partition claim with its SuperNode key when it has one (`auth-key`)."""
    node = context.node_config
    metrics = {
        "partition-id": int(node.get("partition-id", -1)),
        "num-partitions": int(node.get("num-partitions", -1)),
        "has-data-path": int(bool(node.get("data-path"))),
    }
    content = RecordDict({"metrics": MetricRecord(metrics)})
    config = msg.content.config_records.get("config")
    nonce = str(config.get("nonce", "")) if config is not None else ""
    if nonce and node.get("auth-key") and node.get("data-path"):
        # its partition id, signed with its SuperNode key (fedapp.features.identity)
        signature = sign_claim(str(node["auth-key"]), nonce, metrics["partition-id"])
        content[IDENTITY_RECORD] = ConfigRecord({"signature": signature})
    return Message(content, reply_to=msg)


@app.query("stats")
def stats(msg: Message, context: Context) -> Message:
    """Sufficient statistics of this node's training rows (never the rows); under
    privacy=sample_dp clipped, noised and accounted (fedapp.features.privacy.private_stats)."""
    node = load_node(context)
    values = private_stats(node, context)
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)


@app.query("keys")
def keys(msg: Message, context: Context) -> Message:
    """secure=ckks: this node's key fingerprint (and, when asked, its public context; never the
    secret key), from its own node config (fedapp.features.secure.keys_reply)."""
    return keys_reply(msg, context)


@app.query("probe", mods=[device_emulation_mod])
def probe(msg: Message, context: Context) -> Message:
    """Profiling: run `probe-steps` local steps on the received model (a scheduler's speed
    measurement; the result is discarded) and send the model back (its link measurement)."""
    node = load_node(context)
    data = node.data
    config = msg.content["config"]
    received = msg.content["arrays"]
    model = node.task.make_model()
    model.load_state_dict(received.to_torch_state_dict())
    steps = int(config.get("probe-steps", 5))
    settings = TrainSettings.from_config({**dict(config), "max-steps": steps, "local-epochs": 1})
    metrics = node.task.train(model, data, settings, round_prep(config))
    reply = MetricRecord(
        {
            "num-examples": data.num_train,
            "train_steps": float(metrics["train_steps"]),
            "train_time_s": float(metrics["train_time_s"]),
        }
    )
    return Message(RecordDict({"arrays": received, "metrics": reply}), reply_to=msg)


@app.query("heartbeat", mods=[device_emulation_mod])
def heartbeat(msg: Message, context: Context) -> Message:
    """Alive (the device-emulation mod refuses for a node that is offline this round)."""
    load_node(context, with_data=False)
    return Message(RecordDict({"metrics": MetricRecord({"alive": 1})}), reply_to=msg)
