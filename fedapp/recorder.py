"""Per-round results of a run: results.json, rounds.csv, clients.csv, plots and checkpoints.

`results.json` is the contract that benchmarks and later features read (documented in
docs/reference/results.md): keys are added over time, never renamed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common import log
from omegaconf import DictConfig

from fedapp.core.config import to_dict
from fedapp.core.files import write_atomic
from fedapp.features.events import open_for_run
from fedapp.features.hetero import ClockGrid
from fedapp.features.privacy import PrivacySpec, mark_seeded_noise, privacy_meta, seeded_noise
from fedapp.features.sites import site_summary
from fedapp.features.tracking import call as call_trackers
from fedapp.features.tracking import open_trackers
from strategies.base import FedappStrategyMixin
from strategies.records import RoundRecord
from tasks import Task

SCHEMA_VERSION = 1
# Columns of rounds.csv, in order (also the required keys of every results.json round).
ROUND_KEYS = (
    "round",
    "test_accuracy",
    "test_loss",
    "test_balanced_accuracy",
    "test_roc_auc",
    "test_pr_auc",
    "test_precision",
    "test_recall",
    "test_f1",
    "majority_accuracy",
    "client_accuracy",
    "client_loss",
    "client_balanced_accuracy",
    "client_precision",
    "client_recall",
    "client_f1",
    "train_loss",
    "num_sampled",
    "num_replies",
    "num_failures",
    "aggregated",
    "bytes_up",
    "bytes_down",
    "attacker_weight",
    "sim_time_s",
    "aggregation_success",
    "wall_s",
    "elapsed_s",
    "dp_epsilon",
    "dp_epsilon_mean",
)
NODES_EVERY_ROUND = 1000  # federations up to this size get `nodes` in every round's results.json
# Federated evaluation metrics (pooled over the evaluated clients) recorded as client_<name>.
CLIENT_METRICS = ("accuracy", "loss", "balanced_accuracy", "precision", "recall", "f1")
CLIENT_KEYS = (
    "round",
    "phase",
    "partition_id",
    "node_id",
    "status",
    "num-examples",
    "train_loss",
    "train_steps",
    "train_time_s",
    "eval_loss",
    "eval_accuracy",
    "eval_time_s",
    "weight",
)


def json_safe(value: Any) -> Any:
    """Replace NaN/Inf (not valid JSON) by None and NumPy scalars by Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(json_safe(data), indent=2, allow_nan=False))


