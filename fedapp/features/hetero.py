"""Device heterogeneity: per-client device profiles and the clock every strategy runs on.

A federation mixes fast data-centre nodes with slow branch-office machines on poor links, and
nodes drop out. This module models that, for every strategy alike:

- **Profiles** (`conf/hetero/*.yaml`, `hetero=<name>`): each client gets a compute speed
  factor, download/upload bandwidth, latency, a probability of being unavailable and a
  probability of crashing mid-training. In simulation they are drawn from the config's
  hardware classes with the run's seed (`assign_profiles`); in deployment a SuperNode states
  its own with `--node-config "speed=0.3 down-mbps=10 ..."` (`profile_from_node_config`).
- **Clock** (`ClockGrid`, wrapping Flower's `Grid`): every strategy talks to the clients
  through it, so every strategy is timed the same way.
  - `clock: virtual` (simulation): no one sleeps. A message's simulated duration is
    latency + model bytes / download bandwidth + compute + latency + bytes / upload bandwidth,
    with compute = local steps x `step_time_s` / speed (`compute: steps`, deterministic, the
    default) or the client's measured training time / speed (`compute: measured`). Replies
    are released in simulated-arrival order and a `timeout` is a simulated deadline.
    Unavailable nodes and mid-training crashes become error replies at the moment the
    SuperLink would notice (`detect_s`, Flower's node heartbeat interval). Federated
    *evaluation* messages are measurement, not training, and cost no simulated time.
  - `clock: real`: the ClientApp itself waits and fails as its profile says
    (`device_emulation_mod`, a Flower mod around the training, probe and heartbeat handlers),
    and simulated time is wall time.
    With `hetero=none` nothing is emulated and `sim_time_s` is plain wall time.

Flower has no notion of simulated time or device profiles; this is the smallest layer that
gives one clock to synchronous strategies (through `send_and_receive`, which Flower's
`Strategy.start` loop calls) and to event-driven ones (FedAsync, tiered scheduling: `submit`,
`next_event`, `now`), while the messages themselves still travel through Flower's Grid.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedapp.core import seeds
from fedapp.core.flower_compat import ErrorCode, set_message_id

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class DeviceProfile:
    """One client's device and link. speed 1.0 = the reference device of `step_time_s`."""

    tier_class: str = "default"
    speed: float = 1.0
    down_mbps: float = math.inf
    up_mbps: float = math.inf
    latency_s: float = 0.0
    p_unavailable: float = 0.0
    p_crash: float = 0.0

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ValueError(f"profile {self.tier_class}: speed must be > 0, got {self.speed}")
        if not (self.down_mbps > 0 and self.up_mbps > 0):
            raise ValueError(f"profile {self.tier_class}: bandwidths must be > 0")
        if self.latency_s < 0:
            raise ValueError(f"profile {self.tier_class}: latency_s must be >= 0")
        for name in ("p_unavailable", "p_crash"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"profile {self.tier_class}: {name} must be in [0, 1]")

    def transfer_s(self, bytes_down: int, bytes_up: int) -> float:
        """Latency both ways plus the payloads over the link (seconds)."""
        return (
            2 * self.latency_s
            + bytes_down / (self.down_mbps * MBIT)
            + bytes_up / (self.up_mbps * MBIT)
        )

    def compute_s(self, steps: float, step_time_s: float) -> float:
        return float(steps) * step_time_s / self.speed


