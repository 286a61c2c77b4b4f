"""Per-site evaluation: at the end of a run every client scores the final global model (and its
personal model, where the strategy personalises: strategies/personal.py) on its own held-out
rows, and only the scores leave it.

A site's test rows are its validation rows: the share of its partition (or its own file) kept
out of training by a seeded split (`task.client_val_fraction`; a deployed node's own
`val-fraction`, never the server's, fedapp.core.policy), the rows federated evaluation reports on.
They are never trained on. One `evaluate.sites` message per client after the last round
carries the final model and the round's training settings (a personal method's fine-tuning);
the reply carries `n_test` and the metric of each model it has: `global`, `personal`,
`local_only`. The metric is the task's headline one (`Task.headline_metric`: accuracy, ROC-AUC
for the tables) or `sites.metric`. A client is not trusted: a reply that is not a count and
scores in [0, 1] (or NaN: undefined, e.g. ROC-AUC on one class) is left out and logged.

`final.sites` in results.json lists one entry per client that answered; `site_mean_global`,
`site_mean_personal` (null without personal models) and `site_min` summarise them
(`site_summary`).
"""

from __future__ import annotations

import math
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from hydra.utils import get_class
from omegaconf import DictConfig

from fedapp.core.node import load_node, round_prep
from fedapp.core.policy import PolicyRefusal, registered_strategy
from fedapp.features.clients import ClientGrid
from fedapp.features.privacy import PrivacySpec
from fedapp.features.secure import SecureSpec
from strategies.personal import site_models
from tasks import Task
from tasks.training import TrainSettings

SITES_MESSAGE = f"{MessageType.EVALUATE}.sites"
ASKED_KEY = "fedapp.sites-asked"  # Context.state: the run and round a client last answered
MODELS = ("global", "personal", "local_only")


def site_metric(cfg: DictConfig, task: Task) -> str:
    """The metric per-site evaluation reports: `sites.metric`, or the task's headline one;
    always the headline one under sample-level DP (the federated evaluation sends no exact
    confusion counts there, and a chosen metric such as recall would stand in for them)."""
    sites = cfg.get("sites")
    name = str(sites.get("metric", "auto")) if sites is not None else "auto"
    if PrivacySpec.from_config(cfg.get("privacy")).sample_level:
        return task.headline_metric
    return task.headline_metric if name == "auto" else name


def allowed_models(strategy_cls: type) -> tuple[str, ...]:
    """The scores a client may send for the strategy's models (`personalisation`, declared by
    strategies/personal.py): the global model's always; its personal or local-only one's only
    where the strategy makes one."""
    method = str(getattr(strategy_cls, "personalisation", "") or "")
    if method == "local_only":
        return ("global", "local_only")
    return ("global", "personal") if method else ("global",)


def _score(metrics: dict[str, float], name: str) -> float:
    if name not in metrics:
        raise ValueError(f"sites.metric={name!r} is not a metric of this task: {sorted(metrics)}")
    return float(metrics[name])


# -- the client's part (registered by fedapp.client_app) -------------------------------------
def site_reply(msg: Message, context: Context) -> Message:
    """Score the received final model and this client's own models on its held-out rows."""
    node = load_node(context)
    task, data, cfg = node.task, node.data, node.cfg
    # (this also covers NodePolicy.model_metrics_allowed, which only ckks-metrics=false under
    # secure=ckks refuses)
    if SecureSpec.from_config(cfg.get("secure")).active:
        raise PolicyRefusal(
            "per-site evaluation is not part of a run under secure=ckks (the server holds no "
            "plaintext model to send, and a plaintext one would skip the node's model checks)"
        )
    config = msg.content["config"]
    # once per run and round: a server asking again (each finetune answer is a local
    # training on the rows) is refused
    asked = int(config.get("server-round", 0))
    done = context.state.config_records.get(ASKED_KEY)
    if done is not None and int(done["run"]) == int(context.run_id) and asked <= int(done["round"]):
        raise PolicyRefusal(
            f"per-site evaluation: already answered for round {int(done['round'])} of this run; "
            "a run asks once, after its last round"
        )
    context.state.config_records[ASKED_KEY] = ConfigRecord(
        {"run": int(context.run_id), "round": asked}
    )
    prep = round_prep(config)
    global_state = msg.content["arrays"].to_torch_state_dict()
    metric = site_metric(cfg, task)
    reply: dict[str, Any] = {"n_test": len(data.val)}
    if len(data.val):
        model = task.make_model()
        model.load_state_dict(global_state)
        reply["global"] = _score(task.evaluate(model, data.val, prep), metric)
        cls = get_class(registered_strategy(str(cfg.strategy._target_)))
        method = str(getattr(cls, "personalisation", "") or "")
        if method:
            settings = TrainSettings.from_config(dict(config))
            others = site_models(
                method, task, data, context.state, global_state, cfg, settings, prep
            )
            for key, own in others.items():
                reply[key] = _score(task.evaluate(own, data.val, prep), metric)
    return Message(RecordDict({"metrics": MetricRecord(reply)}), reply_to=msg)


