"""Tiered heterogeneous scheduling: clients grouped by measured speed, per-tier work and
windows, heartbeats, standby replacement, and staleness-discounted late updates.

A synchronous round waits for its slowest client; dropping stragglers throws their data away.
Here no tier waits for another:

1. **Profiling.** Before round 1 every node gets a probe (a `query.probe` message: the model,
   `probe_steps` local steps, the model back). Its round-trip time and the client's own
   compute time seed a `ProfileBook` (seconds per step, transfer seconds, reliability), which
   every later reply and failure updates (EMA). The probe stops waiting after
   `profile_timeout_s` (3 s): an offline node is only reported `detect_s` (30 s) later, and
   waiting for it kept every client idle for that long (credit: round 1 began at ~31 s, while
   FedAsync reaches its target at 28-57 s). A client that did not answer in time is treated
   as unmeasured (slowest tier, `min_steps`) until its first training reply measures it.
2. **Tiers.** Each round the live clients are split into `num_tiers` equal-size tiers by
   predicted duration of a full round of local work (TiFL's grouping); unmeasured clients go
   to the slowest tier until measured. Tiers are recomputed every round.
3. **Round length and windows.** The round lasts `round_s` simulated seconds, or (auto) the
   `round_quantile` of the fastest tier's predicted full-work time x `round_slack`. Tier t
   gets a window of p_t rounds, the fewest that fit its `round_quantile` client's full work
   (at most `max_periods`), so slow tiers upload every p_t rounds while fast tiers upload
   every round: uploads are spread over time and nobody blocks anybody.
4. **Per-tier work.** A client's local steps fill its tier's window: full work if it fits,
   fewer steps (at least `min_steps`) otherwise; a client whose transfer alone overruns the
   longest window is not scheduled (logged).
5. **Liveness and standby.** A heartbeat QUERY (`heartbeat_timeout_s`) before each round's
   dispatch skips nodes that do not answer. A client seen within `heartbeat_max_age_s` (its
   update landed, or it answered a heartbeat) is live without one: the heartbeats wait for
   their slowest answer (a 0.3 s-latency link: 0.6 s of a 1.2 s round on credit's network
   profile), and every fast client sat idle for that wait each round. A client that went
   offline since it was seen costs its slot one window, then a standby takes it. Silence is
   remembered as long: a client that did not answer a heartbeat is neither asked again nor
   scheduled for `heartbeat_max_age_s` (an offline node otherwise held every round for the
   whole `heartbeat_timeout_s`: credit, network profile, seed 1: 1.0 s of each 1.26 s
   round). A resume on the wall clock forgets who was seen or silent (the downtime is not on
   the clock). Each tier owns a
   share of `clients_per_round` concurrent slots (at least one per tier). When a client fails
   or misses its window, a standby from the same tier takes the slot at once, with work sized
   to the time left.
6. **Aggregation.** A round aggregates every update that landed during it: on-time ones and
   updates from slower tiers dispatched p_t rounds earlier, as *updates* relative to the
   model each client started from, weighted n_k x s(staleness) (FedAsync's polynomial
   discount). Updates that missed their window are folded in the same way when they land
   (`late_policy: fold`) or ignored (`drop`).

The schedule is `TieredPolicy`, a pure state machine over the scheduler core's events
(strategies/scheduler.py); `TieredScheduling` adds the aggregation rule.

Ideas from TiFL (Chai et al., HPDC 2020: tiers by profiled latency), FedAT (Chai et al., SC
2021: asynchronous tiers, staleness-aware merge) and FedBuff (Nguyen et al., AISTATS 2022:
aggregating stale updates as deltas). Only observations a real server has are used: dispatch
and arrival times on the clock, failures, and what clients report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common import log

from fedapp.core import seeds
from strategies.base import layers, num_examples, reply_arrays, reply_metrics, to_record
from strategies.scheduler import (
    Cancel,
    Decision,
    EventDrivenStrategy,
    Landed,
    Policy,
    Report,
    RoundClose,
    Send,
)
from strategies.scheduling import (
    ProfileBook,
    allocate_slots,
    apply_updates,
    full_steps,
    staleness_discount,
    steps_for_window,
)


@dataclass
class Slot:
    """One client's training in flight."""

    pid: int
    tier: int
    round: int  # the round it was dispatched in (its model's version)
    steps: int
    window_end: float  # time by which its update is due
    missed: bool = False  # its window passed; a standby took the slot