@dataclass(frozen=True)
class HeteroSpec:
    """The `hetero` config group."""

    name: str = "none"
    clock: str = "real"  # real | virtual
    compute: str = "steps"  # steps | measured
    step_time_s: float = 0.05
    detect_s: float = 30.0
    availability_period_s: float = 60.0
    jitter: float = 0.0
    classes: tuple[tuple[str, float, DeviceProfile], ...] = field(default_factory=tuple)

    @property
    def active(self) -> bool:
        return bool(self.classes)

    @property
    def virtual(self) -> bool:
        return self.clock == "virtual"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> HeteroSpec:
        if not cfg:
            return cls()
        clock = str(cfg.get("clock", "real"))
        if clock not in ("real", "virtual"):
            raise ValueError(f"hetero.clock must be 'real' or 'virtual', got {clock!r}")
        compute = str(cfg.get("compute", "steps"))
        if compute not in ("steps", "measured"):
            raise ValueError(f"hetero.compute must be 'steps' or 'measured', got {compute!r}")
        classes = []
        for name, c in (cfg.get("classes") or {}).items():
            c = dict(c)
            share = float(c.pop("share"))
            if share < 0:
                raise ValueError(f"hetero class {name}: share must be >= 0")
            classes.append((str(name), share, DeviceProfile(tier_class=str(name), **c)))
        if classes and sum(s for _, s, _ in classes) <= 0:
            raise ValueError("hetero classes: shares must add up to a positive number")
        if clock == "virtual" and not classes:
            raise ValueError("hetero.clock=virtual needs device classes (or use hetero=none)")
        return cls(
            name=str(cfg.get("name", "custom")),
            clock=clock,
            compute=compute,
            step_time_s=float(cfg.get("step_time_s", 0.05)),
            detect_s=float(cfg.get("detect_s", 30.0)),
            availability_period_s=float(cfg.get("availability_period_s", 60.0)),
            jitter=float(cfg.get("jitter", 0.0)),
            classes=tuple(classes),
        )


def assign_profiles(spec: HeteroSpec, num_clients: int, seed: int) -> list[DeviceProfile]:
    """Profiles of clients 0..num_clients-1: classes in the configured shares (largest
    remainder rounding), shuffled by the seed; speed and bandwidths get a log-normal spread
    of `jitter` around the class values. Same (spec, n, seed) -> same profiles everywhere."""
    if not spec.active:
        return [DeviceProfile() for _ in range(num_clients)]
    shares = np.array([s for _, s, _ in spec.classes], dtype=float)
    exact = shares / shares.sum() * num_clients
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: num_clients - counts.sum()]:
        counts[i] += 1
    labels = np.repeat(np.arange(len(spec.classes)), counts)
    rng = seeds.rng("hetero.profiles", seed)
    rng.shuffle(labels)
    out = []
    for label in labels:
        base = spec.classes[int(label)][2]
        if spec.jitter > 0:
            f = np.exp(rng.normal(0.0, spec.jitter, size=3))
            base = replace(
                base,
                speed=base.speed * f[0],
                down_mbps=base.down_mbps * f[1],
                up_mbps=base.up_mbps * f[2],
            )
        out.append(base)
    return out


NODE_CONFIG_KEYS = {
    "speed": "speed",
    "down-mbps": "down_mbps",
    "up-mbps": "up_mbps",
    "latency-s": "latency_s",
    "p-unavailable": "p_unavailable",
    "p-crash": "p_crash",
}


def profile_from_node_config(
    node_config: Mapping[str, Any], default: DeviceProfile
) -> DeviceProfile:
    """A deployed SuperNode's own profile (`--node-config "speed=0.3 up-mbps=5"`) over `default`."""
    given = {
        attr: float(node_config[k]) for k, attr in NODE_CONFIG_KEYS.items() if k in node_config
    }
    return replace(default, **given) if given else default


def _uniform(*key: int | str) -> float:
    """A reproducible U(0,1) draw for a key (seed, client, slot, ...)."""
    seed, *rest = key
    return float(seeds.rng("hetero.event", int(seed), *rest).random())


def is_unavailable(profile: DeviceProfile, seed: int, pid: int, slot: int) -> bool:
    """Whether client `pid` is offline in availability slot `slot` (a period of time, or a
    round in real-clock mode): independent draws per (seed, client, slot)."""
    return (
        profile.p_unavailable > 0 and _uniform(seed, pid, slot, "offline") < profile.p_unavailable
    )


def crash_point(profile: DeviceProfile, seed: int, pid: int, attempt: int) -> float | None:
    """Fraction of its compute after which the client crashes on this attempt, or None."""
    if profile.p_crash > 0 and _uniform(seed, pid, attempt, "crash") < profile.p_crash:
        return _uniform(seed, pid, attempt, "crash-at")
    return None