# -- the server's part --------------------------------------------------------------------------
def _screen(
    metrics: MetricRecord | None, allowed: tuple[str, ...] = MODELS
) -> tuple[dict[str, Any] | None, str | None]:
    """A client's per-site reply, screened: `n_test` a count, each score in [0, 1] (NaN:
    undefined), only the scores of models the strategy makes (`allowed`), none on no rows."""
    if metrics is None:
        return None, "no metrics"
    try:
        n = metrics["n_test"]
        if isinstance(n, list) or not math.isfinite(float(n)) or float(n) != int(n) or int(n) < 0:
            return None, f"n_test={n!r} is not a count"
        out: dict[str, Any] = {"n_test": int(n)}
        for key in MODELS:
            value = metrics.get(key)
            if value is None:
                out[key] = None
                continue
            if key not in allowed:
                return None, f"a {key} score, but this strategy makes no {key} model"
            if out["n_test"] == 0:
                return None, f"a {key} score on n_test=0 rows"
            value = float(value)  # a list raises: rejected below
            if math.isnan(value):
                out[key] = None  # undefined on these rows (e.g. ROC-AUC with one class)
            elif not 0.0 <= value <= 1.0:
                return None, f"{key}={value} is outside [0, 1]"
            else:
                out[key] = value
        extra = set(metrics) - {"n_test", *MODELS}
        if extra:
            return None, f"unexpected keys {sorted(extra)}"
        return out, None
    except Exception as exc:  # noqa: BLE001 - a malformed reply is rejected, never fatal
        return None, f"malformed ({type(exc).__name__}: {str(exc)[:200]})"


def evaluate_sites(
    grid: ClientGrid,
    node_partitions: dict[int, int],
    arrays: ArrayRecord,
    cfg: DictConfig,
    task: Task,
    train_config: dict[str, Any],
    timeout: float,
) -> list[dict[str, Any]]:
    """One `evaluate.sites` message per client (`grid` addresses clients: fedapp.features.clients);
    the screened entries of `final.sites`, in partition order."""
    metric = site_metric(cfg, task)
    allowed = allowed_models(get_class(str(cfg.strategy._target_)))
    config = ConfigRecord({**train_config, "server-round": int(cfg.rounds), "seed": int(cfg.seed)})
    content = RecordDict({"arrays": arrays, "config": config})
    msgs = [
        Message(content, dst_node_id=cid, message_type=SITES_MESSAGE)
        for cid in sorted(node_partitions, key=node_partitions.get)
    ]
    entries: dict[int, dict[str, Any]] = {}
    # results.json `nodes` counts the rounds' replies and failures; these messages come after
    # them and are reported in `final.sites` (and the log), so the counts are kept as they were
    before = grid.state()
    try:
        replies = list(grid.send_and_receive(msgs, timeout=timeout))
    finally:
        grid.status.update(before)
    for reply in replies:
        cid = reply.metadata.src_node_id
        pid = node_partitions.get(cid)
        if pid is None:
            continue
        if reply.has_error():
            log(WARNING, "[fedapp] client %d sent no per-site metrics: %s", pid, reply.error.reason)
            continue
        values, why = _screen(reply.content.metric_records.get("metrics"), allowed)
        if why:
            log(WARNING, "[fedapp] client %d per-site metrics rejected: %s", pid, why)
            continue
        entries[pid] = {"client": pid, "n_test": values["n_test"], "metric": metric}
        entries[pid].update({k: values[k] for k in MODELS})
    return [entries[p] for p in sorted(entries)]


def site_summary(sites: list[dict[str, Any]] | None) -> dict[str, Any]:
    """`site_mean_global`, `site_mean_personal` and `site_min` (the worst site's metric of the
    model the method gives it: its personal model, its local-only model under local_only, or
    the global one); None where no site has that number."""

    def mean(key: str) -> float | None:
        vals = [s[key] for s in sites or [] if s.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    delivered = [
        next((s[k] for k in ("personal", "local_only", "global") if s.get(k) is not None), None)
        for s in sites or []
    ]
    delivered = [v for v in delivered if v is not None]
    return {
        "site_mean_global": mean("global"),
        "site_mean_personal": mean("personal"),
        "site_min": float(min(delivered)) if delivered else None,
    }
