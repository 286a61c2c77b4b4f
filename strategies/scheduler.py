"""One scheduler core for the event-driven strategies (tiered scheduling, FedAsync, TiFL).

Each of these strategies is a `Policy`: a state machine over what a real server observes,
with no Flower and no clock inside it, so it can be driven and tested with made-up events.
Events come in as method calls; each returns the decisions to carry out, in order:

    open_round(round, started, now, alive)   a round starts (alive: who answered its heartbeat)
    on_reply(ticket, now, Report | None)     a training result landed (None: it failed)
    on_timer(now)                            the policy's deadline `wake_at()` passed
        -> [Send(ticket, client, round, steps)]   dispatch training
           [Cancel(ticket)]                       stop waiting for a training
           [Fold(ticket, rate)]                   mix this update into the model now
    sent(send), folded(ticket, applied)      what became of a Send / Fold
    round_over(now), close_round(round)      when the round ends, and what it aggregates

`EventDrivenStrategy` is the only code that talks to Flower and the clock for these strategies
(written once), inside every strategy's one round loop (`FedappStrategyMixin.start`): `begin`
sets up the policy and the profiling probes, `train_round` is one round on the clock
(heartbeats, turning `Send`s into Flower
messages through `fedapp.features.hetero.ClockGrid`, waiting for the next reply or the policy's next
deadline, screening and aggregating what the policy folds), and `finish` discards what is
still in flight; the loop evaluates after every round. A strategy class supplies its policy
(`make_policy`) and its aggregation rule (`fold_round`, and `fold_now` for on-arrival mixing).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from fedapp.core.plugins import is_event_clock
from strategies.base import FedappStrategyMixin, reply_metrics
from strategies.claims import claim_caps
from strategies.screening import metrics_refusal

PROBE = f"{MessageType.QUERY}.probe"
HEARTBEAT = f"{MessageType.QUERY}.heartbeat"


# -- events and decisions ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Report:
    """What the server observed of one reply (from its metrics and the clock)."""

    partition_id: int
    duration_s: float  # from dispatch to arrival, on the run's clock
    num_examples: int | None = None
    train_steps: float | None = None
    train_time_s: float = 0.0  # the client's own compute time
    train_loss: float | None = None

    @classmethod
    def of(cls, reply: Message, partition_id: int, duration_s: float) -> Report:
        m = reply_metrics(reply) or {}
        return cls(
            partition_id=partition_id,
            duration_s=duration_s,
            num_examples=int(m["num-examples"]) if "num-examples" in m else None,
            train_steps=float(m["train_steps"]) if "train_steps" in m else None,
            train_time_s=float(m.get("train_time_s", 0.0)),
            train_loss=float(m["train_loss"]) if "train_loss" in m else None,
        )


def probe_report(reply: Message, partition_id: int, duration_s: float) -> Report | None:
    """The Report of an (unscreened) probe reply, or None when its metrics are unusable
    (strategies.screening: types and ranges; a probe must claim its num-examples)."""
    metrics = reply_metrics(reply)
    if metrics is None or metrics_refusal(metrics) is not None:
        return None
    return Report.of(reply, partition_id, duration_s)


@dataclass(frozen=True)
class Send:
    """Dispatch training to a client: the current model, the run's training config with
    `server-round` = `round` and (unless None) `max-steps` = `steps`."""

    ticket: int
    partition_id: int
    round: int
    steps: int | None = None


@dataclass(frozen=True)
class Cancel:
    """Stop waiting for this training (its reply, if any, is ignored)."""

    ticket: int


@dataclass(frozen=True)
class Fold:
    """Mix this (screened) update into the global model now, with this rate (FedAsync)."""

    ticket: int
    rate: float
    staleness: int = 0  # model versions since the client's model


@dataclass(frozen=True)
class Landed:
    """A training result the round aggregates: its ticket and the round it was dispatched in."""

    ticket: int
    partition_id: int
    dispatched_round: int
    details: dict[str, Any] = field(default_factory=dict)  # logged with the client's record


@dataclass
class RoundClose:
    """What a round ends with."""

    landed: list[Landed]  # in arrival order (errors included: they are logged)
    expected: list[int]  # partition ids whose result the round waited for
    schedule: dict[str, Any]  # the plan, for results.json
    cancel: list[int] = field(default_factory=list)  # tickets to stop waiting for


Decision = Send | Cancel | Fold


class Policy(ABC):
    """A scheduling state machine (see the module docstring)."""

    probes: bool = False  # profile every client (probe) before round 1
    heartbeats: bool = False  # heartbeat idle clients before each round
    screen_on_arrival: bool = False  # screen each reply as it lands (report None if rejected)

    def __init__(self) -> None:
        self._next_ticket = 0

    def new_ticket(self) -> int:
        self._next_ticket += 1
        return self._next_ticket

    def on_probe(self, partition_id: int, report: Report | None) -> None:
        """A profiling probe or heartbeat came back (None: it failed)."""
        return None  # optional event

    def idle(self) -> list[int]:
        """Clients not training now (policies with heartbeats)."""
        return []

    def heartbeat_targets(self, now: float) -> list[int]:
        """Clients to heartbeat before the next round (policies with heartbeats): every idle
        one, unless the policy takes some as live without (tiered: seen recently)."""
        return self.idle()

    def resumed(self, virtual: bool) -> None:
        """The run resumed from a checkpoint (`virtual`: on the virtual clock, which resumes
        where it stopped; on the wall clock the downtime is not on the clock)."""
        return None  # optional event

    @abstractmethod
    def open_round(
        self, rnd: int, started: float, now: float, alive: set[int] | None
    ) -> list[Decision]:
        """Round `rnd` starts; it started at `started` (before its heartbeats), it is `now`.
        `alive`: the clients that answered the round's heartbeat (None: no heartbeats)."""

    @abstractmethod
    def on_reply(self, ticket: int, now: float, report: Report | None) -> list[Decision]:
        """A training result landed (None: it failed)."""

    def on_timer(self, now: float) -> list[Decision]:
        """`wake_at()` passed without a reply (or nothing can land any more)."""
        return []

    def sent(self, send: Send) -> None:
        """A `Send` went out."""
        return None  # optional event

    def folded(self, ticket: int, applied: bool) -> None:
        """Whether a `Fold` was applied (False: the result was not finite)."""
        return None  # optional event

    def wake_at(self) -> float:
        """The next time the policy must be told about even without a reply."""
        return float("inf")

    @abstractmethod
    def round_over(self, now: float) -> bool:
        """Whether the current round has ended."""

    @abstractmethod
    def close_round(self, rnd: int) -> RoundClose:
        """End the round: what to aggregate and log."""


