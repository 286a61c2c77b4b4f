"""Tiered heterogeneous scheduling: clients grouped by measured speed, per-tier work and
windows, heartbeats, standby replacement, and staleness-discounted late updates.

A synchronous round waits for its slowest client; dropping stragglers throws their data away.
Here no tier waits for another:

1. **Profiling.** Before round 1 every node gets a probe (`fedapp-action=probe`: the model,
   `probe_steps` local steps, the model back). Its round-trip time and the client's own
   compute time seed a `ProfileBook` (seconds per step, transfer seconds, reliability), which
   every later reply and failure updates (EMA).
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
   dispatch skips nodes that do not answer. Each tier owns a share of `clients_per_round`
   concurrent slots (at least one per tier). When a client fails or misses its window, a
   standby from the same tier takes the slot at once, with work sized to the time left.
6. **Aggregation.** A round aggregates every update that landed during it: on-time ones and
   updates from slower tiers dispatched p_t rounds earlier, as *updates* relative to the
   model each client started from, weighted n_k x s(staleness) (FedAsync's polynomial
   discount). Updates that missed their window are folded in the same way when they land
   (`late_policy: fold`) or ignored (`drop`).

Ideas from TiFL (Chai et al., HPDC 2020: tiers by profiled latency), FedAT (Chai et al., SC
2021: asynchronous tiers, staleness-aware merge) and FedBuff (Nguyen et al., AISTATS 2022:
aggregating stale updates as deltas). Only observations a real server has are used: dispatch
and arrival times on the clock, failures, and what clients report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from omegaconf import DictConfig

from strategies.base import FedappStrategyMixin, num_examples, reply_arrays, reply_metrics
from strategies.scheduling import (
    ProfileBook,
    allocate_slots,
    apply_updates,
    assign_tiers,
    staleness_discount,
    steps_for_window,
)


def probe_clients(
    strategy: Any,
    grid: Grid,
    arrays: ArrayRecord,
    config: ConfigRecord,
    probe_steps: int,
    timeout_s: float,
) -> None:
    """Profile every node once (model down, `probe_steps` local steps, model up) into
    `strategy.book` and record each client's `num-examples` in `strategy._examples`."""
    cfg = ConfigRecord({**dict(config), "fedapp-action": "probe", "probe-steps": probe_steps})
    content = RecordDict({"arrays": arrays, "config": cfg})
    t0 = grid.now
    pids = sorted(strategy.partition_nodes)
    msgs = [
        Message(
            content=content, message_type=MessageType.QUERY, dst_node_id=strategy.partition_nodes[p]
        )
        for p in pids
    ]
    answered = 0
    for reply in grid.send_and_receive(msgs, timeout=timeout_s):
        pid = strategy.partition_of(reply.metadata.src_node_id)
        sent, arrived = grid.timing(reply)
        if reply.has_error():
            strategy.book.fail(pid)
            continue
        m = reply_metrics(reply)
        strategy._examples[pid] = int(m["num-examples"])
        strategy.book.observe(
            pid, arrived - sent, float(m["train_steps"]), float(m["train_time_s"])
        )
        answered += 1
    log(
        INFO,
        "[%s] profiled %d of %d clients in %.1f simulated s",
        type(strategy).__name__,
        answered,
        len(pids),
        grid.now - t0,
    )


def full_steps(examples: int | None, config: ConfigRecord) -> int:
    """Local steps of one full round of work for a client with `examples` training rows."""
    batch = max(int(config.get("batch-size", 32)), 1)
    epochs = max(int(config.get("local-epochs", 1)), 1)
    steps = math.ceil(examples / batch) * epochs if examples else epochs
    cap = int(config.get("max-steps", 0))
    return max(min(steps, cap) if cap > 0 else steps, 1)


@dataclass
class Slot:
    """One client's training in flight."""

    pid: int
    tier: int
    round: int  # the round it was dispatched in (its model's version)
    steps: int
    window_end: float  # simulated time by which its update is due
    missed: bool = False  # its window passed; a standby took the slot


@dataclass
class _RoundPlan:
    """What dispatching needs to know about the current round."""

    rnd: int
    alive: set[int]
    members: dict[int, list[int]]
    skipped: list[int]
    config: dict[str, Any]
    arrays: ArrayRecord
    rlog: Any


