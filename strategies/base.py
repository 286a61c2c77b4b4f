"""Plumbing shared by every fedapp strategy, written once.

`FedappStrategyMixin` sits in front of a Flower Message-API strategy (FedAvg family) and adds:
- its own round loop (`start`): Flower's loop (train, federated evaluation, server-side
  evaluation), stopped early, keeping the last global model, once the run's simulated-time
  budget is spent;
- reproducible client sampling: the same seed picks the same partitions in every run, even
  though Flower's node ids are random (Flower's own sampler uses an unseeded `random.sample`
  and waits without limit for `min_available_nodes`); messages are built with Flower's public
  `Message` API, a strategy adds what it sends through `round_config`;
- reply screening: error replies, replies whose arrays do not match the global model,
  replies with NaN/Inf and replies whose metrics are out of type, range or form
  (strategies.screening) are dropped and reported instead of crashing the ServerApp or
  poisoning the average; a reply whose screening itself fails is a rejected reply too;
- claim caps: every accepted `num-examples` is capped (strategies.claims) before any weight,
  CKKS weight or evaluation average is computed from it;
- typed round records (`strategies.records`) that the results recorder reads.

The aggregation rule proper is Flower's (`aggregate_accepted` calls the Flower strategy's
`aggregate_train` on screened replies) unless a strategy overrides it with its own math.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result

from fedapp.core import seeds
from fedapp.core.flower_compat import aggregate_metricrecords
from fedapp.core.plugins import (
    PLAIN,
    CodecError,
    EncryptedAggregation,
    PrePhase,
    ReleaseMechanism,
    UpdateCodec,
)
from strategies.claims import ClaimPolicy, claim_caps, scale_counts
from strategies.records import NUM_EXAMPLES, ClientRecord, RoundRecord
from strategies.screening import (
    CONFUSION,
    list_length_refusals,
    metrics_refusal,
    value_refusal,
)
from tasks.metrics import confusion_metrics

__all__ = [
    "NUM_EXAMPLES",
    "FedappStrategyMixin",
    "aggregate_scalar_metrics",
    "num_examples",
    "reply_arrays",
    "reply_metrics",
    "sample_partitions",
]


def reply_metrics(msg: Message) -> MetricRecord | None:
    """The (single) MetricRecord of a reply, or None if it has none."""
    return next(iter(msg.content.metric_records.values()), None)


def reply_arrays(msg: Message) -> ArrayRecord | None:
    """The model a reply carries: its ArrayRecord "arrays", else its only one, else None."""
    records = msg.content.array_records
    if "arrays" in records:
        return records["arrays"]
    return next(iter(records.values()), None) if len(records) == 1 else None


def num_examples(msg: Message) -> float:
    """The `num-examples` a (screened) reply claims."""
    return float(reply_metrics(msg)[NUM_EXAMPLES])


def layers(arrays: ArrayRecord, keys: Iterable[str] | None = None) -> list[np.ndarray]:
    """The arrays of a record as NumPy arrays, in `keys` order (default: the record's)."""
    return [arrays[k].numpy() for k in (keys if keys is not None else arrays.keys())]


def to_record(keys: Iterable[str], arrays: Iterable[np.ndarray]) -> ArrayRecord:
    """NumPy arrays back into an ArrayRecord under `keys`."""
    return ArrayRecord({k: Array(np.asarray(a)) for k, a in zip(keys, arrays, strict=True)})


def sample_partitions(
    available: Iterable[int], k: int, seed: int, server_round: int, stream: int = 0
) -> list[int]:
    """Choose `k` distinct partition ids from `available`, determined by (seed, round, stream)."""
    pool = np.array(sorted(set(available)), dtype=np.int64)
    if k > len(pool):
        raise ValueError(f"cannot sample {k} clients from {len(pool)} available")
    rng = seeds.rng("sampling", seed, server_round, stream)
    return sorted(int(p) for p in rng.choice(pool, size=k, replace=False))


def aggregate_scalar_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Flower's weighted metric average over scalar metrics only.

    List-valued metrics (label histograms) are per-client facts read from the round record;
    averaging them across clients means nothing, so they are left out.
    """
    scalar_only = [
        RecordDict(
            {
                "metrics": MetricRecord(
                    {
                        k: v
                        for k, v in next(iter(r.metric_records.values())).items()
                        if not isinstance(v, list)
                    }
                )
            }
        )
        for r in records
    ]
    return aggregate_metricrecords(scalar_only, weighted_by_key)


def pooled_confusion_metrics(replies: list[Message]) -> dict[str, float]:
    """Sum clients' confusion matrices (`eval-confusion`) and compute pooled metrics.

    Precision, recall and F1 do not average over clients; pooled counts give the metric of
    the global model on the union of the evaluated clients' validation rows.
    """
    mats = [
        np.asarray(m[CONFUSION], dtype=np.float64)
        for m in map(reply_metrics, replies)
        if CONFUSION in m
    ]
    if not mats or len({len(x) for x in mats}) != 1:
        return {}
    total = np.sum(mats, axis=0)  # screened: whole counts up to 1e15 each (exact in float64)
    k = math.isqrt(len(total))
    if k * k != len(total) or not np.all(np.isfinite(total)):
        return {}
    return {f"eval_{name}": v for name, v in confusion_metrics(total.reshape(k, k)).items()}


def arrays_are_finite(arrays: ArrayRecord) -> bool:
    return all(np.isfinite(a.numpy()).all() for a in arrays.values() if a.numpy().dtype.kind == "f")


def cast_like(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Return `arrays` with each array cast to the dtype of the same key in `reference`."""
    return ArrayRecord(
        {k: Array(np.asarray(arrays[k].numpy(), dtype=reference[k].numpy().dtype)) for k in arrays}
    )


def decoded_layout_refusal(arrays: ArrayRecord) -> str | None:
    """Why arrays do not decode to what their headers say (None: they do). An Array's shape
    and dtype are fields of its message, apart from its bytes: a reply can say (3,) and carry
    five values, or bytes that are no array at all (that raises, and rejects the reply)."""
    for key in arrays:
        array = arrays[key]
        value = array.numpy()
        if value.shape != tuple(array.shape) or str(value.dtype) != str(array.dtype):
            return (
                f"array '{key}' holds {value.dtype} {value.shape} where its header says "
                f"{array.dtype} {tuple(array.shape)}"
            )
    return None


def same_layout(a: ArrayRecord, b: ArrayRecord) -> bool:
    """True when both records hold the same keys with the same shapes and dtypes."""
    if list(a.keys()) != list(b.keys()):
        return False
    return all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)