# -- the driver -------------------------------------------------------------------------------------
class EventDrivenStrategy(FedappStrategyMixin, FedAvg):
    """The Flower and clock plumbing of every event-driven strategy (see the module docstring)."""

    schedules_rounds = True

    probe_steps: int = 5
    profile_timeout_s: float = 600.0
    heartbeat_timeout_s: float = 1.0

    @abstractmethod
    def make_policy(self, train_config: ConfigRecord, timeout: float) -> Policy:
        """This strategy's policy for a run."""

    @abstractmethod
    def fold_round(
        self, rnd: int, arrays: ArrayRecord, close: RoundClose, replies: dict[int, Message]
    ) -> ArrayRecord | None:
        """The round's new global model from its landed replies (None: keep the model)."""

    def fold_now(
        self, rnd: int, arrays: ArrayRecord, fold: Fold, reply: Message
    ) -> ArrayRecord | None:
        """Apply one `Fold` (policies that mix updates in on arrival)."""
        raise NotImplementedError(f"{type(self).__name__} does not fold updates on arrival")

    def begin(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        start_round: int,
        train_config: ConfigRecord,
        timeout: float,
        evaluate_fn,
    ) -> ArrayRecord:
        if not is_event_clock(grid):
            raise TypeError(
                f"{type(self).__name__} needs the fedapp clock (fedapp.features.hetero.ClockGrid) as its grid"
            )
        self._clock = grid
        self._train_config = train_config
        if start_round > 1:
            # Resumed (fedapp.checkpoint): the policy, the tickets in flight and the model
            # were restored with the strategy's state, the flights with the clock's.
            self.policy.resumed(bool(grid.virtual))
            return self._arrays
        self._arrays = arrays = initial_arrays
        self._global_arrays = arrays
        self._tickets: dict[str, int] = {}  # message id -> ticket
        self._partition: dict[int, int] = {}  # ticket -> partition id
        policy = self.policy = self.make_policy(self._train_config, timeout)
        if evaluate_fn:
            evaluate_fn(0, arrays)
        if policy.probes:
            self._probe(grid, arrays)
        return arrays

    def train_round(
        self,
        server_round: int,
        arrays: ArrayRecord,
        grid: Grid,
        config: ConfigRecord,
        timeout: float,
    ) -> tuple[ArrayRecord | None, list[Message]]:
        """One round on the clock: the policy opens it, replies and timers drive it until
        the policy closes it, then `fold_round` makes the round's model."""
        policy, rnd = self.policy, server_round
        self._round = rnd
        rec = self.round_log(rnd)
        started = grid.now
        alive, heartbeat_s = None, None
        if policy.heartbeats:
            alive = self._heartbeat(grid, rnd, policy.heartbeat_targets(started))
            heartbeat_s = grid.now - started  # seconds on the clock the round waited for them
        replies: dict[int, Message] = {}
        self._execute(grid, rnd, policy.open_round(rnd, started, grid.now, alive), replies)
        while not policy.round_over(grid.now):
            event = grid.next_event(until=policy.wake_at())
            if event is None:
                self._execute(grid, rnd, policy.on_timer(grid.now), replies)
                continue
            ticket = self._tickets.pop(event.flight.msg_id, None)
            if ticket is None:
                continue
            replies[ticket] = event.reply
            report = self._report(rnd, ticket, event, policy)
            self._execute(grid, rnd, policy.on_reply(ticket, grid.now, report), replies)
        close = policy.close_round(rnd)
        self._execute(grid, rnd, [Cancel(t) for t in close.cancel], replies)
        rec.expected, rec.schedule = close.expected, close.schedule
        if heartbeat_s is not None:
            rec.schedule = {**rec.schedule, "heartbeat_s": heartbeat_s}
        new = self.fold_round(rnd, self._arrays, close, replies)
        if new is not None:
            self._arrays = new
        self._global_arrays = self._arrays
        log(
            INFO,
            "[%s] round %d: %d updates, sim_t=%.1fs",
            type(self).__name__,
            rnd,
            rec.num_replies,
            grid.now,
        )
        return self._arrays, []  # the model after the round (folded on arrival, or kept)

    def finish(self, grid: Grid, result: Result) -> None:
        grid.discard(list(self._tickets))
        result.arrays = self._arrays

    def _report(self, rnd: int, ticket: int, event, policy: Policy) -> Report | None:
        reply = event.reply
        if policy.screen_on_arrival and not self.screen_replies(rnd, [reply], "train"):
            return None
        if reply.has_error():
            return None
        duration = event.time - event.flight.dispatched_at
        return Report.of(reply, self._partition[ticket], duration)

    def _execute(self, grid, rnd: int, decisions: list[Decision], replies) -> None:
        """Carry out a policy's decisions in order."""
        for d in decisions:
            if isinstance(d, Send):
                self._send(grid, d)
                self.policy.sent(d)
            elif isinstance(d, Cancel):
                mids = [mid for mid, t in self._tickets.items() if t == d.ticket]
                grid.discard(mids)
                for mid in mids:
                    del self._tickets[mid]
            else:
                new = self.fold_now(rnd, self._arrays, d, replies[d.ticket])
                if new is not None:
                    self._arrays = self._global_arrays = new
                self.policy.folded(d.ticket, new is not None)

    def _send(self, grid, send: Send) -> None:
        cfg = {**dict(self._train_config), "server-round": send.round}
        if send.steps is not None:
            cfg["max-steps"] = send.steps
        sent = self.compression.encode_downlink(self._arrays)
        content = RecordDict({"arrays": sent, "config": ConfigRecord(cfg)})
        msg = Message(
            content=content,
            message_type=MessageType.TRAIN,
            dst_node_id=self.partition_nodes[send.partition_id],
        )
        (mid,) = grid.submit([msg])
        self._tickets[mid] = send.ticket
        self._partition[send.ticket] = send.partition_id
        if self.compression.active:
            self.reply_base[mid] = self._arrays
        rec = self.round_log(send.round)
        rec.bytes_down += sent.count_bytes()
        rec.dispatched += 1

    # -- probes and heartbeats ------------------------------------------------------------------
    def _probe(self, grid, arrays: ArrayRecord) -> None:
        """Profile every client once (model down, `probe_steps` local steps, model up)."""
        cfg = ConfigRecord({**dict(self._train_config), "probe-steps": self.probe_steps})
        content = RecordDict({"arrays": arrays, "config": cfg})
        t0 = grid.now
        pids = sorted(self.partition_nodes)
        msgs = [
            Message(content=content, message_type=PROBE, dst_node_id=self.partition_nodes[p])
            for p in pids
        ]
        answered = 0
        reports: list[tuple[int, Report | None]] = []
        for event in grid.exchange(msgs, timeout=self.profile_timeout_s):
            pid = self.partition_of(event.reply.metadata.src_node_id)
            report = None
            if not event.reply.has_error():  # unscreened: checked here (a bad one = failed)
                report = probe_report(event.reply, pid, event.time - event.flight.dispatched_at)
            reports.append((pid, report))
        # a probe's claimed examples are capped as training claims are (strategies.claims)
        claims = {p: float(r.num_examples) for p, r in reports if r and r.num_examples is not None}
        caps = claim_caps(claims, self.stats_rows, {}, self.claims)
        for pid, report in reports:
            if report is not None and pid in caps and report.num_examples > caps[pid][0]:
                report = replace(report, num_examples=int(caps[pid][0]))
            self.policy.on_probe(pid, report)
            answered += report is not None
        log(
            INFO,
            "[%s] profiled %d of %d clients in %.1f simulated s",
            type(self).__name__,
            answered,
            len(pids),
            grid.now - t0,
        )

    def _heartbeat(self, grid, rnd: int, pids: list[int]) -> set[int]:
        """The clients among `pids` that answer a heartbeat within `heartbeat_timeout_s`;
        the others are reported to the policy as failed probes."""
        if not pids:
            return set()
        content = RecordDict({"config": ConfigRecord({"server-round": rnd})})
        msgs = [
            Message(content, dst_node_id=self.partition_nodes[p], message_type=HEARTBEAT)
            for p in pids
        ]
        alive = set()
        for reply in grid.send_and_receive(msgs, timeout=self.heartbeat_timeout_s):
            pid = self.partition_of(reply.metadata.src_node_id)
            if reply.has_error():
                self.policy.on_probe(pid, None)
            else:
                alive.add(pid)
        return alive