class TieredScheduling(FedappStrategyMixin, FedAvg):
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
        profile_timeout_s: float = 600.0,
        heartbeat_timeout_s: float = 1.0,
        late_policy: str = "fold",
        staleness: str = "polynomial",
        staleness_a: float = 0.5,
        ema: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if late_policy not in ("fold", "drop"):
            raise ValueError(f"late_policy must be 'fold' or 'drop', got {late_policy!r}")
        staleness_discount(0, staleness, staleness_a)  # validates the kind
        self.num_tiers = int(num_tiers)
        self.round_s = float(round_s)
        self.round_quantile = float(round_quantile)
        self.round_slack = float(round_slack)
        self.max_periods = int(max_periods)
        self.min_steps = int(min_steps)
        self.probe_steps = int(probe_steps)
        self.profile_timeout_s = float(profile_timeout_s)
        self.heartbeat_timeout_s = float(heartbeat_timeout_s)
        self.late_policy = late_policy
        self.staleness = staleness
        self.staleness_a = float(staleness_a)
        self.book = ProfileBook(ema=float(ema))

    @classmethod
    def from_config(cls, cfg: DictConfig, params: dict[str, Any], common: dict[str, Any]):
        return cls(**common, **params)

    # -- helpers ----------------------------------------------------------------------------
    def _full_steps(self, pid: int, config: ConfigRecord) -> int:
        return full_steps(self._examples.get(pid), config)

    def _send(self, grid: Grid, pid: int, content: RecordDict, mtype: str) -> str:
        msg = Message(content=content, message_type=mtype, dst_node_id=self.partition_nodes[pid])
        return grid.submit([msg])[0]

    def _alive(self, grid: Grid, server_round: int, pids: list[int]) -> set[int]:
        """Heartbeat: the clients among `pids` that answer within `heartbeat_timeout_s`."""
        if not pids:
            return set()
        cfg = ConfigRecord({"fedapp-action": "heartbeat", "server-round": server_round})
        msgs = [
            Message(
                RecordDict({"config": cfg}),
                dst_node_id=self.partition_nodes[p],
                message_type=MessageType.QUERY,
            )
            for p in pids
        ]
        alive = set()
        for reply in grid.send_and_receive(msgs, timeout=self.heartbeat_timeout_s):
            pid = self.partition_of(reply.metadata.src_node_id)
            if reply.has_error():
                self.book.fail(pid)
            else:
                alive.add(pid)
        return alive

    def _profile(self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord) -> None:
        probe_clients(self, grid, arrays, config, self.probe_steps, self.profile_timeout_s)

    def _tiers(
        self, candidates: set[int], config: ConfigRecord
    ) -> tuple[dict[int, int], dict[int, float]]:
        """Tier of every candidate and its predicted full-work duration (inf if unknown)."""
        pred = {p: self.book.predict(p, self._full_steps(p, config)) for p in candidates}
        known = {p: v for p, v in pred.items() if v is not None}
        tiers = assign_tiers(known, self.num_tiers)
        slowest = max(tiers.values(), default=0)
        for p in candidates - set(known):  # unmeasured: slowest tier until measured
            tiers[p] = min(self.num_tiers - 1, slowest if known else 0)
        return tiers, {p: (v if v is not None else math.inf) for p, v in pred.items()}

    def _round_length(self, tiers: dict[int, int], pred: dict[int, float]) -> float:
        if self.round_s > 0:
            return self.round_s
        fast = [pred[p] for p, t in tiers.items() if t == 0 and math.isfinite(pred[p])]
        if not fast:
            return self.profile_timeout_s
        return float(np.quantile(fast, self.round_quantile)) * self.round_slack

    def _periods(
        self, tiers: dict[int, int], pred: dict[int, float], length: float
    ) -> dict[int, int]:
        out = {}
        for t in set(tiers.values()):
            times = [pred[p] for p, tt in tiers.items() if tt == t and math.isfinite(pred[p])]
            need = (
                float(np.quantile(times, self.round_quantile))
                if times
                else length * self.max_periods
            )
            out[t] = int(min(max(math.ceil(need / length - 1e-9), 1), self.max_periods))
        return out

    def _steps(self, pid: int, window_s: float, config: ConfigRecord) -> int:
        full = self._full_steps(pid, config)
        rec = self.book.clients.get(pid)
        if rec is None or rec.step_time_s is None or rec.transfer_s is None:
            return max(
                min(full, self.min_steps), 1
            )  # unmeasured: the minimum, and we learn its speed
        return steps_for_window(window_s, rec.transfer_s, rec.step_time_s, self.min_steps, full)

    def _dispatch(
        self,
        grid: Grid,
        plan: _RoundPlan,
        inflight: dict[str, Slot],
        train_config: ConfigRecord,
        tier: int,
        window_end: float,
        salt: int,
    ) -> int | None:
        """Send work to the first suitable idle, live member of `tier`; its partition id or None."""
        busy = {s.pid for s in inflight.values()}
        for pid in self._pick(plan.members[tier], busy, plan.rnd, salt):
            if pid not in plan.alive:
                continue
            steps = self._steps(pid, window_end - grid.now, train_config)
            if steps <= 0:
                plan.skipped.append(pid)
                continue
            cfg = ConfigRecord({**plan.config, "max-steps": steps})
            content = RecordDict({"arrays": plan.arrays, "config": cfg})
            mid = self._send(grid, pid, content, MessageType.TRAIN)
            inflight[mid] = Slot(pid, tier, plan.rnd, steps, window_end)
            self.book.record(pid).participations += 1
            plan.rlog.bytes_down += plan.arrays.count_bytes()
            return pid
        return None

    def _pick(
        self, tier_members: list[int], busy: set[int], server_round: int, salt: int
    ) -> list[int]:
        """Idle members of a tier, least-used first (fairness), seeded tie-break."""
        rng = np.random.default_rng([self.seed, server_round, salt, 0x7E1])
        idle = [p for p in tier_members if p not in busy]
        keys = rng.random(len(idle))
        return [
            p
            for _, _, p in sorted(
                zip([self.book.record(p).participations for p in idle], keys, idle, strict=True)
            )
        ]

    # -- the loop ---------------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn=None,
    ) -> Result:
        if not hasattr(grid, "submit"):
            raise TypeError(
                f"{type(self).__name__} needs the fedapp clock (fedapp.hetero.ClockGrid) as its grid"
            )
        train_config = train_config or ConfigRecord()
        result = Result()
        arrays = initial_arrays
        self._global_arrays = arrays
        self._examples: dict[int, int] = {}
        if evaluate_fn:
            evaluate_fn(0, arrays)
        self._profile(grid, arrays, train_config)
        k = min(int(self.min_train_nodes), len(self.partition_nodes))
        models: dict[int, list[np.ndarray]] = {0: [a.numpy() for a in arrays.values()]}
        inflight: dict[str, Slot] = {}
        for rnd in range(1, num_rounds + 1):
            if self.over_budget(grid):
                break
            self._round = rnd
            rlog = self.round_log(rnd)
            t_round = grid.now
            busy = {s.pid for s in inflight.values()}
            alive = self._alive(grid, rnd, sorted(set(self.partition_nodes) - busy)) | busy
            tiers, pred = self._tiers(alive, train_config)
            length = self._round_length(tiers, pred)
            periods = self._periods(tiers, pred, length)
            round_end = t_round + length
            members = {
                t: sorted(p for p, tt in tiers.items() if tt == t) for t in range(self.num_tiers)
            }
            slots = allocate_slots([len(members[t]) for t in range(self.num_tiers)], k)
            content_cfg = {**dict(train_config), "server-round": rnd}
            replaced: list[list[int]] = []
            skipped: list[int] = []

            plan = _RoundPlan(rnd, alive, members, skipped, content_cfg, arrays, rlog)

            def dispatch(tier: int, window_end: float, salt: int, plan=plan) -> int | None:
                return self._dispatch(grid, plan, inflight, train_config, tier, window_end, salt)

            # fill free slots of every tier
            for t in range(self.num_tiers):
                used = sum(1 for s in inflight.values() if s.tier == t and not s.missed)
                for i in range(max(slots[t] - used, 0)):
                    dispatch(t, t_round + periods.get(t, 1) * length, salt=1000 * t + i)
            due = sorted(
                s.pid
                for s in inflight.values()
                if not s.missed and s.window_end <= round_end + 1e-9
            )
            landed: list[tuple[Message, Slot]] = []
            salt = 10_000
            while True:
                watch = [
                    s.window_end
                    for s in inflight.values()
                    if not s.missed and s.window_end < round_end
                ]
                until = min([round_end, *watch])
                event = grid.next_event(until=until)
                now = grid.now
                if event is not None:
                    slot = inflight.pop(event.flight.msg_id, None)
                    if slot is None:
                        continue
                    if event.reply.has_error():
                        self.book.fail(slot.pid)
                        landed.append((event.reply, slot))
                        if not slot.missed and now < slot.window_end:  # standby, same tier
                            salt += 1
                            sub = dispatch(slot.tier, slot.window_end, salt)
                            replaced.append([slot.pid, sub if sub is not None else -1])
                        continue
                    m = reply_metrics(event.reply) or {}
                    if "num-examples" in m:
                        self._examples[slot.pid] = int(m["num-examples"])
                    self.book.observe(
                        slot.pid,
                        event.time - event.flight.dispatched_at,
                        float(m.get("train_steps", 0.0)),
                        float(m.get("train_time_s", 0.0)),
                    )
                    if slot.missed and self.late_policy == "drop":
                        continue
                    landed.append((event.reply, slot))
                    continue
                # a window ended without an update: standby for the rest of the round's windows
                for mid, slot in list(inflight.items()):
                    if not slot.missed and slot.window_end <= now + 1e-9 and now < round_end:
                        slot.missed = True
                        self.book.fail(slot.pid)
                        if self.late_policy == "drop":
                            grid.discard([mid])
                            del inflight[mid]
                        salt += 1
                        sub = dispatch(slot.tier, now + periods.get(slot.tier, 1) * length, salt)
                        replaced.append([slot.pid, sub if sub is not None else -1])
                if now >= round_end - 1e-9:
                    break
            # stop tracking what can no longer be folded in
            for mid, slot in list(inflight.items()):
                if rnd - slot.round >= self.max_periods + 1:
                    grid.discard([mid])
                    del inflight[mid]
            rlog.sampled_train = due
            arrays = self._aggregate_round(rnd, arrays, landed, models) or arrays
            self._global_arrays = arrays
            models[rnd] = [a.numpy() for a in arrays.values()]  # base of round rnd+1's clients
            for old in [r for r in models if r < rnd - self.max_periods - 2]:
                del models[old]
            rlog.schedule = {
                "round_s": length,
                "tier_sizes": [len(members[t]) for t in range(self.num_tiers)],
                "tier_slots": slots,
                "tier_periods": [periods.get(t, 0) for t in range(self.num_tiers)],
                "alive": len(alive),
                "replaced": replaced,
                "not_scheduled_too_slow": sorted(set(skipped)),
                "late_folded": sorted(s.pid for _, s in landed if s.round < rnd),
            }
            log(
                INFO,
                "[tiered] round %d: %.1fs, tiers %s, periods %s, %d updates (%d stale), %d replaced",
                rnd,
                length,
                rlog.schedule["tier_sizes"],
                rlog.schedule["tier_periods"],
                rlog.num_replies,
                len(rlog.schedule["late_folded"]),
                len(replaced),
            )
            result.arrays = arrays
            if evaluate_fn:
                evaluate_fn(rnd, arrays)
        grid.discard(list(inflight))
        result.arrays = arrays
        return result

    def _aggregate_round(
        self,
        rnd: int,
        arrays: ArrayRecord,
        landed: list[tuple[Message, Slot]],
        models: dict[int, list[np.ndarray]],
    ) -> ArrayRecord | None:
        rlog = self.round_log(rnd)
        slots_by_node = {}
        for msg, slot in landed:
            slots_by_node.setdefault(msg.metadata.src_node_id, []).append(slot)
        accepted = self.screen_replies(rnd, [m for m, _ in landed], "train")
        for entry in rlog.clients:  # tier, staleness and work of every reply in the log
            slot = next(iter(slots_by_node.get(entry["node_id"], [])), None)
            if slot is not None:
                entry.update(
                    {"tier": slot.tier, "staleness": rnd - slot.round, "steps_assigned": slot.steps}
                )
        rlog.num_replies = len(accepted)
        rlog.num_failures = len(landed) - len(accepted)
        if len(accepted) < self.min_replies:
            log(
                WARNING,
                "round %d: %d updates < min_replies=%d; keeping the model",
                rnd,
                len(accepted),
                self.min_replies,
            )
            return None
        slot_of = {id(m): s for m, s in landed}
        stale = [rnd - slot_of[id(m)].round for m in accepted]
        weights = [
            num_examples(m) * staleness_discount(s, self.staleness, self.staleness_a)
            for m, s in zip(accepted, stale, strict=True)
        ]
        # a client dispatched in round r started from the model that ended round r-1
        bases = [models.get(slot_of[id(m)].round - 1, models[max(models)]) for m in accepted]
        clients = [[a.numpy() for a in reply_arrays(m).values()] for m in accepted]
        new = apply_updates([a.numpy() for a in arrays.values()], bases, clients, weights)
        total = float(sum(weights))
        by_pid = rlog.accepted_entries("train")
        for m, w in zip(accepted, weights, strict=True):
            entry = by_pid.get(self.partition_of(m.metadata.src_node_id))
            if entry is not None:
                entry["weight"] = w / total
        out = self.finite_or_none(
            rnd, ArrayRecord({k: Array(v) for k, v in zip(arrays.keys(), new, strict=True)})
        )
        rlog.aggregated = out is not None
        rlog.train_metrics = (
            {
                "train_loss": float(
                    np.average([reply_metrics(m)["train_loss"] for m in accepted], weights=weights)
                )
            }
            if accepted and all("train_loss" in reply_metrics(m) for m in accepted)
            else {}
        )
        return out