class FedappStrategyMixin:
    """Mixin for Flower `FedAvg`-family strategies; list it first among the bases.

    Subclasses customise it through these hooks (and Flower's own `aggregate_train` math):
    `round_config` (what a training message carries besides the model), `aggregate_accepted`
    (the aggregation rule over screened replies), `client_weights` (each client's share),
    `write_reports` (extra files at the end of a run) and `client_units` (the strategy's
    client part, composed by the ClientApp; see fedapp/core/units.py).
    """

    # The strategy's client-side units (fedapp.core.units.ClientUnit subclasses), run by the
    # ClientApp for this strategy's training messages in the order listed.
    client_units: ClassVar[tuple[type, ...]] = ()
    # ArrayRecords besides the model that replies must carry (SCAFFOLD's control-variate change)
    extra_array_records: ClassVar[tuple[str, ...]] = ()
    # Reply metrics the aggregation cannot do without (a privacy mode that withholds one of
    # them is refused at start-up)
    required_metrics: ClassVar[tuple[str, ...]] = ()
    # The aggregation divides by each reply's `train_steps` (FedNova): replies need >= 1.
    divides_by_steps: ClassVar[bool] = False
    # Capabilities, declared (read by the cross-feature checks: central DP, CKKS, augment;
    # tests/strategies/test_capabilities.py holds every class to what it does):
    # - `schedules_rounds`: the strategy schedules its own work inside the round loop instead
    #   of a synchronous sample per round (asynchronous and tiered strategies on the clock,
    #   the synthetic-data phase and its sharing round);
    # - `aggregation_rule`: "weighted_mean" (FedAvg's average of the updates with public,
    #   sample-count weights), "normalized_mean" (FedNova: weights and steps both public),
    #   "robust" (a statistic of the updates: median, trimmed mean, Krum, Bulyan),
    #   "fair" (q-FedAvg: loss-dependent), "data_dependent" (weights from the updates or
    #   the clients' reports: trust, contribution) or "personal" (FedAvg's mean of the shared
    #   part, personal layers sent back as received, or nothing aggregated: local_only;
    #   strategies/personal.py) or "server_optimizer" (FedAvg's mean taken as a
    #   pseudo-gradient by a stateful server optimizer: FedAdam, FedYogi, FedAdagrad,
    #   FedAvgM; strategies/adaptive.py);
    # - `shares_synthetic_rows`: clients send synthetic rows once instead of (or before)
    #   model updates (strategy=synthetic; fedapp.features.synthetic reads it);
    # - `sample_dp_refusal`: why the strategy cannot run under privacy=sample_dp ("" = it
    #   can), e.g. a client's personal model trained outside the DP ledger's steps.
    schedules_rounds: ClassVar[bool] = False
    shares_synthetic_rows: ClassVar[bool] = False
    aggregation_rule: ClassVar[str] = "weighted_mean"
    # Keys of the client MetricRecord copied into the per-client record.
    logged_metrics: ClassVar[tuple[str, ...]] = (
        NUM_EXAMPLES,
        "train_loss",
        "train_steps",
        "train_time_s",
        "train_skipped_steps",
        "eval_loss",
        "eval_accuracy",
        "eval_time_s",
        "dp_epsilon",
        "dp_target_epsilon",
        "dp_noise_multiplier",
        "dp_noise_seeded",  # only in the insecure seeded-noise test mode (tasks.dp_sgd)
        "crypto_s",
        "synthetic-rows",
        "synthetic-candidates",
        "dp_refine_noise_multiplier",
    )

    seed: int = 0
    min_replies: int = 1
    compression: UpdateCodec = PLAIN  # the run's update codec (fedapp.features.compression)
    secure: EncryptedAggregation | None = (
        None  # encrypted aggregation (fedapp.features.secure), public key only
    )
    sim_time_budget_s: float = 0.0  # stop starting rounds once the clock passes this (0 = never)
    # Loss of a model (list of arrays, state-dict order) on operator-held validation rows, set
    # by the ServerApp when `server_val_fraction` > 0; strategies that do not use it ignore it.
    server_loss: Any = None
    # augment=rare_class (fedapp.features.synthetic.GeneratorPhase, set by the ServerApp): generator
    # rounds before the first training round; the generator then goes with every model.
    generator_phase: PrePhase | None = None
    # privacy=central_dp (fedapp.features.privacy.CentralDP, set by the ServerApp): the round
    # loop sends its training messages and keeps its (noised) aggregate.
    release: ReleaseMechanism | None = None
    # The caps on claimed `num-examples` (strategies.claims; the run's `claims` block) and the
    # training rows each client counted in its exact preprocessing statistics (partition id ->
    # rows, clipped), set by the ServerApp through `bind_claims`.
    claims: ClaimPolicy = ClaimPolicy()
    stats_rows: Mapping[int, float] = {}

    def bind_claims(self, policy: ClaimPolicy, stats_rows: Mapping[int, float]) -> None:
        self.claims = policy
        self.stats_rows = {int(p): float(r) for p, r in stats_rows.items()}

    def bind(
        self,
        node_partitions: Mapping[int, int],
        seed: int,
        min_replies: int = 1,
        attackers: Iterable[int] = (),
        sim_time_budget_s: float = 0.0,
    ) -> None:
        """Attach the node-id -> partition-id map (from the discovery QUERY) and the seed.

        `attackers` are the partition ids the attack harness corrupts (known to the server
        only to *report* how much weight they got; no strategy may read it to decide).
        """
        self.attackers = frozenset(int(a) for a in attackers)
        self.node_partitions = dict(node_partitions)
        self.partition_nodes = {p: n for n, p in self.node_partitions.items()}
        self.seed = int(seed)
        self.min_replies = int(min_replies)
        self.sim_time_budget_s = float(sim_time_budget_s)
        self.rounds: dict[int, RoundRecord] = {}
        self._global_arrays: ArrayRecord | None = None
        self._round = 0
        # the model a reply's update is relative to, by the message it answers (event-driven
        # strategies; synchronous rounds use the round's global model)
        self.reply_base: dict[str, ArrayRecord] = {}
        # phase -> partition id -> its last capped claim (the median of `claims` uses them)
        self.earlier_claims: dict[str, dict[int, float]] = {}
        if self.release is not None:
            self.release.bind()

    def bind_server_validation(self, loss_fn: Any) -> None:
        self.server_loss = loss_fn

    def write_reports(self, out_dir: Path) -> None:
        """Extra files a strategy writes at the end of a run (e.g. the contribution ledger)."""

    # -- the round loop ----------------------------------------------------------------------
    def over_budget(self, grid: Grid) -> bool:
        """True once the clock (fedapp.features.hetero.ClockGrid) has passed `sim_time_budget_s`."""
        now = getattr(grid, "now", None)
        return bool(self.sim_time_budget_s) and now is not None and now >= self.sim_time_budget_s

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn=None,
        start_round: int = 1,
    ) -> Result:
        """The one round loop of every strategy (Flower's `Strategy.start`): per round,
        training (`train_round`: synchronous send-and-wait here, events on the clock for
        event-driven strategies), federated evaluation and server-side evaluation
        (`evaluate_fn`, also once before round 1, `begin`).
        Stops starting rounds once the simulated-time budget is spent. `start_round` > 1:
        a resumed run (fedapp.checkpoint), `initial_arrays` being the model after the round
        before it."""
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result = Result()
        arrays = self.begin(grid, initial_arrays, start_round, train_config, timeout, evaluate_fn)
        if start_round > 1:
            result.arrays = arrays
        self._num_rounds = num_rounds
        phase = self.round_phase()
        previous = None  # the global model before the last aggregate (a refused one's way back)
        for rnd in range(start_round, num_rounds + 1):
            why = self.planned_stop(rnd)
            if why:
                log(INFO, "[fedapp] %s; stopping", why)
                self.stop_reason = why
                break
            if self.stop_for_budget(grid):
                break
            if phase is not None and rnd <= phase.rounds:  # the generator's rounds
                phase.play_round(self, rnd, grid, train_config, timeout)
                if evaluate_fn:
                    evaluate_fn(rnd, arrays)
                continue
            new, replies = self.train_round(rnd, arrays, grid, train_config, timeout)
            if previous is not None and self.model_refused(rnd, replies):
                new, arrays = None, previous  # back to the model the clients had accepted
                result.arrays = self._global_arrays = arrays
                self.round_log(rnd).aggregated = False
            if new is not None:
                # a round that is not an aggregate of the clients' updates (strategy=synthetic's
                # sharing round, an event-driven round) is never gone back on: no replies here
                previous, arrays = (arrays if replies else None), new
                result.arrays = new
            self.evaluate_round(grid, rnd, arrays, evaluate_config, timeout)
            if evaluate_fn:
                evaluate_fn(rnd, arrays)
        self.finish(grid, result)
        return result

    def begin(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        start_round: int,
        train_config: ConfigRecord,
        timeout: float,
        evaluate_fn,
    ) -> ArrayRecord:
        """Before the first round: the global model the rounds start from (`initial_arrays`),
        evaluated once server-side when the run is new (round 0). Event-driven strategies
        also set up their policy and probe the clients here (strategies/scheduler.py)."""
        self._global_arrays = initial_arrays
        if start_round == 1 and evaluate_fn:
            evaluate_fn(0, initial_arrays)
        return initial_arrays

    def finish(self, grid: Grid, result: Result) -> None:
        """After the last round (or a stop): e.g. messages still in flight discarded."""

    def round_phase(self) -> PrePhase | None:
        """The phase whose rounds (1..`phase.rounds`) come before the first training round:
        augment=rare_class's generator rounds (`generator_phase`)."""
        return self.generator_phase

    def planned_stop(self, server_round: int) -> str | None:
        """Why this strategy's own design ends the run before `server_round` (strategy=
        synthetic's one-shot mode), or None."""
        return None

    def train_round(
        self,
        server_round: int,
        arrays: ArrayRecord,
        grid: Grid,
        config: ConfigRecord,
        timeout: float,
    ) -> tuple[ArrayRecord | None, list[Message]]:
        """One training round: (the new global model or None, the replies)."""
        train = self.release or self  # central DP: its messages, its noised aggregate
        replies = list(
            grid.send_and_receive(
                train.configure_train(server_round, arrays, config, grid), timeout=timeout
            )
        )
        new, _ = train.aggregate_train(server_round, replies)
        return new, replies

    def send_phase_round(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        message_type: str,
        timeout: float,
    ) -> list[Message]:
        """A round of a phase's own state (`arrays`, e.g. the generator) to this round's
        sample, under `message_type`: sent as a training message, replies screened against
        `arrays` instead of the global model; returns the accepted replies."""
        self._round, task_global = server_round, self._global_arrays
        self._global_arrays = arrays  # replies are screened against the phase's state
        try:
            msgs = self._messages(
                server_round,
                arrays,
                ConfigRecord({**dict(config), "server-round": server_round}),
                grid,
                message_type,
            )
            replies = grid.send_and_receive(msgs, timeout=timeout)
            return self.screen_replies(server_round, list(replies), "train")
        finally:
            self._global_arrays = task_global

    stop_reason: str | None = None  # why the run stopped before its configured rounds

    def model_refused(self, server_round: int, replies: list[Message]) -> bool:
        """Whether at least half of a round's training replies refused the global model they
        were sent (fedapp.features.secure's client checks: the decrypted aggregate is finite and within
        the node's `max-model-norm`; the server cannot decrypt it). Then the round's replies
        are not aggregated and the next round goes back to the model before it, recorded as
        `global_model_refused` (a poisoned aggregate is never kept silently)."""
        reasons = [str(m.error.reason or "") for m in replies if m.has_error()]
        refused = [r for r in reasons if "refused the" in r and "global model" in r]
        if not replies or 2 * len(refused) < len(replies):
            return False
        self.round_log(server_round).aggregation["global_model_refused"] = {
            "clients": len(refused),
            "of": len(replies),
            "reason": refused[0][:300],
            "action": "the previous global model is restored",
        }
        log(
            WARNING,
            "round %d: %d of %d clients refused the global model (%s); going back to the one "
            "before it",
            server_round,
            len(refused),
            len(replies),
            refused[0][:200],
        )
        return True

    def stop_for_budget(self, grid: Grid) -> bool:
        why = self.release.stop_reason() if self.release is not None else None
        if why:
            log(INFO, "[fedapp] %s; stopping", why)
            self.stop_reason = why
            return True
        if not self.over_budget(grid):
            return False
        log(INFO, "[fedapp] simulated-time budget of %.0fs spent; stopping", self.sim_time_budget_s)
        self.stop_reason = f"simulated-time budget of {self.sim_time_budget_s:g} s spent"
        return True

    def evaluate_round(
        self, grid: Grid, rnd: int, arrays: ArrayRecord, config: ConfigRecord, timeout: float
    ) -> None:
        """Federated evaluation of the global model on `eval_clients_per_round` clients."""
        replies = grid.send_and_receive(
            self.configure_evaluate(rnd, arrays, config, grid), timeout=timeout
        )
        self.aggregate_evaluate(rnd, replies)

    # -- bookkeeping -------------------------------------------------------------------------
    def round_log(self, server_round: int) -> RoundRecord:
        return self.rounds.setdefault(server_round, RoundRecord())

    def partition_of(self, node_id: int) -> int:
        return self.node_partitions.get(node_id, -1)

    # -- messages ----------------------------------------------------------------------------
    def round_config(self, server_round: int, config: ConfigRecord) -> dict[str, Any]:
        """What this strategy adds to a round's training config (e.g. FedProx's mu)."""
        return {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round, self._global_arrays = server_round, arrays
        extra = self.round_config(server_round, config)
        if self.generator_phase is not None:  # DP-SGD planned for the rounds after the generator's
            extra.update(self.generator_phase.train_config(self._num_rounds))
        if self.secure is not None and self.secure.fednova_momentum is not None:
            extra["ckks-fednova"] = 1  # clients also encrypt their change per effective step
        config = ConfigRecord({**dict(config), **extra, "server-round": server_round})
        return self._messages(server_round, arrays, config, grid, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round = server_round
        config = ConfigRecord({**dict(config), "server-round": server_round})
        return self._messages(server_round, arrays, config, grid, MessageType.EVALUATE)

    def train_candidates(self, server_round: int, connected: list[int]) -> list[int]:
        """Partition ids that may be sampled for training this round (all connected ones)."""
        return connected

    def _messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        message_type: str,
    ) -> list[Message]:
        """One message per sampled client, chosen by partition id with a seeded draw.

        The sample size is Flower's (`max(int(connected x fraction), min nodes)`), capped at
        the clients available; unlike Flower's sampler it never waits for more nodes."""
        train = message_type.split(".")[0] == MessageType.TRAIN  # train.generator too
        fraction = self.fraction_train if train else self.fraction_evaluate
        if fraction == 0.0:
            return []
        minimum = self.min_train_nodes if train else self.min_evaluate_nodes
        all_nodes = list(grid.get_node_ids())
        size = max(int(len(all_nodes) * fraction), minimum)
        connected = [self.node_partitions[n] for n in all_nodes if n in self.node_partitions]
        available = self.train_candidates(server_round, connected) if train else connected
        chosen = sample_partitions(
            available, min(size, len(available)), self.seed, server_round, 0 if train else 1
        )
        rec = self.round_log(server_round)
        if train:
            rec.expected, rec.dispatched = chosen, len(chosen)
        else:
            rec.evaluated = chosen
        if train:  # what travels: the model as the downlink codec sends it
            arrays = self.compression.encode_downlink(arrays)
        rec.bytes_down += arrays.count_bytes() * len(chosen)
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        contents = dict.fromkeys(chosen, content)
        phase = self.generator_phase
        if message_type == MessageType.TRAIN and phase is not None:
            # augment=rare_class: the federation's generator goes with a client's model until
            # the client has replied with it once (it keeps a copy; GeneratorPhase.holders)
            needing = [p for p in chosen if p not in phase.holders]
            with_generator = RecordDict({**dict(content.items()), phase.record_key: phase.arrays})
            contents.update(dict.fromkeys(needing, with_generator))
            rec.bytes_down += phase.arrays.count_bytes() * len(needing)
            rec.aggregation["generator_sent"] = len(needing)
        return [
            Message(
                content=contents[p], message_type=message_type, dst_node_id=self.partition_nodes[p]
            )
            for p in chosen
        ]

    # -- screening ---------------------------------------------------------------------------
    def _extra_layout_refusal(self, record: ArrayRecord) -> str | None:
        """An extra ArrayRecord (SCAFFOLD's control change) holds floating-point arrays of
        the model's parameters only, each of its parameter's shape."""
        model = self._global_arrays
        for key in record:
            array = record[key].numpy()
            if model is not None and (key not in model or array.shape != tuple(model[key].shape)):
                return f"'{key}' is not a parameter of the model, of its shape"
            if array.dtype.kind != "f":
                return f"'{key}' is {array.dtype}, not floating point"
        return decoded_layout_refusal(record)

    def _screen_train_arrays(self, msg: Message, rec: RoundRecord) -> str | None:
        """Why a training reply's arrays cannot be aggregated (None: they can)."""
        content = msg.content
        arrays = reply_arrays(msg)
        if arrays is not None:
            rec.bytes_up += arrays.count_bytes()
        if self.secure is not None:  # ciphertexts: only their form can be checked here
            need = self.secure.keys
            if arrays is None or any(k not in arrays or arrays[k].dtype != "uint8" for k in need):
                return f"rejected: an encrypted reply must carry {need} (uint8 ciphertexts)"
            # size, CKKS parameters, level and scale against the public context (fedapp.features.secure)
            return self.secure.screen(msg.metadata.src_node_id, arrays)
        extra = set(content.array_records) - {"arrays", *self.extra_array_records}
        if arrays is None or (len(content.array_records) > 1 and extra):
            return "rejected: reply must carry exactly one model ArrayRecord"
        missing = set(self.extra_array_records) - set(content.array_records)
        if missing:
            return f"rejected: reply lacks the ArrayRecord(s) {sorted(missing)}"
        for name in self.extra_array_records:
            extra_record = content.array_records[name]
            why = self._extra_layout_refusal(extra_record)
            if why:
                return f"rejected: {name}: {why}"
            if not arrays_are_finite(extra_record):
                return f"rejected: non-finite values in {name}"
            rec.bytes_up += extra_record.count_bytes()
        if self.compression.active:  # an encoded update: decode it onto the model it left from
            base = self.reply_base.pop(msg.metadata.reply_to_message_id, self._global_arrays)
            try:
                arrays = self.compression.decode_update(arrays, base)
            except CodecError as err:
                return f"rejected: {err}"
            content["arrays"] = arrays
        if self._global_arrays is not None and not same_layout(arrays, self._global_arrays):
            return "rejected: arrays do not match the global model's layout"
        why = decoded_layout_refusal(arrays)
        if why:
            return f"rejected: {why}"
        if not arrays_are_finite(arrays):
            return "rejected: non-finite values in arrays"
        return None

    def _screen_metrics(self, msg: Message, client: ClientRecord) -> str | None:
        """Why a reply's metrics cannot be used (None: they can); logs the metrics."""
        metrics = reply_metrics(msg)
        if metrics is None or len(msg.content.metric_records) != 1:
            return "rejected: reply must carry exactly one MetricRecord"
        client.metrics.update(  # what is logged is what could be read (types and ranges)
            {
                k: metrics[k]
                for k in self.logged_metrics
                if k in metrics and value_refusal(k, metrics[k]) is None
            }
        )
        why = metrics_refusal(metrics)  # types, ranges, forms (strategies.screening)
        return f"rejected: {why}" if why else None

    def needs_train_steps(self) -> bool:
        """Whether the aggregation divides by each reply's `train_steps` (FedNova's rule, also
        under CKKS and in contribution's `normalize_steps`)."""
        return bool(
            getattr(self, "normalize_steps", False)
            or self.divides_by_steps
            or (self.secure is not None and self.secure.fednova_momentum is not None)
        )

    def _screen_one(self, msg: Message, rec: RoundRecord, client: ClientRecord, phase: str):
        """Why one reply cannot be used (None: it can). Whatever a reply holds, this returns:
        a check that fails with an exception (a field no check foresaw) rejects the reply."""
        try:
            why = self._screen_train_arrays(msg, rec) if phase == "train" else None
            why = why or self._screen_metrics(msg, client)
            if not why and phase == "train" and self.needs_train_steps():
                steps = reply_metrics(msg).get("train_steps")
                if not isinstance(steps, int | float) or not steps >= 1:
                    why = f"rejected: this rule divides by 'train_steps' (>= 1), got {steps!r}"
            return why
        except Exception as exc:  # noqa: BLE001 - a hostile reply must never stop the server
            return f"rejected: malformed reply ({type(exc).__name__}: {str(exc)[:200]})"

    def screen_replies(
        self, server_round: int, replies: Iterable[Message], phase: str
    ) -> list[Message]:
        """Return the replies fit to aggregate; record every reply's fate in the round record."""
        rec = self.round_log(server_round)
        candidates: list[tuple[Message, ClientRecord]] = []
        for msg in replies:
            src = msg.metadata.src_node_id
            client = rec.add_client(phase, self.partition_of(src), src)
            if msg.has_error():
                client.status = f"error: {msg.error.reason}".strip()[:500]
                continue
            why = self._screen_one(msg, rec, client, phase)
            if why:
                client.status = why
                continue
            client.status = "ok"
            candidates.append((msg, client))
        gen = self.generator_phase
        if gen is not None and phase == "train" and server_round > gen.rounds:
            # augment=rare_class: a client that replied (even if rejected) keeps the generator
            gen.note_replies(
                rec.expected,
                [c.partition_id for c in rec.clients if c.phase == phase and c.replied],
            )
        # Flower aborts the whole run on replies with different metric keys; drop the odd ones.
        if candidates:
            key_sets = Counter(tuple(sorted(reply_metrics(m).keys())) for m, _ in candidates)
            majority = key_sets.most_common(1)[0][0]
            for msg, client in candidates:
                keys = tuple(sorted(reply_metrics(msg).keys()))
                if keys != majority:
                    client.status = (
                        f"rejected: metric keys {list(keys)} differ from {list(majority)}"
                    )
            # list metrics are summed element by element: the majority's lengths only
            kept = [(m, c) for m, c in candidates if c.ok]
            for (_, client), why in zip(
                kept, list_length_refusals([reply_metrics(m) for m, _ in kept]), strict=True
            ):
                if why:
                    client.status = f"rejected: {why}"
        # Replies arrive in whatever order clients finish; floating-point sums depend on order,
        # so aggregate in partition order to make runs with the same seed bit-for-bit equal.
        accepted = sorted(
            (m for m, c in candidates if c.ok),
            key=lambda m: self.partition_of(m.metadata.src_node_id),
        )
        self.cap_claims(rec, accepted, phase)
        for client in rec.clients:
            if client.phase == phase and not client.ok:
                log(
                    WARNING,
                    "round %d %s: client %s %s",
                    server_round,
                    phase,
                    client.partition_id,
                    client.status,
                )
        return accepted

    def cap_claims(self, rec: RoundRecord, accepted: list[Message], phase: str) -> None:
        """Cap each accepted reply's `num-examples` (strategies.claims), in the reply itself,
        so that every weight computed from it afterwards (FedAvg's, a strategy's own, CKKS's
        plaintext weights, evaluation averages) uses the capped number; a capped client's
        record keeps what it claimed. An evaluation reply's confusion counts are scaled with
        its claim (they add up to it)."""
        if not accepted:
            return
        earlier = self.__dict__.setdefault("earlier_claims", {}).setdefault(phase, {})
        by_pid = {c.partition_id: c for c in rec.clients if c.phase == phase and c.ok}
        claims = {self.partition_of(m.metadata.src_node_id): num_examples(m) for m in accepted}
        caps = claim_caps(claims, self.stats_rows, earlier, self.claims, phase)
        for msg in accepted:
            pid = self.partition_of(msg.metadata.src_node_id)
            claim, (cap, rule) = claims[pid], caps[pid]
            earlier[pid] = min(claim, cap)
            if claim <= cap:
                continue
            metrics = reply_metrics(msg)
            metrics[NUM_EXAMPLES] = float(cap)
            if CONFUSION in metrics:
                metrics[CONFUSION] = scale_counts(list(metrics[CONFUSION]), cap / claim)
            client = by_pid.get(pid)
            if client is not None:
                client.metrics[NUM_EXAMPLES] = float(cap)
                client.details["num_examples_claimed"] = float(claim)
                client.details["num_examples_cap"] = rule
            log(
                WARNING,
                "round %d %s: client %s claimed %g examples; capped at %g (%s)",
                self._round,
                phase,
                pid,
                claim,
                cap,
                "its own statistics count" if rule == "stats" else "ratio to the median claim",
            )

    # -- aggregation -------------------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t0 = time.perf_counter()
        try:
            return self._aggregate_train(server_round, replies)
        finally:
            self.round_log(server_round).aggregate_s += time.perf_counter() - t0

    def _aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.screen_replies(server_round, list(replies), "train")
        rec = self.round_log(server_round)
        rec.num_replies = len(accepted)
        rec.num_failures = len(rec.expected) - len(accepted)
        if len(accepted) < self.min_replies:
            log(
                WARNING,
                "round %d: %d valid replies < min_replies=%d; keeping the previous global model",
                server_round,
                len(accepted),
                self.min_replies,
            )
            return None, None
        if self.secure is not None:
            return self._aggregate_encrypted(rec, accepted)
        try:  # screened replies; an aggregation that still fails keeps the previous model
            self._log_weights(rec, accepted)
            arrays, metrics = self.aggregate_accepted(server_round, accepted)
        except Exception as exc:  # noqa: BLE001 - the run goes on (stated in the round record)
            log(
                WARNING,
                "round %d: the aggregation failed (%s: %s); keeping the previous global model",
                server_round,
                type(exc).__name__,
                exc,
            )
            rec.aggregation["aggregation_failed"] = f"{type(exc).__name__}: {exc}"[:300]
            return None, None
        arrays = self.finite_or_none(server_round, arrays)
        rec.aggregated = arrays is not None
        rec.train_metrics = dict(metrics) if metrics is not None else {}
        return arrays, metrics

    def _aggregate_encrypted(self, rec: RoundRecord, accepted: list[Message]):
        """Encrypted aggregation: ciphertexts weighted by n_k / sum n and added (FedNova's rule
        when the strategy is FedNova); the server never decrypts (fedapp.features.secure)."""
        n = np.array([num_examples(m) for m in accepted])
        weights = (n / n.sum()).tolist()
        steps = [float(reply_metrics(m).get("train_steps", 0.0)) for m in accepted]
        try:  # screened already; a sum that still fails keeps the previous global model
            arrays = self.secure.aggregate(accepted, weights, steps)
        except Exception as exc:
            log(
                WARNING,
                "round %d: the encrypted sum failed (%s); keeping the previous global model",
                self._round,
                exc,
            )
            rec.aggregation["encrypted_sum_failed"] = f"{type(exc).__name__}: {exc}"[:300]
            return None, None
        self.set_weights(rec, accepted, weights)
        metrics = aggregate_scalar_metrics([m.content for m in accepted], NUM_EXAMPLES)
        rec.aggregated = True
        rec.train_metrics = dict(metrics)
        return arrays, metrics

    def aggregate_accepted(
        self, server_round: int, accepted: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The aggregation rule proper, over screened replies in partition order.

        Flower's own rule by default; strategies with their own math (trust) override this
        and keep the screening, `min_replies`, NaN guard and round record above.
        """
        return super().aggregate_train(server_round, accepted)  # type: ignore[misc]

    def finite_or_none(self, server_round: int, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """Refuse an aggregate with NaN/Inf (finite updates can still overflow when summed, e.g.
        under boosted model poisoning): the previous global model is kept and the round logged."""
        if arrays is not None and not arrays_are_finite(arrays):
            log(
                WARNING,
                "round %d: the aggregate has non-finite values; keeping the previous global model",
                server_round,
            )
            return None
        return arrays

    def client_weights(self, accepted: list[Message]) -> list[float] | None:
        """Share of the aggregate each accepted reply gets (sums to 1), or None if undefined.

        FedAvg family: n_k / sum n. Robust aggregators override this with their effective
        share (see strategies.robust); it is recorded per client as `weight` and summed over
        the attack harness's clients into the round's `attacker_weight`.
        """
        n = np.array([num_examples(m) for m in accepted])
        return (n / n.sum()).tolist() if n.sum() > 0 else None

    def set_weights(self, rec: RoundRecord, accepted: list[Message], weights) -> None:
        """Record each accepted reply's share of the aggregate."""
        by_pid = rec.accepted("train")
        for msg, w in zip(accepted, weights, strict=True):
            client = by_pid.get(self.partition_of(msg.metadata.src_node_id))
            if client is not None:
                client.weight = float(w)

    def _log_weights(self, rec: RoundRecord, accepted: list[Message]) -> None:
        weights = self.client_weights(accepted)
        if weights is not None:
            self.set_weights(rec, accepted, weights)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        accepted = self.screen_replies(server_round, replies, "evaluate")
        if not accepted:
            return None
        # weighted by validation rows (capped claims), whatever weights training uses
        try:
            metrics = self.evaluate_metrics_aggr_fn([m.content for m in accepted], NUM_EXAMPLES)
            pooled = dict(metrics) if metrics is not None else {}
            pooled.update(pooled_confusion_metrics(accepted))
        except Exception as exc:  # noqa: BLE001 - screened replies; the run goes on
            log(WARNING, "round %d: federated evaluation not averaged (%s)", server_round, exc)
            self.round_log(server_round).aggregation["evaluation_failed"] = str(exc)[:300]
            return None
        self.round_log(server_round).eval_metrics = pooled
        if pooled:
            log(INFO, "round %d federated evaluation: %s", server_round, pooled)
        return metrics