def payload_bytes(msg: Message) -> int:
    """Bytes of the arrays a message carries (what dominates transfer time)."""
    if msg.has_error():
        return 0
    return int(sum(r.count_bytes() for r in msg.content.array_records.values()))


# -- client side (real clock) -------------------------------------------------------------------
class NodeUnavailable(RuntimeError):
    """Raised by a ClientApp whose profile says it is offline this round (real clock)."""


class InjectedNodeCrash(RuntimeError):
    """Raised by a ClientApp whose profile says it crashes this round (real clock)."""


def emulate_before_training(
    profile: DeviceProfile, seed: int, pid: int, server_round: int, bytes_down: int
) -> None:
    """Real clock: go offline or wait for the download, as the profile says."""
    if is_unavailable(profile, seed, pid, server_round):
        raise NodeUnavailable(f"client {pid} is offline this round (hetero profile)")
    time.sleep(profile.latency_s + bytes_down / (profile.down_mbps * MBIT))


def emulate_after_training(
    profile: DeviceProfile, seed: int, pid: int, server_round: int, train_s: float, bytes_up: int
) -> None:
    """Real clock: stretch compute to the profile's speed, crash if drawn, wait for upload."""
    compute = train_s / profile.speed
    crash = crash_point(profile, seed, pid, server_round)
    if crash is not None:
        time.sleep(max(compute * crash - train_s, 0.0))
        raise InjectedNodeCrash(f"client {pid} crashed mid-training (hetero profile)")
    time.sleep(
        max(compute - train_s, 0.0) + profile.latency_s + bytes_up / (profile.up_mbps * MBIT)
    )


@lru_cache(maxsize=64)
def _profiles(spec: HeteroSpec, num_partitions: int, seed: int) -> tuple[DeviceProfile, ...]:
    return tuple(assign_profiles(spec, num_partitions, seed))


def real_clock_profile(
    cfg: Mapping[str, Any], num_partitions: int, pid: int, node_config: Mapping[str, Any]
) -> DeviceProfile | None:
    """This node's device profile when it must emulate it itself (real clock), else None.

    Simulation draws it from `hetero` with the run's seed (the server draws the same one);
    a deployed SuperNode may state its own in its node config (`speed=0.3 up-mbps=5 ...`).
    """
    spec = HeteroSpec.from_config(cfg.get("hetero"))
    stated = any(k in node_config for k in NODE_CONFIG_KEYS)
    if spec.virtual or not (spec.active or stated):
        return None
    base = DeviceProfile()
    if spec.active and 0 <= pid < num_partitions:
        base = _profiles(spec, num_partitions, int(cfg["seed"]))[pid]
    return profile_from_node_config(node_config, base)


def device_emulation_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower mod: a real-clock node behaves as its device profile says around the handler.

    Offline nodes refuse every message (heartbeats included); for messages that carry a model
    (training, probes) the node waits for the download, then, after the handler, stretches
    its compute to the profile's speed, crashes if drawn, and waits for the upload."""
    from fedapp.core.node import load_node

    node = load_node(context, with_data=False)
    pid = node.partition_id
    profile = real_clock_profile(node.cfg, node.num_clients, pid, context.node_config)
    if profile is None:
        return call_next(msg, context)
    seed = int(node.cfg.seed)
    config = msg.content.config_records.get("config")
    rnd = int(config.get("server-round", 0)) if config is not None else 0
    if "arrays" not in msg.content.array_records:  # a heartbeat: only availability
        if is_unavailable(profile, seed, pid, rnd):
            raise NodeUnavailable(f"client {pid} is offline this round (hetero profile)")
        return call_next(msg, context)
    size = msg.content["arrays"].count_bytes()
    emulate_before_training(profile, seed, pid, rnd, size)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    metrics = next(iter(reply.content.metric_records.values()), None)
    train_s = float(metrics.get("train_time_s", 0.0)) if metrics is not None else 0.0
    emulate_after_training(profile, seed, pid, rnd, train_s, size)
    return reply


