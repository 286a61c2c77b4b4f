"""fedapp ClientApp: load this node's data, train or evaluate the received model, reply.

The reply schema is the same on every path, so the server can always aggregate. Errors raise
and reach the server as Flower error replies (the run continues without this client).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from omegaconf import DictConfig

from fedapp import attacks, hetero
from fedapp.config import compose, resolve_data_dir
from strategies import scaffold
from tasks import ClientData, DataError, Task, get_task
from tasks.training import TrainSettings

app = ClientApp()


@lru_cache(maxsize=4)
def _cfg(overrides: str) -> DictConfig:
    return compose(overrides)


@lru_cache(maxsize=256)
def _data(task: Task, partition_id: int, data_path: str) -> ClientData:
    if data_path:
        return task.load_node_data(Path(data_path))
    return task.load_partition(partition_id)


def _setup(context: Context) -> tuple[DictConfig, Task, ClientData, int]:
    cfg = _cfg(str(context.run_config.get("overrides", "")))
    torch.set_num_threads(max(int(cfg.simulation.client_num_cpus), 1))
    task = get_task(cfg, resolve_data_dir(cfg, context.run_config))
    node = context.node_config
    data_path = str(node.get("data-path", ""))
    if "partition-id" not in node and not data_path:
        raise DataError("node_config needs 'partition-id' (simulation) or 'data-path' (deployment)")
    pid = int(node.get("partition-id", -1))
    if not data_path:
        expected, have = task.num_partitions(), int(node.get("num-partitions", -1))
        if have != expected:
            raise DataError(
                f"the federation has num-partitions={have} but partition={cfg.partition.name} of task "
                f"{cfg.task.name} makes {expected} clients; run with "
                f"--federation-config 'num-supernodes={expected}' (fedapp-run sets it for you)"
            )
    return cfg, task, _data(task, pid, data_path), pid


def _client_seed(msg: Message, pid: int) -> int:
    cfg = msg.content["config"]
    return int(cfg.get("seed", 0)) * 1_000_003 + int(cfg.get("server-round", 0)) * 10_007 + pid


def _prep(msg: Message) -> dict[str, list[float]]:
    """Federated preprocessing parameters (global means, class weights...) sent by the server."""
    config = msg.content.config_records.get("config")
    return {k: list(v) for k, v in (config or {}).items() if k.startswith("prep.")}


@lru_cache(maxsize=64)
def _profiles(spec: hetero.HeteroSpec, num_partitions: int, seed: int) -> tuple:
    return tuple(hetero.assign_profiles(spec, num_partitions, seed))


def _real_clock_profile(
    cfg: DictConfig, task: Task, pid: int, node_config
) -> hetero.DeviceProfile | None:
    """This node's device profile when it must emulate it itself (real clock), else None.

    Simulation draws it from `hetero` with the run's seed (the server draws the same one);
    a deployed SuperNode may state its own in its node config (`speed=0.3 up-mbps=5 ...`).
    """
    spec = hetero.HeteroSpec.from_config(cfg.get("hetero"))
    stated = any(k in node_config for k in hetero.NODE_CONFIG_KEYS)
    if spec.virtual or not (spec.active or stated):
        return None
    base = hetero.DeviceProfile()
    if spec.active and 0 <= pid < task.num_partitions():
        base = _profiles(spec, task.num_partitions(), int(cfg.seed))[pid]
    return hetero.profile_from_node_config(node_config, base)


def _probe(msg: Message, context: Context) -> Message:
    """Profiling: run `probe-steps` local steps on the received model (a scheduler's speed
    measurement; the result is discarded) and send the model back (its link measurement)."""
    cfg, task, data, pid = _setup(context)
    config = msg.content["config"]
    received = msg.content["arrays"]
    model = task.make_model()
    model.load_state_dict(received.to_torch_state_dict())
    steps = int(config.get("probe-steps", 5))
    settings = TrainSettings.from_config({**dict(config), "max-steps": steps, "local-epochs": 1})
    profile = _real_clock_profile(cfg, task, pid, context.node_config)
    rnd = int(config.get("server-round", 0))
    if profile is not None:
        hetero.emulate_before_training(profile, int(cfg.seed), pid, rnd, received.count_bytes())
    metrics = task.train(model, data, settings, _prep(msg))
    if profile is not None:
        hetero.emulate_after_training(
            profile, int(cfg.seed), pid, rnd, float(metrics["train_time_s"]), received.count_bytes()
        )
    reply = MetricRecord(
        {
            "num-examples": data.num_train,
            "train_steps": float(metrics["train_steps"]),
            "train_time_s": float(metrics["train_time_s"]),
        }
    )
    return Message(RecordDict({"arrays": received, "metrics": reply}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Discovery (which partition this node holds; node ids are random in Flower), or by
    config `fedapp-action`: `stats` (sufficient statistics of its training rows), `probe`
    (a timed few steps, for schedulers) or `heartbeat` (an empty answer: alive)."""
    config = msg.content.config_records.get("config")
    action = config.get("fedapp-action") if config is not None else None
    if action == "stats":
        _, task, data, _ = _setup(context)
        return Message(RecordDict({"metrics": MetricRecord(task.client_stats(data))}), reply_to=msg)
    if action == "probe":
        return _probe(msg, context)
    if action == "heartbeat":
        cfg, task, _, pid = _setup(context)
        profile = _real_clock_profile(cfg, task, pid, context.node_config)
        rnd = int(config.get("server-round", 0))
        if profile is not None and hetero.is_unavailable(profile, int(cfg.seed), pid, rnd):
            raise hetero.NodeUnavailable(f"client {pid} is offline this round (hetero profile)")
        return Message(RecordDict({"metrics": MetricRecord({"alive": 1})}), reply_to=msg)
    node = context.node_config
    return Message(
        RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        "partition-id": int(node.get("partition-id", -1)),
                        "num-partitions": int(node.get("num-partitions", -1)),
                        "has-data-path": int(bool(node.get("data-path"))),
                    }
                )
            }
        ),
        reply_to=msg,
    )