class Recorder:
    """Collects round metrics from the strategy and the server-side evaluation."""

    def __init__(
        self,
        out_dir: Path,
        cfg: DictConfig,
        task: Task,
        strategy: FedappStrategyMixin,
        meta: dict[str, Any],
        test_set: Any,
        prep: dict[str, list[float]] | None = None,
        clock: ClockGrid | None = None,
    ) -> None:
        """`test_set`: the rows the global model is tested on (the task's central test set, or
        what is left of it after the server's validation rows)."""
        self.prep = prep or {}
        self.clock = clock  # simulated (or wall) seconds since the start
        self.nodes_fn: Callable[[], dict[str, Any]] | None = None  # results.json `nodes`
        # called after every round's records are written (fedapp.checkpoint)
        self.checkpoint_fn: Callable[[int, ArrayRecord], None] | None = None
        # final.sites: each client's score of the final (and its personal) model on its own
        # held-out rows, set by the ServerApp after the last round (fedapp.features.sites)
        self.sites: list[dict[str, Any]] | None = None
        self.out_dir = Path(out_dir)
        self.cfg = cfg
        self.task = task
        self.strategy = strategy
        self.meta = dict(meta)
        # until the run ends: `running`, and what to do if it stops here (the launchers turn
        # a `running` left by a server that died without a word into `interrupted`)
        self.meta["status"] = "running"
        self.meta["status_detail"] = {"if_interrupted": resume_hint(self.out_dir, cfg)}
        self.rounds: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.t_start = time.perf_counter()
        self.t_last = self.t_start
        self.test_set = test_set
        self.majority_accuracy = task.majority_accuracy(self.prep, task.dataset_labels(test_set))
        self.privacy = PrivacySpec.from_config(cfg.get("privacy"))
        self.dp_spent: dict[int, float] = {}  # client -> cumulative epsilon it reported
        if self.privacy.name != "none":
            self.meta["privacy"] = privacy_meta(self.privacy)
        (self.out_dir / "config.yaml").write_text(_yaml(cfg))
        if self.prep:  # what the model's inputs were scaled with (fedapp-audit needs it)
            write_json_atomic(self.out_dir / "preprocessing.json", self.prep)
        # the event store fedapp-board reads (fedapp/features/events.py); None: not available
        self.events = open_for_run(self.out_dir, cfg)
        # tracking=tensorboard (fedapp/features/tracking.py); [] for tracking=none
        self.trackers = open_trackers(cfg, self.out_dir, to_dict(cfg))

    # Flower calls this after every round (and once before round 1 with round 0).
    # Under encrypted aggregation the designated evaluator decrypts (fedapp.features.secure.Evaluator).
    evaluator: Any = None

    def plaintext(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """The global model in the clear (None: encrypted and no evaluator key here)."""
        if arrays is None or self.evaluator is None:
            return arrays
        return self.evaluator.plaintext(arrays)

    def evaluate_fn(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        arrays = self.plaintext(arrays)
        test: dict[str, Any] = dict.fromkeys(("loss", "accuracy"))
        t_eval = time.perf_counter()
        if arrays is not None:
            model = self.task.make_model()
            model.load_state_dict(arrays.to_torch_state_dict())
            test = self.task.evaluate(model, self.test_set, self.prep)
        now = time.perf_counter()
        rec = self.strategy.rounds.get(server_round) if server_round > 0 else None
        rec = rec or RoundRecord()
        row: dict[str, Any] = {
            "round": server_round,
            **{f"test_{k}": v for k, v in test.items() if k not in ("num_examples", "confusion")},
            "majority_accuracy": self.majority_accuracy,
            **{f"client_{k}": rec.eval_metrics.get(f"eval_{k}") for k in CLIENT_METRICS},
            "train_loss": rec.train_metrics.get("train_loss"),
            "num_sampled": len(rec.expected),
            "num_replies": rec.num_replies,
            "num_failures": rec.num_failures,
            "aggregated": rec.aggregated,
            "bytes_up": rec.bytes_up,
            "bytes_down": rec.bytes_down,
            "attacker_weight": (
                rec.share_of(self.strategy.attackers) if self.strategy.attackers else 0.0
            ),
            "sim_time_s": self.clock.now if self.clock is not None else now - self.t_start,
            "aggregation_success": aggregation_success(rec, float(self.cfg.get("quorum", 0.0))),
            "wall_s": now - self.t_last,
            "elapsed_s": now - self.t_start,
            "aggregate_s": rec.aggregate_s,
            "server_eval_s": now - t_eval,
            "clients": [c.to_json() for c in rec.clients],
        }
        row.update(self._privacy(rec))
        if "confusion" in test:
            row["test_confusion"] = test["confusion"]
        if rec.schedule:
            row["schedule"] = rec.schedule
        if rec.aggregation:
            row["aggregation"] = rec.aggregation
        self.t_last = now
        self.rounds.append(row)
        improved = arrays is not None and self._update_best(server_round, row)
        # The checkpoint first: nothing of this round leaves the server (files, logs) before
        # a resume would know about it.
        if server_round > 0 and self.checkpoint_fn is not None:
            self.checkpoint_fn(server_round, arrays)
        if improved and bool(self.cfg.get("checkpoint", True)):
            torch.save(arrays.to_torch_state_dict(), self.out_dir / "best_model.pt")
        self._write()
        call_trackers(self.trackers, "round", {k: v for k, v in row.items() if k != "clients"})
        log(
            INFO,
            "[fedapp] round %d/%d  test_acc=%s  test_loss=%s  %sclient_acc=%s  replies=%d/%d  "
            "sim_t=%.0fs  %.1fs%s",
            server_round,
            int(self.cfg.rounds),
            _fmt(row["test_accuracy"]),
            _fmt(row["test_loss"]),
            _extra(row),
            _fmt(row["client_accuracy"]),
            row["num_replies"],
            row["num_sampled"],
            row["sim_time_s"],
            row["wall_s"],
            self._eta(server_round),
        )
        return MetricRecord({k: float(v) for k, v in test.items() if isinstance(v, int | float)})

    def _eta(self, server_round: int) -> str:
        """Estimated time to the end of the run, from the mean round so far."""
        left = int(self.cfg.rounds) - server_round
        fed = [r["wall_s"] for r in self.rounds if r["round"] > 0]
        if left <= 0 or not fed:
            return ""
        seconds = left * float(np.mean(fed))
        return f"  eta {seconds / 60:.1f} min" if seconds >= 60 else f"  eta {seconds:.0f}s"

    def _privacy(self, rec: RoundRecord) -> dict[str, Any]:
        """dp_epsilon: the largest cumulative epsilon any client has spent so far (sample-level
        DP: what the clients report from their accountants; central DP: the server's own);
        dp_epsilon_mean: over the clients that have spent any. None without privacy."""
        if self.privacy.name == "none":
            return {"dp_epsilon": None, "dp_epsilon_mean": None}
        release = getattr(self.strategy, "release", None)  # central DP (strategies.base)
        if release is not None:
            if seeded_noise():
                mark_seeded_noise(self.meta["privacy"], "server")
            eps = float(release.privacy_epsilon())
            return {"dp_epsilon": eps, "dp_epsilon_mean": eps}
        noise = self.meta["privacy"].setdefault("noise_multipliers", {})
        targets = self.meta["privacy"].setdefault("target_epsilons", {})
        for c in rec.clients:
            if c.phase == "train" and "dp_epsilon" in c.metrics:
                pid = c.partition_id
                self.dp_spent[pid] = max(
                    self.dp_spent.get(pid, 0.0), float(c.metrics["dp_epsilon"])
                )
                noise[str(pid)] = c.metrics.get("dp_noise_multiplier")
                targets[str(pid)] = c.metrics.get("dp_target_epsilon")
                if c.metrics.get("dp_noise_seeded"):
                    mark_seeded_noise(self.meta["privacy"], pid)
        spent = list(self.dp_spent.values())
        return {
            "dp_epsilon": max(spent, default=0.0),
            "dp_epsilon_mean": float(np.mean(spent)) if spent else 0.0,
        }

    def _update_best(self, server_round: int, row: dict[str, Any]) -> bool:
        """Is this round's model the best so far (by server test accuracy)?"""
        acc = row.get("test_accuracy")
        if acc is None or not math.isfinite(acc):
            return False
        if self.best is None or acc > self.best["test_accuracy"]:
            self.best = {
                "round": server_round,
                "test_accuracy": acc,
                "test_loss": row.get("test_loss"),
            }
            return True
        return False

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the recorder."""
        return {
            "rounds": self.rounds,
            "best": self.best,
            "dp_spent": self.dp_spent,
            "elapsed_s": time.perf_counter() - self.t_start,
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.rounds, self.best, self.dp_spent = state["rounds"], state["best"], state["dp_spent"]
        self.t_last = time.perf_counter()
        self.t_start = self.t_last - float(state["elapsed_s"])

    def finish(
        self,
        final_arrays: ArrayRecord | None,
        error: str | None = None,
        interrupted: str | None = None,
    ) -> dict[str, Any]:
        """Write the final model, plots and the `final` section with the run's honest status
        (`run_status`; `interrupted`: why the run was cut off, e.g. a signal or a lost
        SuperLink); return the results dict."""
        final_arrays = self.plaintext(final_arrays)
        if final_arrays is not None and bool(self.cfg.get("checkpoint", True)):
            torch.save(final_arrays.to_torch_state_dict(), self.out_dir / "final_model.pt")
        status, detail = run_status(
            self.rounds, int(self.cfg.rounds), error, getattr(self.strategy, "stop_reason", None)
        )
        if interrupted:
            status = "interrupted"
            detail = {"reason": interrupted[:2000], "resume": resume_hint(self.out_dir, self.cfg)}
        nodes = self.nodes_fn() if self.nodes_fn is not None else None  # one refresh
        if nodes is not None:  # clients whose SuperNode never came back: said plainly
            gone = [int(p) for p, n in nodes.items() if not n.get("connected", True)]
            if gone:
                detail["clients_disconnected_at_end"] = gone
        self.meta["status"] = status
        self.meta["status_detail"] = detail
        results = self._write(final=True, nodes=nodes)
        call_trackers(self.trackers, "finish", results, self.out_dir / "final_model.pt")
        try:  # e.g. the contribution ledger
            self.strategy.write_reports(self.out_dir)
        except Exception as exc:  # a report problem must never lose the numbers
            log(INFO, "[fedapp] strategy reports failed: %s", exc)
        try:
            plot_rounds(
                self.rounds, self.out_dir, title=f"{self.cfg.task.name} / {self.cfg.strategy.name}"
            )
        except Exception as exc:  # a plotting problem must never lose the numbers
            log(INFO, "[fedapp] plotting failed: %s", exc)
        return results

    def final_summary(self) -> dict[str, Any]:
        last = {k: v for k, v in (self.rounds[-1] if self.rounds else {}).items() if k != "clients"}
        fed = [r for r in self.rounds if r["round"] > 0]
        per_site = site_summary(self.sites)
        return {
            **last,
            "best_round": self.best["round"] if self.best else None,
            "best_test_accuracy": self.best["test_accuracy"] if self.best else None,
            "total_bytes_up": sum(r["bytes_up"] for r in fed),
            "total_bytes_down": sum(r["bytes_down"] for r in fed),
            "total_wall_s": time.perf_counter() - self.t_start,
            "mean_round_s": float(np.mean([r["wall_s"] for r in fed])) if fed else None,
            "rounds_completed": len(fed),
            "rounds_aggregated": sum(bool(r["aggregated"]) for r in fed),
            "aggregation_success_rate": (
                float(np.mean([bool(r["aggregation_success"]) for r in fed])) if fed else None
            ),
            "total_sim_time_s": fed[-1]["sim_time_s"] if fed else 0.0,
            # Everything the clock carried (training, probes, heartbeats, replies that came
            # too late to count), which the per-round byte counts leave out.
            "clock_bytes_down": self.clock.bytes_down if self.clock is not None else None,
            "clock_bytes_up": self.clock.bytes_up if self.clock is not None else None,
            "sites": self.sites,
            "site_mean_global": per_site["site_mean_global"],
            "site_mean_personal": per_site["site_mean_personal"],
            "site_min": per_site["site_min"],
        }

    def nodes_every_round(self) -> bool:
        """Whether the per-round results.json carries `nodes`. Above NODES_EVERY_ROUND clients
        the table (and asking Flower for every node's status) would make each round's cost
        grow with the federation's size, so it is written when the run ends only."""
        return int(self.meta.get("num_clients") or 0) <= NODES_EVERY_ROUND

    def _write(self, final: bool = False, nodes: dict[str, Any] | None = None) -> dict[str, Any]:
        results = {
            "schema_version": SCHEMA_VERSION,
            "meta": self.meta,
            "config": to_dict(self.cfg),
            "rounds": self.rounds,
            "final": self.final_summary() if final else None,
        }
        if nodes is None and self.nodes_fn is not None and self.nodes_every_round():
            nodes = self.nodes_fn()
        if nodes is not None:  # per client: its SuperNodes, replies, failures, rejoins
            results["nodes"] = nodes
        write_json_atomic(self.out_dir / "results.json", results)
        _write_csv(self.out_dir / "rounds.csv", ROUND_KEYS, self.rounds)
        client_rows = [{"round": r["round"], **c} for r in self.rounds for c in r["clients"]]
        _write_csv(self.out_dir / "clients.csv", CLIENT_KEYS, client_rows)
        if self.events is not None:  # never raises (a failed write is a warning)
            self.events.record(results, best=self.best, final=final)
        return results


def resume_hint(out_dir: Path, cfg: DictConfig) -> str:
    """What to run to continue a run cut off in `out_dir`."""
    if not bool(cfg.get("checkpoint", True)):
        return "this run writes no checkpoint (checkpoint=false): start it again"
    return (
        f"the same command with resume={out_dir} continues after the last checkpointed round "
        f"({out_dir}/checkpoint.pt)"
    )


def mark_interrupted(out_dir: Path, reason: str) -> bool:
    """A results.json still `running` after its server ended (killed, or lost its SuperLink
    before it could say so): `interrupted`, with the reason and what to run to resume.
    Returns whether it changed the file."""
    path = Path(out_dir) / "results.json"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    meta = results.get("meta") or {}
    if meta.get("status") != "running":
        return False
    hint = (meta.get("status_detail") or {}).get("if_interrupted", "")
    meta["status"] = "interrupted"
    meta["status_detail"] = {"reason": reason, "resume": hint}
    results["meta"] = meta
    write_json_atomic(path, results)
    return True


def run_status(
    rounds: list[dict[str, Any]], configured: int, error: str | None, stopped: str | None
) -> tuple[str, dict[str, Any]]:
    """(status, detail) of a run, from its rounds (results.json `meta.status`):

    - `failed`: the run raised, no round made a new global model, or the final model's test
      loss is not finite (it diverged);
    - `degraded`: some rounds did not make a new model from at least `quorum` of their clients
      (`rounds_below_quorum` lists them), or fewer rounds ran than configured without a
      stated reason;
    - `completed`: every round aggregated as configured (a stop at the simulated-time or
      privacy budget is stated in `stopped_early`, not a degradation).
    """
    fed = [r for r in rounds if r["round"] > 0]
    if error:
        return "failed", {"error": error[:2000]}
    if not any(r["aggregated"] for r in fed):
        return "failed", {"reason": "no round aggregated a new global model"}
    loss = rounds[-1].get("test_loss") if rounds else None
    if loss is not None and not math.isfinite(loss):
        return "failed", {"reason": "the final model's test loss is not finite: it diverged"}
    detail: dict[str, Any] = {}
    below = [r["round"] for r in fed if not r["aggregation_success"]]
    if below:
        detail["rounds_below_quorum"] = below
    if stopped:
        detail["stopped_early"] = stopped
    elif len(fed) < configured:
        detail["rounds_missing"] = configured - len(fed)
    return ("degraded" if below or "rounds_missing" in detail else "completed"), detail


def aggregation_success(rec: RoundRecord | None, quorum: float) -> bool:
    """The round made a new global model from at least `quorum` x the clients it was waiting
    for (`RoundRecord.expected`; a replacement or late update counts as a reply). Round 0 is
    False."""
    if rec is None or not rec.aggregated:
        return False
    return rec.num_replies >= max(1, math.ceil(quorum * len(rec.expected) - 1e-9))


def _extra(row: dict[str, Any]) -> str:
    """ROC-AUC / PR-AUC / F1 in the progress line where they mean something (binary tasks)."""
    if "test_confusion" not in row or len(row["test_confusion"]) != 4:
        return ""
    auc, pr_auc, f1 = (_fmt(row.get(f"test_{k}")) for k in ("roc_auc", "pr_auc", "f1"))
    return f"auc={auc}  pr_auc={pr_auc}  f1={f1}  "


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else "-"


def _yaml(cfg: DictConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(cfg, resolve=True)


def _write_csv(path: Path, keys: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    extra = sorted({k for r in rows for k in r} - set(keys) - {"clients"})
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=[*keys, *extra], extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: json_safe(v) for k, v in r.items()})
    write_atomic(path, text.getvalue())


def plot_rounds(rounds: list[dict[str, Any]], out_dir: Path, title: str = "") -> list[Path]:
    """accuracy.png and loss.png against round (server test set and client validation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # Tasks with few classes (imbalanced tables): accuracy alone misleads, show the honest metrics.
    few_classes = any("test_confusion" in r for r in rounds)
    for metric, ylabel in (("accuracy", "accuracy"), ("loss", "loss")):
        fig, ax = plt.subplots(figsize=(6, 4))
        series = [
            (f"test_{metric}", "global model, server test set"),
            (f"client_{metric}", "global model, client validation"),
        ]
        if metric == "accuracy" and few_classes:
            ylabel = "score"
            series = [
                ("test_accuracy", "accuracy, server test set"),
                ("client_accuracy", "accuracy, client validation (pooled)"),
                ("test_balanced_accuracy", "balanced accuracy, server test set"),
                ("test_roc_auc", "ROC-AUC, server test set"),
                ("test_f1", "F1, server test set"),
                ("majority_accuracy", "majority class accuracy"),
            ]
        for key, label in series:
            pts = [
                (r["round"], r[key])
                for r in rounds
                if isinstance(r.get(key), float) and math.isfinite(r[key])
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=label)
        if metric == "loss":
            pts = [
                (r["round"], r["train_loss"])
                for r in rounds
                if isinstance(r.get("train_loss"), float)
            ]
            if pts:
                ax.plot(
                    *zip(*pts, strict=True), marker=".", ms=3, label="clients' local train loss"
                )
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"{metric}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