# -- server side: the clock ---------------------------------------------------------------------
@dataclass
class Flight:
    """A message in flight: where it went, when, and (virtual clock) when its reply lands."""

    msg_id: str
    node_id: int
    partition_id: int
    dispatched_at: float
    message_type: str
    arrival: float | None = None  # virtual: simulated arrival time once the reply is known
    reply: Message | None = None
    bytes_down: int = 0
    attempt: int = 0  # how many charged messages this client got before this one


@dataclass
class Event:
    time: float
    flight: Flight
    reply: Message


class ClockGrid(Grid):
    """A Grid in front of Flower's Grid that keeps simulated time (see the module docstring).

    Synchronous strategies keep calling `send_and_receive(messages, timeout)`; event-driven
    strategies use `submit`, `next_event(until)`, `discard` and `now`.
    """

    event_clock = True  # fedapp.core.plugins.is_event_clock

    def __init__(
        self,
        grid: Grid,
        spec: HeteroSpec,
        profiles: Mapping[int, DeviceProfile],
        node_partitions: Mapping[int, int],
        seed: int,
        real_timeout_s: float = 900.0,
    ) -> None:
        self.grid = grid
        self.spec = spec
        self.profiles = dict(profiles)  # by partition id
        self.node_partitions = dict(node_partitions)
        self.seed = int(seed)
        self.real_timeout_s = float(real_timeout_s)
        self.flights: dict[str, Flight] = {}
        self._attempts: dict[int, int] = {}
        self._synthetic = 0
        self._virtual_now = 0.0
        self._t0 = time.monotonic()
        self.bytes_up = 0
        self.bytes_down = 0

    @property
    def virtual(self) -> bool:
        return self.spec.virtual

    def state(self) -> dict:
        """What a checkpoint keeps of the clock, messages in flight included (event-driven
        strategies have them across rounds). On the virtual clock every in-flight reply is
        collected first (its simulated arrival is already fixed), so a resumed run receives
        them exactly when the uninterrupted run would have."""
        if self.virtual:
            self._collect(block=True)
        return {
            "now": self.now,
            "attempts": dict(self._attempts),
            "synthetic": self._synthetic,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "flights": dict(self.flights),
        }

    def restore(self, state: dict) -> None:
        """A resumed run. On the wall clock, replies that had not come back to the dead server
        never will: those messages fail now (as a crashed client's would)."""
        self._virtual_now = float(state["now"])
        self._t0 = time.monotonic() - float(state["now"])
        self._attempts = dict(state["attempts"])
        self._synthetic = int(state["synthetic"])
        self.bytes_up, self.bytes_down = int(state["bytes_up"]), int(state["bytes_down"])
        self.flights = dict(state.get("flights", {}))
        for f in self.flights.values():
            if f.reply is None:
                f.reply = Message(
                    Error(ErrorCode.MESSAGE_UNAVAILABLE, "lost with the server before the resume"),
                    reply_to=_stub(f),
                )
                f.arrival = self.now

    @property
    def now(self) -> float:
        """Seconds since the clock started (simulated or wall, per `hetero.clock`)."""
        return self._virtual_now if self.virtual else time.monotonic() - self._t0

    def advance_to(self, t: float) -> None:
        """Virtual clock: move time forward to `t` (waiting costs simulated time)."""
        if self.virtual:
            self._virtual_now = max(self._virtual_now, float(t))

    # -- Grid API (delegated) -----------------------------------------------------------------
    @property
    def run(self):
        return self.grid.run

    def set_run(self, run_id) -> None:
        self.grid.set_run(run_id)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.submit(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies that have landed by now (simulated or real); non-blocking."""
        wanted = set(message_ids)
        self._collect(block=False)
        out = []
        for mid in list(wanted):
            f = self.flights.get(mid)
            if f is not None and f.reply is not None and (f.arrival or 0.0) <= self.now:
                out.append(self.flights.pop(mid).reply)
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Flower's synchronous round: wait for every reply or until `timeout` (simulated
        seconds on the virtual clock). Replies later than the deadline are dropped, as Flower
        drops them; the round ends at the last reply or at the deadline."""
        return [event.reply for event in self.exchange(messages, timeout=timeout)]

    def exchange(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Event]:
        """`send_and_receive`, returning each reply's event (with its send and arrival times)."""
        ids = list(self.submit(messages))
        deadline = self.now + (timeout if timeout is not None else math.inf)
        events = []
        pending = set(ids)
        while pending:
            event = self.next_event(until=deadline, among=pending)
            if event is None:
                break
            pending.discard(event.flight.msg_id)
            events.append(event)
        self.discard(pending)
        return events

    # -- event API ------------------------------------------------------------------------------
    def submit(self, messages: Iterable[Message]) -> list[str]:
        """Send now; returns message ids. Offline nodes (virtual clock) are never reached:
        their messages come back as NODE_UNAVAILABLE errors `detect_s` later."""
        now = self.now
        ids, to_push = [], []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            pid = self.node_partitions.get(nid, -1)
            charged = self._charged(msg.metadata.message_type)
            if charged:
                self.bytes_down += payload_bytes(msg)
            flight = Flight("", nid, pid, now, msg.metadata.message_type)
            if charged:
                flight.attempt = self._attempts.get(pid, 0)
                self._attempts[pid] = flight.attempt + 1
            if charged and self.virtual and self._offline(pid, now):
                self._synthetic += 1
                flight.msg_id = f"offline-{self._synthetic}"
                flight.reply = Message(
                    Error(ErrorCode.NODE_UNAVAILABLE, f"node of client {pid} is offline"),
                    reply_to=_stub(flight),
                )
                flight.arrival = now + self.spec.detect_s
                self.flights[flight.msg_id] = flight
                ids.append(flight.msg_id)
                continue
            flight.msg_id = "?"
            to_push.append((msg, flight, payload_bytes(msg)))
        if to_push:
            pushed = list(self.grid.push_messages([m for m, _, _ in to_push]))
            for mid, (_, flight, nbytes) in zip(pushed, to_push, strict=True):
                flight.msg_id = mid
                flight.bytes_down = nbytes
                self.flights[mid] = flight
                ids.append(mid)
        return ids

    def discard(self, message_ids: Iterable[str]) -> None:
        """Stop waiting for these messages (late replies are ignored, as in Flower)."""
        for mid in list(message_ids):
            self.flights.pop(mid, None)

    def in_flight(self) -> list[Flight]:
        return list(self.flights.values())

    def _deliver(self, flight: Flight, at: float) -> Event:
        del self.flights[flight.msg_id]
        return Event(at, flight, flight.reply)

    def next_event(self, until: float = math.inf, among: set[str] | None = None) -> Event | None:
        """The earliest reply (or failure) landing no later than `until`; time moves to it.

        With nothing landing by `until`, time moves to `until` (virtual clock; the real clock
        has waited that long) and None is returned."""
        while True:
            self._collect(block=self.virtual)
            ready = [
                f
                for f in self.flights.values()
                if f.reply is not None and (among is None or f.msg_id in among)
            ]
            if self.virtual:
                if ready:
                    first = min(ready, key=lambda f: (f.arrival, f.partition_id, f.msg_id))
                    if first.arrival <= until:
                        self.advance_to(first.arrival)
                        return self._deliver(first, first.arrival)
                if math.isfinite(until):
                    self.advance_to(until)
                return None
            if ready:
                first = min(ready, key=lambda f: (f.arrival, f.partition_id))
                return self._deliver(first, first.arrival)
            if self.now >= until:
                return None
            waiting = [f for f in self.flights.values() if among is None or f.msg_id in among]
            if not waiting:  # nothing can land: wait out the time, as the virtual clock skips it
                if math.isfinite(until):
                    time.sleep(max(until - self.now, 0.0))
                return None
            time.sleep(0.02)

    # -- internals ------------------------------------------------------------------------------
    def _charged(self, message_type: str) -> bool:
        """Training and queries (probes, heartbeats, statistics) cost simulated time;
        federated evaluation is measurement and does not."""
        return message_type.split(".")[0] in (MessageType.TRAIN, MessageType.QUERY)

    def _offline(self, pid: int, t: float) -> bool:
        prof = self.profiles.get(pid)
        if prof is None:
            return False
        slot = int(t // self.spec.availability_period_s)
        return is_unavailable(prof, self.seed, pid, slot)

    def _collect(self, block: bool) -> None:
        """Pull the replies of pushed messages from Flower's Grid. Virtual clock: wait for
        all of them (their simulated arrival decides the order, so every reply must be in)."""
        started = time.monotonic()
        while True:
            missing = [f.msg_id for f in self.flights.values() if f.reply is None]
            if not missing:
                return
            for reply in self.grid.pull_messages(missing):
                flight = self.flights.get(reply.metadata.reply_to_message_id)
                if flight is not None:
                    self._land(flight, reply)
            if not self.virtual:  # wall clock: no message is waited for longer than the limit
                for f in self.flights.values():
                    if f.reply is None and self.now - f.dispatched_at > self.real_timeout_s:
                        f.reply = Message(
                            Error(ErrorCode.MESSAGE_UNAVAILABLE, "no reply within round_timeout_s"),
                            reply_to=_stub(f),
                        )
                        f.arrival = self.now
            if not block or all(f.reply is not None for f in self.flights.values()):
                return
            if time.monotonic() - started > self.real_timeout_s:
                for f in self.flights.values():
                    if f.reply is None:
                        f.reply = Message(
                            Error(ErrorCode.MESSAGE_UNAVAILABLE, "no reply within round_timeout_s"),
                            reply_to=_stub(f),
                        )
                        f.arrival = self.now + self.spec.detect_s
                return
            time.sleep(0.02)

    def _land(self, flight: Flight, reply: Message) -> None:
        """A reply came back from Flower: stamp its (simulated) arrival time."""
        charged = self._charged(flight.message_type)
        if charged and not reply.has_error():
            self.bytes_up += payload_bytes(reply)
        if not self.virtual:
            flight.reply, flight.arrival = reply, self.now
            return
        if not charged:
            flight.reply, flight.arrival = reply, flight.dispatched_at
            return
        prof = self.profiles.get(flight.partition_id, DeviceProfile())
        down = prof.latency_s + flight.bytes_down / (prof.down_mbps * MBIT)
        if reply.has_error():  # a real failure in the ClientApp: noticed like a crash
            flight.reply, flight.arrival = reply, flight.dispatched_at + down + self.spec.detect_s
            return
        metrics = next(iter(reply.content.metric_records.values()), None)
        compute = 0.0
        if metrics is not None and "train_steps" in metrics:
            if self.spec.compute == "measured":
                compute = float(metrics.get("train_time_s", 0.0)) / prof.speed
            else:
                compute = prof.compute_s(float(metrics["train_steps"]), self.spec.step_time_s)
            # The simulated device measures its own (simulated) compute time.
            metrics["train_time_s"] = compute
        attempt = flight.attempt
        crash = crash_point(prof, self.seed, flight.partition_id, attempt) if compute > 0 else None
        if crash is not None:
            flight.reply = Message(
                Error(
                    ErrorCode.CLIENT_APP_CRASHED,
                    f"client {flight.partition_id} crashed mid-training",
                ),
                reply_to=_stub(flight),
            )
            flight.arrival = flight.dispatched_at + down + crash * compute + self.spec.detect_s
            return
        up = prof.latency_s + payload_bytes(reply) / (prof.up_mbps * MBIT)
        flight.reply, flight.arrival = reply, flight.dispatched_at + down + compute + up


def _stub(flight: Flight) -> Message:
    """A stand-in for the message a synthetic error replies to."""
    msg = Message(RecordDict(), dst_node_id=flight.node_id, message_type=flight.message_type)
    set_message_id(msg, flight.msg_id)
    return msg
