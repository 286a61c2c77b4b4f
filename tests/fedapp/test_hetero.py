"""Device profiles and the clock (fedapp.features.hetero), with a stub ClientApp behind a real Grid."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedapp.checks import compose
from fedapp.cli.inline import InlineGrid
from fedapp.core.flower_compat import ErrorCode
from fedapp.features.hetero import (
    MBIT,
    ClockGrid,
    DeviceProfile,
    HeteroSpec,
    assign_profiles,
    crash_point,
    is_unavailable,
    profile_from_node_config,
)

MODEL = ArrayRecord([np.zeros(250_000, dtype=np.float32)])  # 1 MB
STEPS = 10


def _client(msg: Message, context: Context) -> Message:
    metrics = {"num-examples": 5}
    content = RecordDict()
    if msg.metadata.message_type == MessageType.TRAIN:
        metrics.update({"train_steps": float(STEPS), "train_time_s": 123.0})
        content["arrays"] = msg.content["arrays"]
    content["metrics"] = MetricRecord(metrics)
    return Message(content, reply_to=msg)


def _clock(profiles: dict[int, DeviceProfile], virtual=True, **spec) -> ClockGrid:
    contexts = {
        100 + p: Context(1, 100 + p, {"partition-id": p}, RecordDict(), {}) for p in profiles
    }
    spec = HeteroSpec(
        name="t",
        clock="virtual" if virtual else "real",
        step_time_s=0.1,
        detect_s=30.0,
        classes=(("c", 1.0, DeviceProfile()),),
        **spec,
    )
    return ClockGrid(
        InlineGrid(_client, contexts), spec, profiles, {100 + p: p for p in profiles}, 0
    )


def _train(pid: int, mtype: str = MessageType.TRAIN) -> Message:
    content = RecordDict({"arrays": MODEL}) if mtype != MessageType.QUERY else RecordDict()
    return Message(content, dst_node_id=100 + pid, message_type=mtype)


FAST = DeviceProfile("fast", speed=1.0, down_mbps=8, up_mbps=8, latency_s=0.5)
SLOW = DeviceProfile("slow", speed=0.1, down_mbps=8, up_mbps=8, latency_s=0.5)
TRANSFER = 2 * 0.5 + 2 * MODEL.count_bytes() / (8 * MBIT)  # 1 s latency + 2 x 1 s payload


def test_durations_follow_the_profile_and_the_deadline_drops_stragglers():
    clock = _clock({0: FAST, 1: SLOW})
    replies = clock.send_and_receive([_train(0), _train(1)], timeout=5.0)
    assert [r.metadata.src_node_id for r in replies] == [100]
    assert clock.now == pytest.approx(5.0)  # waited until the deadline
    # the simulated device reports its simulated compute time
    assert replies[0].content["metrics"]["train_time_s"] == pytest.approx(STEPS * 0.1)
    replies = clock.send_and_receive([_train(0), _train(1)], timeout=100.0)
    assert len(replies) == 2
    assert clock.now == pytest.approx(5.0 + TRANSFER + STEPS * 0.1 / 0.1)  # ends at the last reply


def test_events_come_in_simulated_arrival_order_with_timings():
    clock = _clock({0: SLOW, 1: FAST})
    clock.submit([_train(0), _train(1)])
    first = clock.next_event()
    assert first.flight.partition_id == 1
    assert first.time == pytest.approx(TRANSFER + 1.0)
    assert (first.flight.dispatched_at, first.time) == pytest.approx((0.0, TRANSFER + 1.0))
    assert clock.next_event(until=6.0) is None and clock.now == pytest.approx(6.0)
    second = clock.next_event()
    assert second.flight.partition_id == 0 and second.time == pytest.approx(TRANSFER + 10.0)


def test_offline_nodes_and_crashes_fail_when_the_superlink_would_notice():
    off = DeviceProfile("off", p_unavailable=1.0, latency_s=0.5)
    crash = DeviceProfile("crash", p_crash=1.0, latency_s=0.5, speed=0.5)
    clock = _clock({0: off, 1: crash})
    clock.submit([_train(0), _train(1)])
    events = [clock.next_event(), clock.next_event()]
    by_pid = {e.flight.partition_id: e for e in events}
    assert by_pid[0].reply.error.code == ErrorCode.NODE_UNAVAILABLE
    assert by_pid[0].time == pytest.approx(30.0)
    assert by_pid[0].reply.metadata.src_node_id == 100  # reported as the node's own failure
    assert by_pid[0].flight.dispatched_at == 0.0 and by_pid[1].flight.dispatched_at == 0.0
    assert by_pid[1].reply.error.code == ErrorCode.CLIENT_APP_CRASHED
    at = crash_point(crash, 0, 1, 0)
    assert by_pid[1].time == pytest.approx(0.5 + at * STEPS * 0.1 / 0.5 + 30.0)


def test_exchange_returns_each_reply_with_its_times():
    clock = _clock({0: FAST, 1: SLOW})
    events = clock.exchange([_train(0), _train(1)], timeout=100.0)
    assert [e.flight.partition_id for e in events] == [0, 1]  # in arrival order
    assert [e.time - e.flight.dispatched_at for e in events] == pytest.approx(
        [TRANSFER + 1.0, TRANSFER + 10.0]
    )


def test_named_queries_cost_simulated_time_as_queries():
    clock = _clock({0: SLOW})
    clock.send_and_receive([_train(0, "query.heartbeat")], timeout=100.0)
    assert clock.now > 0 and clock.bytes_down > 0


def test_evaluation_costs_no_simulated_time():
    clock = _clock({0: SLOW})
    replies = clock.send_and_receive([_train(0, MessageType.EVALUATE)], timeout=1.0)
    assert len(replies) == 1 and clock.now == 0.0


def test_real_clock_is_wall_time():
    clock = _clock({0: FAST}, virtual=False)
    t0 = time.monotonic()
    assert clock.next_event(until=0.2) is None  # nothing in flight: waits the time out
    assert clock.now >= 0.2 and time.monotonic() - t0 >= 0.2
    replies = clock.send_and_receive([_train(0)], timeout=10.0)
    assert len(replies) == 1  # the inline client answers at once; no simulated delay


def test_profiles_follow_the_shares_and_the_seed():
    cfg = compose(["hetero=both"])
    spec = HeteroSpec.from_config(cfg.hetero)
    a = assign_profiles(spec, 10, seed=1)
    assert sorted(p.tier_class for p in a).count("medium") == 4
    assert [p.tier_class for p in a].count("fast") == 3
    assert [p.speed for p in a] == [p.speed for p in assign_profiles(spec, 10, seed=1)]
    assert [p.tier_class for p in a] != [p.tier_class for p in assign_profiles(spec, 10, seed=2)]
    slow = [p for p in a if p.tier_class == "slow"]
    assert all(0.03 < p.speed < 0.3 for p in slow)  # jittered around 0.1


def test_bad_hetero_configs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="clock"):
        HeteroSpec.from_config({"clock": "fast"})
    with pytest.raises(ValueError, match="needs device classes"):
        HeteroSpec.from_config({"clock": "virtual", "classes": {}})
    with pytest.raises(ValueError, match="speed"):
        HeteroSpec.from_config({"clock": "virtual", "classes": {"x": {"share": 1, "speed": 0}}})
    assert not HeteroSpec.from_config(compose([]).hetero).active


def test_availability_draws_are_reproducible_and_near_their_probability():
    prof = DeviceProfile(p_unavailable=0.1)
    draws = [is_unavailable(prof, 0, p, s) for p in range(50) for s in range(40)]
    assert 0.07 < np.mean(draws) < 0.13
    assert draws == [is_unavailable(prof, 0, p, s) for p in range(50) for s in range(40)]


def test_a_supernode_states_its_own_profile():
    prof = profile_from_node_config({"speed": "0.25", "up-mbps": 3, "other": 1}, DeviceProfile())
    assert prof.speed == 0.25 and prof.up_mbps == 3 and prof.down_mbps == DeviceProfile().down_mbps


def test_the_wall_clock_never_waits_for_a_reply_longer_than_the_round_timeout():
    """A ClientApp that hangs (its node still heartbeats) must not hold an event-driven
    strategy's unbounded `next_event()` forever: after `round_timeout_s` it is an error."""
    clock = _clock({0: FAST}, virtual=False)
    clock.real_timeout_s = 0.3
    clock.grid.push_messages = lambda msgs: [f"hung-{i}" for i, _ in enumerate(msgs)]
    clock.grid.pull_messages = lambda ids: []
    clock.submit([_train(0)])
    start = time.monotonic()
    event = clock.next_event()  # until=inf
    assert time.monotonic() - start < 2.0
    assert event.reply.has_error()
    assert event.reply.error.code == ErrorCode.MESSAGE_UNAVAILABLE
