"""`clock: virtual`: the event clock every strategy talks to the clients through (`ClockGrid`,
wrapping Flower's Grid): simulated durations, arrival order, deadlines, crashes."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flwr.app import Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedapp.core.flower_compat import ErrorCode, set_message_id
from fedapp.features.hetero.profiles import (
    MBIT,
    DeviceProfile,
    HeteroSpec,
    crash_point,
    is_unavailable,
    payload_bytes,
)

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