@dataclass
class _Round:
    """The current round's plan and what happened in it so far."""

    rnd: int
    alive: set[int]
    members: dict[int, list[int]]
    periods: dict[int, int]
    length: float
    round_end: float
    sizes: list[int]
    slots: list[int]
    due: list[int] = field(default_factory=list)
    landed: list[Landed] = field(default_factory=list)
    replaced: list[list[int]] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    salt: int = 10_000
    ended: bool = False
    restarted: bool = False  # re-planned from its dispatch time (see open_round)


@dataclass(frozen=True)
class TieredParams:
    num_tiers: int = 3
    round_s: float = 0.0
    round_quantile: float = 0.9
    round_slack: float = 1.1
    max_periods: int = 50
    min_steps: int = 2
    late_policy: str = "fold"
    profile_timeout_s: float = 3.0
    heartbeat_max_age_s: float = 10.0

    def __post_init__(self) -> None:
        if self.late_policy not in ("fold", "drop"):
            raise ValueError(f"late_policy must be 'fold' or 'drop', got {self.late_policy!r}")
        if not (self.heartbeat_max_age_s >= 0 and math.isfinite(self.heartbeat_max_age_s)):
            raise ValueError(
                f"heartbeat_max_age_s must be finite and >= 0, got {self.heartbeat_max_age_s}"
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A checkpoint written before heartbeat_max_age_s heartbeated every idle client every
        # round: its resumed run keeps that design (0), so it ends where it would have
        if "heartbeat_max_age_s" not in state:
            log(
                WARNING,
                "[tiered] this checkpoint predates heartbeat_max_age_s: the resumed run "
                "heartbeats every idle client every round, as it did (its config shows the "
                "new default)",
            )
        for k, v in {"heartbeat_max_age_s": 0.0, **state}.items():
            object.__setattr__(self, k, v)


class TieredPolicy(Policy):
    """The schedule of the module docstring, over `clients` (partition ids), with at most
    `k` trainings in flight per round's slots, for the run's training `config`."""

    probes = True
    heartbeats = True

    def __init__(
        self,
        params: TieredParams,
        clients: list[int],
        k: int,
        seed: int,
        config: dict[str, Any],
        ema: float = 0.5,
    ) -> None:
        super().__init__()
        self.p = params
        self.clients = sorted(clients)
        self.k = int(k)
        self.seed = int(seed)
        self.config = dict(config)
        self.book = ProfileBook(ema=float(ema))
        self.examples: dict[int, int] = {}
        self.inflight: dict[int, Slot] = {}  # ticket -> slot
        self.cur: _Round | None = None
        self.last_seen: dict[int, float] = {}  # pid -> when its update or heartbeat landed
        self.silent_at: dict[int, float] = {}  # pid -> when it last left a heartbeat unanswered

    def __setstate__(self, state: dict[str, Any]) -> None:
        # checkpoints from before last_seen and silent_at
        self.__dict__.update({"last_seen": {}, "silent_at": {}, **state})

    # -- what the server learns ----------------------------------------------------------------
    def on_probe(self, partition_id: int, report: Report | None) -> None:
        if report is None:
            self.book.fail(partition_id)
            self.last_seen.pop(partition_id, None)
            return
        if report.num_examples is not None:
            self.examples[partition_id] = report.num_examples
        self.book.observe(
            partition_id, report.duration_s, report.train_steps or 0.0, report.train_time_s
        )

    def idle(self) -> list[int]:
        busy = {s.pid for s in self.inflight.values()}
        return sorted(set(self.clients) - busy)

    def _recent(self, stamps: dict[int, float], pid: int, now: float) -> bool:
        """Whether `pid`'s stamp (seen, or silent) is within `heartbeat_max_age_s` (never at 0)."""
        at = stamps.get(pid)
        age = self.p.heartbeat_max_age_s
        return age > 0 and at is not None and now - at <= age

    def _fresh(self, pid: int, now: float) -> bool:
        return self._recent(self.last_seen, pid, now)

    def _silent(self, pid: int, now: float) -> bool:
        return self._recent(self.silent_at, pid, now)

    def heartbeat_targets(self, now: float) -> list[int]:
        """Idle clients neither seen nor silent within `heartbeat_max_age_s` (all idle ones
        at 0)."""
        return [p for p in self.idle() if not self._fresh(p, now) and not self._silent(p, now)]

    def presumed_alive(self, now: float) -> set[int]:
        """Idle clients seen within `heartbeat_max_age_s`: live without a heartbeat."""
        return {p for p in self.idle() if self._fresh(p, now)}

    def resumed(self, virtual: bool) -> None:
        # the wall clock restarts at the checkpoint's time: how long the server was down is
        # unknown, so nobody counts as seen recently
        if not virtual:
            self.last_seen.clear()
            self.silent_at.clear()

    # -- planning ------------------------------------------------------------------------------
    def full_steps(self, pid: int) -> int:
        return full_steps(self.examples.get(pid), self.config)

    def round_length(self, tiers: dict[int, int], pred: dict[int, float]) -> float:
        if self.p.round_s > 0:
            return self.p.round_s
        fast = [pred[p] for p, t in tiers.items() if t == 0 and math.isfinite(pred[p])]
        if not fast:
            return self.p.profile_timeout_s
        return float(np.quantile(fast, self.p.round_quantile)) * self.p.round_slack

    def periods(
        self, tiers: dict[int, int], pred: dict[int, float], length: float
    ) -> dict[int, int]:
        out = {}
        for t in set(tiers.values()):
            times = [pred[p] for p, tt in tiers.items() if tt == t and math.isfinite(pred[p])]
            need = (
                float(np.quantile(times, self.p.round_quantile))
                if times
                else length * self.p.max_periods
            )
            out[t] = int(min(max(math.ceil(need / length - 1e-9), 1), self.p.max_periods))
        return out

    def steps(self, pid: int, window_s: float) -> int:
        full = self.full_steps(pid)
        rec = self.book.clients.get(pid)
        if rec is None or rec.step_time_s is None or rec.transfer_s is None:
            # unmeasured: the minimum, and we learn its speed
            return max(min(full, self.p.min_steps), 1)
        return steps_for_window(window_s, rec.transfer_s, rec.step_time_s, self.p.min_steps, full)

    def pick(self, members: list[int], busy: set[int], rnd: int, salt: int) -> list[int]:
        """Idle members of a tier, least-used first (fairness), seeded tie-break."""
        rng = seeds.rng("tiered.pick", self.seed, rnd, salt)
        idle = [p for p in members if p not in busy]
        keys = rng.random(len(idle))
        uses = [self.book.record(p).participations for p in idle]
        return [p for _, _, p in sorted(zip(uses, keys, idle, strict=True))]

    def dispatch(self, tier: int, window_end: float, salt: int, now: float) -> Send | None:
        """Work for the first suitable idle, live member of `tier`, or None."""
        cur = self.cur
        busy = {s.pid for s in self.inflight.values()}
        for pid in self.pick(cur.members[tier], busy, cur.rnd, salt):
            if pid not in cur.alive:
                continue
            steps = self.steps(pid, window_end - now)
            if steps <= 0:
                cur.skipped.append(pid)
                continue
            ticket = self.new_ticket()
            self.inflight[ticket] = Slot(pid, tier, cur.rnd, steps, window_end)
            self.book.record(pid).participations += 1
            return Send(ticket, pid, cur.rnd, steps)
        return None

    def standby(self, slot: Slot, window_end: float, now: float) -> list[Decision]:
        """A client of the same tier takes a failed or late client's slot."""
        self.cur.salt += 1
        send = self.dispatch(slot.tier, window_end, self.cur.salt, now)
        self.cur.replaced.append([slot.pid, send.partition_id if send is not None else -1])
        return [send] if send is not None else []

    # -- events --------------------------------------------------------------------------------
    def open_round(
        self, rnd: int, started: float, now: float, alive: set[int] | None
    ) -> list[Decision]:
        busy = {s.pid for s in self.inflight.values()}
        answered = set(alive or set())  # this round's heartbeat (stamped when the last came back)
        asked = set(self.heartbeat_targets(started))
        presumed = self.presumed_alive(started)
        for pid in answered:
            self.last_seen[pid] = now
            self.silent_at.pop(pid, None)
        if alive is not None:
            for pid in asked - answered:
                self.silent_at[pid] = now
        alive = answered | presumed | busy
        tiers, pred = self.book.tiers(alive, self.p.num_tiers, self.full_steps)
        length = self.round_length(tiers, pred)
        sends = self._plan(rnd, alive, tiers, pred, started, length, now)
        if sends or self.inflight or not alive:
            return sends
        # Nobody's minimum work fits what is left of the planned round after the heartbeats
        # (a fast wall clock where the heartbeats' overhead is a large part of a short round):
        # an empty round would learn nothing, so the round starts now and lasts long enough
        # for the quickest live client's minimum work.
        need = min(
            (
                self.book.predict(p, self.p.min_steps) or math.inf
                for p in alive
                if self.book.known(p)
            ),
            default=math.inf,
        )
        if not math.isfinite(need):
            return sends
        longer = max(length, need * self.p.round_slack)
        log(
            WARNING,
            "[tiered] round %d: no client's minimum work fits the %.2fs left after the "
            "heartbeats; the round restarts now with %.2fs",
            rnd,
            max(started + length - now, 0.0),
            longer,
        )
        sends = self._plan(rnd, alive, tiers, pred, now, longer, now)
        self.cur.restarted = True
        return sends

    def _plan(
        self,
        rnd: int,
        alive: set[int],
        tiers: dict[int, int],
        pred: dict[int, float],
        started: float,
        length: float,
        now: float,
    ) -> list[Decision]:
        """The round's tiers, windows and first sends for a round of `length` from `started`."""
        periods = self.periods(tiers, pred, length)
        t = self.p.num_tiers
        members = {i: sorted(p for p, tt in tiers.items() if tt == i) for i in range(t)}
        sizes = [len(members[i]) for i in range(t)]
        slots = allocate_slots(sizes, self.k)
        cur = self.cur = _Round(
            rnd, alive, members, periods, length, started + length, sizes, slots
        )
        sends: list[Decision] = []
        for tier in range(t):  # fill the free slots of every tier
            used = sum(1 for s in self.inflight.values() if s.tier == tier and not s.missed)
            for i in range(max(slots[tier] - used, 0)):
                window_end = started + periods.get(tier, 1) * length
                send = self.dispatch(tier, window_end, 1000 * tier + i, now)
                if send is not None:
                    sends.append(send)
        cur.due = sorted(
            s.pid
            for s in self.inflight.values()
            if not s.missed and s.window_end <= cur.round_end + 1e-9
        )
        return sends

    def on_reply(self, ticket: int, now: float, report: Report | None) -> list[Decision]:
        slot = self.inflight.pop(ticket, None)
        if slot is None:
            return []
        landed = Landed(
            ticket,
            slot.pid,
            slot.round,
            {
                "tier": slot.tier,
                "staleness": self.cur.rnd - slot.round,
                "steps_assigned": slot.steps,
            },
        )
        if report is None:  # failed: a standby of the same tier takes the rest of its window
            self.book.fail(slot.pid)
            self.last_seen.pop(slot.pid, None)
            self.cur.landed.append(landed)
            if not slot.missed and now < slot.window_end:
                return self.standby(slot, slot.window_end, now)
            return []
        if report.num_examples is not None:
            self.examples[slot.pid] = report.num_examples
        self.book.observe(
            slot.pid, report.duration_s, report.train_steps or 0.0, report.train_time_s
        )
        self.last_seen[slot.pid] = now
        self.silent_at.pop(slot.pid, None)
        if not (slot.missed and self.p.late_policy == "drop"):
            self.cur.landed.append(landed)
        return []

    def wake_at(self) -> float:
        """The round's end, or the first window that ends before it."""
        cur = self.cur
        watch = [
            s.window_end
            for s in self.inflight.values()
            if not s.missed and s.window_end < cur.round_end
        ]
        return min([cur.round_end, *watch])

    def on_timer(self, now: float) -> list[Decision]:
        """Windows that ended without an update: standbys for the rest of the round."""
        cur = self.cur
        out: list[Decision] = []
        for ticket, slot in list(self.inflight.items()):
            if not slot.missed and slot.window_end <= now + 1e-9 and now < cur.round_end:
                slot.missed = True
                self.book.fail(slot.pid)
                self.last_seen.pop(slot.pid, None)
                if self.p.late_policy == "drop":
                    out.append(Cancel(ticket))
                    del self.inflight[ticket]
                period = cur.periods.get(slot.tier, 1)
                out.extend(self.standby(slot, now + period * cur.length, now))
        if now >= cur.round_end - 1e-9:
            cur.ended = True
        return out

    def round_over(self, now: float) -> bool:
        return self.cur.ended

    def close_round(self, rnd: int) -> RoundClose:
        cur = self.cur
        # stop tracking what can no longer be folded in
        cancel = [
            ticket
            for ticket, slot in self.inflight.items()
            if rnd - slot.round >= self.p.max_periods + 1
        ]
        for ticket in cancel:
            del self.inflight[ticket]
        t = self.p.num_tiers
        schedule = {
            "round_s": cur.length,
            "tier_sizes": cur.sizes,
            "tier_slots": cur.slots,
            "tier_periods": [cur.periods.get(i, 0) for i in range(t)],
            "alive": len(cur.alive),
            "replaced": cur.replaced,
            "not_scheduled_too_slow": sorted(set(cur.skipped)),
            "restarted": cur.restarted,
            "late_folded": sorted(x.partition_id for x in cur.landed if x.dispatched_round < rnd),
        }
        return RoundClose(cur.landed, cur.due, schedule, cancel)


class TieredScheduling(EventDrivenStrategy):
    """See the module docstring. `conf/strategy/tiered.yaml` documents every knob."""

    def __init__(
        self,
        *,
        num_tiers: int = 3,
        round_s: float = 0.0,
        round_quantile: float = 0.9,
        round_slack: float = 1.1,
        max_periods: int = 50,
        min_steps: int = 2,
        probe_steps: int = 5,
        profile_timeout_s: float = 3.0,
        heartbeat_timeout_s: float = 1.0,
        heartbeat_max_age_s: float = 10.0,
        late_policy: str = "fold",
        staleness: str = "polynomial",
        staleness_a: float = 0.5,
        ema: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        staleness_discount(0, staleness, staleness_a)  # validates the kind
        self.params = TieredParams(
            int(num_tiers),
            float(round_s),
            float(round_quantile),
            float(round_slack),
            int(max_periods),
            int(min_steps),
            late_policy,
            float(profile_timeout_s),
            float(heartbeat_max_age_s),
        )
        self.probe_steps = int(probe_steps)
        self.profile_timeout_s = float(profile_timeout_s)
        self.heartbeat_timeout_s = float(heartbeat_timeout_s)
        self.staleness = staleness
        self.staleness_a = float(staleness_a)
        self.ema = float(ema)

    def make_policy(self, train_config: ConfigRecord, timeout: float) -> TieredPolicy:
        k = min(int(self.min_train_nodes), len(self.partition_nodes))
        self._models: dict[int, list[np.ndarray]] | None = None  # global model after each round
        return TieredPolicy(
            self.params, list(self.partition_nodes), k, self.seed, dict(train_config), self.ema
        )

    def fold_round(
        self, rnd: int, arrays: ArrayRecord, close: RoundClose, replies: dict[int, Message]
    ) -> ArrayRecord | None:
        """Every update that landed this round, as an update relative to the model its client
        started from, weighted n_k x s(staleness)."""
        if self._models is None:
            self._models = {rnd - 1: layers(arrays)}
        models = self._models
        landed = [(replies[x.ticket], x) for x in close.landed]
        rec = self.round_log(rnd)
        accepted = self.screen_replies(rnd, [m for m, _ in landed], "train")
        for client, (_, x) in zip(
            [c for c in rec.clients if c.phase == "train"], landed, strict=True
        ):
            client.details.update(x.details)
        rec.num_replies = len(accepted)
        rec.num_failures = len(landed) - len(accepted)
        new = None
        if len(accepted) < self.min_replies:
            log(
                WARNING,
                "round %d: %d updates < min_replies=%d; keeping the model",
                rnd,
                len(accepted),
                self.min_replies,
            )
        else:
            new = self._apply(rnd, arrays, accepted, {id(m): x for m, x in landed}, rec)
        models[rnd] = layers(new if new is not None else arrays)  # base of round rnd+1's clients
        for old in [r for r in models if r < rnd - self.params.max_periods - 2]:
            del models[old]
        return new

    def _apply(self, rnd, arrays, accepted, landed_of, rec) -> ArrayRecord | None:
        models = self._models
        stale = [rnd - landed_of[id(m)].dispatched_round for m in accepted]
        weights = [
            num_examples(m) * staleness_discount(s, self.staleness, self.staleness_a)
            for m, s in zip(accepted, stale, strict=True)
        ]
        # a client dispatched in round r started from the model that ended round r-1
        bases = [
            models.get(landed_of[id(m)].dispatched_round - 1, models[max(models)]) for m in accepted
        ]
        clients = [layers(reply_arrays(m)) for m in accepted]
        new = apply_updates(layers(arrays), bases, clients, weights)
        total = float(sum(weights))
        self.set_weights(rec, accepted, [w / total for w in weights])
        out = self.finite_or_none(rnd, to_record(arrays.keys(), new))
        rec.aggregated = out is not None
        if all("train_loss" in reply_metrics(m) for m in accepted):
            losses = [reply_metrics(m)["train_loss"] for m in accepted]
            rec.train_metrics = {"train_loss": float(np.average(losses, weights=weights))}
        return out