@lru_cache(maxsize=64)
def _attackers(spec: attacks.AttackSpec, num_partitions: int, seed: int) -> frozenset[int]:
    return frozenset(attacks.attacker_partitions(num_partitions, spec.fraction, seed))


def _attack_of(cfg: DictConfig, task: Task, pid: int) -> attacks.AttackSpec | None:
    """This client's attack (the harness in fedapp.attacks), or None for an honest client."""
    spec = attacks.AttackSpec.from_config(cfg.get("attack"))
    if not spec.active or pid < 0:
        return None
    return spec if pid in _attackers(spec, task.num_partitions(), int(cfg.seed)) else None


def _plausible_metrics(task: Task, model, data: ClientData, settings: TrainSettings, prep) -> dict:
    """What an attacker that skips training reports: its data's loss under the received model
    and the step count an honest client would have run, so screening cannot spot it by form."""
    steps = -(-data.num_train // settings.batch_size) * max(settings.local_epochs, 1)
    if settings.max_steps:
        steps = min(steps, settings.max_steps)
    loss = float(task.evaluate(model, data.train, prep)["loss"])
    return {"train_loss": loss, "train_steps": float(steps), "train_time_s": 0.0}


STALE_KEY = "fedapp.previous-global"  # free riders in stale mode keep the last global model here


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, task, data, pid = _setup(context)
    received = msg.content["arrays"]
    global_state = received.to_torch_state_dict()
    model = task.make_model()
    model.load_state_dict(global_state)
    seed = _client_seed(msg, pid)
    torch.manual_seed(seed)
    settings = TrainSettings.from_config({**dict(msg.content["config"]), "seed": seed})
    attack = _attack_of(cfg, task, pid)
    profile = _real_clock_profile(cfg, task, pid, context.node_config)
    rnd = int(msg.content["config"].get("server-round", 0))
    if profile is not None:  # real clock: be offline, or wait for the download
        hetero.emulate_before_training(profile, int(cfg.seed), pid, rnd, received.count_bytes())
    crashes = attack is not None and attacks.crashes_now(attack, seed)
    if crashes and attack.mode == "exception":
        raise attacks.InjectedCrash(f"client {pid}: injected crash (attack=crash)")
    if attack is not None and attack.name == "label_flip":
        mapping = attacks.flipped_labels(np.arange(task.num_classes), task.num_classes)
        data = task.with_labels(data, mapping)
    correction = _scaffold_correction(msg, context, model)
    report_gain = bool(msg.content["config"].get("report-val-gain", 0))
    before = _val_loss(task, model, data, _prep(msg)) if report_gain else 0.0
    if attack is None or attacks.trains_locally(attack):
        metrics = task.train(model, data, settings, _prep(msg), correction=correction)
    else:  # made-up weights; the reply still looks honest (loss of the received model)
        metrics = _plausible_metrics(task, model, data, settings, _prep(msg))
    # Model poisoning replaces the weights sent back; a crasher does so only in rounds it crashes.
    if attack is not None and attack.name != "label_flip" and (attack.name != "crash" or crashes):
        stale = None
        if STALE_KEY in context.state.array_records:
            stale = context.state.array_records[STALE_KEY].to_torch_state_dict()
        model.load_state_dict(
            attacks.poisoned_state(attack, global_state, model.state_dict(), seed, stale)
        )
        if attack.name == "free_rider" and attack.mode == "stale":
            context.state.array_records[STALE_KEY] = received
    if profile is not None:  # real clock: compute at the profile's speed, maybe crash, upload
        hetero.emulate_after_training(
            profile, int(cfg.seed), pid, rnd, float(metrics["train_time_s"]), received.count_bytes()
        )
    reply = MetricRecord(
        {
            "num-examples": data.num_train,
            "train_loss": float(metrics["train_loss"]),
            "train_steps": float(metrics["train_steps"]),
            "train_time_s": float(metrics["train_time_s"]),
            "label-counts": [int(c) for c in data.label_counts],
        }
    )
    if report_gain:  # contribution-aware strategies: local validation loss before/after
        reply["val_loss_before"] = before
        reply["val_loss_after"] = _val_loss(task, model, data, _prep(msg))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": reply})
    if correction is not None:
        content[scaffold.CONTROL_DELTA] = _scaffold_update(
            msg, context, model, global_state, float(metrics["train_steps"]), settings.lr
        )
    return Message(content, reply_to=msg)


def _val_loss(task: Task, model, data: ClientData, prep) -> float:
    """Loss on this client's validation rows (0.0 when it has none: 'unknown' to the server)."""
    if not len(data.val):
        return 0.0
    # evaluating draws from torch's global generator (DataLoader seeds); fork it so that the
    # training that follows (dropout) is the same whether or not the server asked for this
    with torch.random.fork_rng(devices=[]):
        loss = float(task.evaluate(model, data.val, prep)["loss"])
    return loss if np.isfinite(loss) else 0.0


def _named_controls(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()} if record is not None else {}


def _scaffold_correction(msg: Message, context: Context, model) -> list[torch.Tensor] | None:
    """SCAFFOLD: c - c_i per trainable parameter when the server sent its control c."""
    if scaffold.SERVER_CONTROL not in msg.content.array_records:
        return None
    params = dict(model.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    c = _named_controls(msg.content[scaffold.SERVER_CONTROL])
    ci = _named_controls(context.state.array_records.get(scaffold.CLIENT_CONTROL_STATE))
    return [torch.from_numpy(a) for a in scaffold.client_correction(names, shapes, c, ci)]


def _scaffold_update(msg, context, model, global_state, steps: float, lr: float) -> ArrayRecord:
    """SCAFFOLD: store c_i+ in this node's state and return delta_c for the server."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    c = _named_controls(msg.content[scaffold.SERVER_CONTROL])
    ci = _named_controls(context.state.array_records.get(scaffold.CLIENT_CONTROL_STATE))
    if steps <= 0:  # no local training (an attack harness free rider): controls unchanged
        zero = {n: np.zeros(tuple(p.shape), np.float32) for n, p in model.named_parameters()}
        return ArrayRecord({n: Array(zero[n]) for n in names})
    x = {n: global_state[n].detach().cpu().numpy() for n in names}
    y = {n: p.detach().cpu().numpy() for n, p in model.named_parameters() if n in x}
    new, delta = scaffold.client_control_update(names, c, ci, x, y, steps, lr)
    context.state.array_records[scaffold.CLIENT_CONTROL_STATE] = ArrayRecord(
        {n: Array(v) for n, v in new.items()}
    )
    return ArrayRecord({n: Array(v) for n, v in delta.items()})


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _, task, data, _ = _setup(context)
    model = task.make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    metrics = task.evaluate(model, data.val, _prep(msg))
    reply = {
        "num-examples": len(data.val),  # 0 -> the server leaves this client out of the average
        "eval_loss": float(metrics["loss"]) if len(data.val) else 0.0,
        "eval_accuracy": float(metrics["accuracy"]) if len(data.val) else 0.0,
    }
    if "confusion" in metrics:  # pooled into precision/recall/F1 over clients by the server
        reply["eval-confusion"] = [int(c) for c in metrics["confusion"]]
    return Message(RecordDict({"metrics": MetricRecord(reply)}), reply_to=msg)
