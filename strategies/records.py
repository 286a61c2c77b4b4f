"""Typed records of what happened in a round: one meaning per field, for every strategy.

Strategies fill these; the recorder (`fedapp/recorder.py`) turns them into `results.json`,
`rounds.csv` and `clients.csv`. Each field is documented once, here, and means the same for
every strategy, synchronous or event-driven.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NUM_EXAMPLES = "num-examples"

# results.json `final.sites[]`: one entry per client that answered the per-site evaluation after
# the last round (fedapp/features/sites.py), the same keys for every strategy; and its summary keys.
SITE_FIELDS = {
    "client": "the client (partition id)",
    "n_test": "its held-out rows the scores are on (its validation rows, `task.client_val_fraction` "
    "or the node's own `val-fraction`: a seeded split, never trained on)",
    "metric": "the metric of the scores: the task's headline one (accuracy; `roc_auc` for tables) "
    "or `sites.metric`",
    "global": "the final global model's score on those rows (null where undefined, e.g. ROC-AUC "
    "on rows of one class)",
    "personal": "its personal model's score (strategies/personal.py: finetune, fedper, fedrep, "
    "fedbn, ditto); null where the strategy does not personalise",
    "local_only": "its local-only model's score (`strategy=local_only`); null otherwise",
}
SITE_SUMMARY = {
    "sites": "per client, its scores on its own held-out rows (`final.sites[]`, below); null "
    "under secure encryption or when the evaluation failed",
    "site_mean_global": "mean over the sites of `global`",
    "site_mean_personal": "mean over the sites of `personal` (null: no personal models)",
    "site_min": "the worst site's score of the model the method gives it (`personal`, else "
    "`local_only`, else `global`)",
}


@dataclass
class ClientRecord:
    """One client's reply in one phase of one round (a row of `clients.csv`)."""

    phase: str  # "train" | "evaluate"
    partition_id: int  # the client (partition id; never Flower's random node id)
    node_id: int  # the SuperNode that served it
    status: str = "pending"  # "ok", "error: <reason>" or "rejected: <why>"
    # What the client reported and the server logs: num-examples, train_loss, train_steps,
    # train_time_s, train_skipped_steps (train.precision=fp16 only: steps skipped for
    # overflowing gradients), eval_loss, eval_accuracy, eval_time_s, the DP ledger's dp_* and
    # synthetic-rows (the synthetic rows a client sent, or added to its training:
    # fedapp.features.synthetic), synthetic-candidates and dp_refine_noise_multiplier (the candidates
    # its DP discriminator chose them from, and that discriminator's noise multiplier:
    # generator.refine=discriminator); a strategy may log more, see `logged_metrics`.
    metrics: dict[str, Any] = field(default_factory=dict)
    # Share of the new global model that came from this client's update: weights sum to 1 over
    # a round's clients for averaging strategies (FedAvg family, trust, contribution, tiered);
    # for FedAsync the previous global model keeps the rest (shares sum to at most 1); robust
    # aggregators report effective shares (strategies/robust.py); None where undefined
    # (q-FedAvg, or not aggregated).
    weight: float | None = None
    # Strategy-specific numbers, each prefixed or documented by its strategy: trust_*,
    # contrib_*, fednova_a, tier / staleness / steps_assigned (scheduling), mixing_rate and
    # version (FedAsync: the rate alpha_t its update was mixed in with, and the model version
    # it produced).
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def replied(self) -> bool:
        """The client ran the message to the end (its reply may still have been rejected)."""
        return self.status != "pending" and not self.status.startswith("error")

    def to_json(self) -> dict[str, Any]:
        """The flat dict of `results.json` rounds[].clients[] and of a clients.csv row."""
        out: dict[str, Any] = {
            "phase": self.phase,
            "partition_id": self.partition_id,
            "node_id": self.node_id,
            "status": self.status,
            **self.metrics,
        }
        if self.weight is not None:
            out["weight"] = self.weight
        out.update(self.details)
        return out


@dataclass
class RoundRecord:
    """What happened in one round (a row of `rounds.csv`, minus the server's evaluation)."""

    # Partition ids whose training result this round was waiting for: the denominator of
    # the round's quorum (`aggregation_success`) and `num_sampled` in results.json. Synchronous
    # strategies: the clients sampled for training. Tiered scheduling: the clients whose window
    # ends in this round (wherever they were dispatched). FedAsync: the clients whose replies
    # this round processed.
    expected: list[int] = field(default_factory=list)
    dispatched: int = 0  # trainings started in this round (replacements and probes excluded)
    evaluated: list[int] = field(default_factory=list)  # sampled for federated evaluation
    bytes_down: int = 0  # models (and controls) sent for training and evaluation this round
    bytes_up: int = 0  # what came back from training replies counted this round
    num_replies: int = 0  # accepted training updates
    num_failures: int = 0  # expected trainings that did not give an accepted update
    aggregated: bool = False  # a new global model was produced
    train_metrics: dict[str, Any] = field(default_factory=dict)  # aggregated client metrics
    eval_metrics: dict[str, Any] = field(default_factory=dict)  # pooled federated evaluation
    clients: list[ClientRecord] = field(default_factory=list)
    schedule: dict[str, Any] = field(default_factory=dict)  # scheduling strategies' plan
    # Round-level choices and facts: contribution's temperature and candidates' losses;
    # synthetic data's `phase` (generator | synthesize), `synthetic_rows`, `rows_bytes`,
    # `server_train_s`; augment=rare_class's `generator_sent` (training messages that carried
    # the generator; the others named the copy their client keeps).
    aggregation: dict[str, Any] = field(default_factory=dict)
    aggregate_s: float = 0.0  # server seconds spent screening, decoding and aggregating updates

    def add_client(self, phase: str, partition_id: int, node_id: int) -> ClientRecord:
        rec = ClientRecord(phase, partition_id, node_id)
        self.clients.append(rec)
        return rec

    def accepted(self, phase: str = "train") -> dict[int, ClientRecord]:
        """Records of the replies accepted in `phase`, by partition id."""
        return {c.partition_id: c for c in self.clients if c.phase == phase and c.ok}

    def share_of(self, partition_ids: frozenset[int] | set[int]) -> float | None:
        """Total `weight` of these clients' accepted updates (the round's attacker weight):
        0 when nothing was aggregated or none of them got in; None when the strategy has no
        per-client share (q-FedAvg)."""
        if not self.aggregated:
            return 0.0
        entries = list(self.accepted("train").values())
        if entries and any(c.weight is None for c in entries):
            return None
        return float(sum(c.weight for c in entries if c.partition_id in partition_ids))
