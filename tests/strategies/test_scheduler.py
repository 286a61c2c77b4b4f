"""The scheduler core's policies (tiered scheduling, FedAsync, TiFL) as pure state machines:
driven with made-up events, no Flower, no clock."""

from __future__ import annotations

import math

import pytest

from strategies.fedasync import FedAsyncPolicy
from strategies.scheduler import Cancel, Fold, Report, Send
from strategies.tiered import TieredParams, TieredPolicy
from strategies.tifl import TiflPolicy

CONFIG = {"batch-size": 10, "local-epochs": 1}
# seconds per local step of clients 0..5: two fast, two medium, two slow
STEP_S = {0: 0.1, 1: 0.1, 2: 0.5, 3: 0.5, 4: 2.0, 5: 2.0}


def _probe(policy) -> None:
    """Every client answers its 5-step probe: 1 s of transfer plus its compute."""
    for pid, step in STEP_S.items():
        policy.on_probe(pid, Report(pid, 1.0 + 5 * step, 100, 5.0, 5 * step, 1.0))


def _tiered(**params) -> TieredPolicy:
    policy = TieredPolicy(TieredParams(**params), list(STEP_S), k=3, seed=0, config=CONFIG)
    _probe(policy)
    return policy


def _ok(pid: int, duration: float = 1.0) -> Report:
    return Report(pid, duration, 100, 10.0, 1.0, 0.5)


def _by_tier(policy, sends) -> dict[int, Send]:
    return {policy.inflight[s.ticket].tier: s for s in sends}


def test_tiered_plans_tiers_windows_and_work_from_the_probes():
    policy = _tiered()
    sends = policy.open_round(1, 0.0, 0.0, set(STEP_S))
    # predicted full work: 1 s + 10 steps x step time -> 2, 6 and 21 s; round = 0.9-quantile
    # of the fast tier x 1.1 slack = 2.2 s; windows of 1, 3 and 10 rounds
    assert policy.cur.length == pytest.approx(2.2)
    assert [policy.cur.periods[t] for t in range(3)] == [1, 3, 10]
    assert policy.cur.slots == [1, 1, 1] and len(sends) == 3
    tiers = _by_tier(policy, sends)
    assert tiers[0].partition_id in (0, 1) and tiers[2].partition_id in (4, 5)
    assert all(s.steps == 10 and s.round == 1 for s in sends)  # full work fits every window
    assert policy.cur.due == [tiers[0].partition_id]  # only the fast tier is due this round
    assert policy.wake_at() == pytest.approx(2.2)


def test_a_round_whose_heartbeats_left_no_time_for_anyone_restarts_from_dispatch():
    # the heartbeats took 25 s: even the slow tier's 22 s window is over before any dispatch
    policy = _tiered()
    sends = policy.open_round(1, 0.0, 25.0, set(STEP_S))
    assert len(sends) == 3 and policy.cur.restarted
    assert policy.cur.round_end == pytest.approx(25.0 + 2.2)
    assert all(policy.inflight[s.ticket].window_end > 25.0 for s in sends)
    assert policy.cur.skipped == []
    # an ordinary round is not restarted
    fresh = _tiered()
    fresh.open_round(1, 0.0, 0.5, set(STEP_S))
    assert not fresh.cur.restarted and fresh.cur.round_end == pytest.approx(2.2)


def test_a_failed_client_is_replaced_at_once_by_a_standby_of_its_tier():
    policy = _tiered()
    fast = _by_tier(policy, policy.open_round(1, 0.0, 0.0, set(STEP_S)))[0]
    (standby,) = policy.on_reply(fast.ticket, 0.5, None)
    assert isinstance(standby, Send) and standby.partition_id == 1 - fast.partition_id
    assert policy.inflight[standby.ticket].tier == 0
    assert policy.inflight[standby.ticket].window_end == pytest.approx(2.2)  # the rest of it
    assert standby.steps == 7  # what fits in the time left: floor((2.2 - 0.5 - 1) / 0.1)
    assert policy.cur.replaced == [[fast.partition_id, standby.partition_id]]
    assert policy.book.clients[fast.partition_id].failures == 1
    assert [x.partition_id for x in policy.cur.landed] == [fast.partition_id]  # logged


def test_a_slow_tiers_update_is_folded_when_it_lands_with_its_staleness():
    policy = _tiered()
    medium = _by_tier(policy, policy.open_round(1, 0.0, 0.0, set(STEP_S)))[1]
    for rnd, start in ((1, 0.0), (2, 2.2)):
        if rnd > 1:
            policy.open_round(rnd, start, start, set(policy.idle()))
        policy.on_timer(start + 2.2)
        assert policy.round_over(start + 2.2)
        assert medium.partition_id not in [x.partition_id for x in policy.close_round(rnd).landed]
    policy.open_round(3, 4.4, 4.4, set(policy.idle()))
    assert policy.on_reply(medium.ticket, 5.0, _ok(medium.partition_id, 5.0)) == []
    close = policy.close_round(3)
    (late,) = [x for x in close.landed if x.partition_id == medium.partition_id]
    assert late.dispatched_round == 1 and late.details["staleness"] == 2
    assert close.schedule["late_folded"] == [medium.partition_id]


def test_a_missed_window_gets_a_standby_and_drop_stops_waiting_for_it():
    for late_policy in ("fold", "drop"):
        policy = _tiered(late_policy=late_policy, round_s=10.0)  # windows 1 round long
        sends = policy.open_round(1, 0.0, 0.0, set(STEP_S))
        slow = _by_tier(policy, sends)[2]
        # round 10 s: the slow tier's window is 3 rounds (21 s of work), the medium's 1
        medium = _by_tier(policy, sends)[1]
        assert policy.inflight[medium.ticket].window_end == pytest.approx(10.0)
        assert policy.wake_at() == pytest.approx(10.0)
        decisions = policy.on_timer(10.0)
        assert not any(isinstance(d, Cancel) for d in decisions)  # a window at the round's end
        policy.close_round(1)
        policy.open_round(2, 10.0, 10.0, set(policy.idle()))
        decisions = policy.on_timer(11.0)  # the medium client missed its window
        cancels = [d for d in decisions if isinstance(d, Cancel)]
        assert (Cancel(medium.ticket) in cancels) == (late_policy == "drop")
        assert medium.partition_id in [old for old, _ in policy.cur.replaced]
        policy.on_reply(medium.ticket, 12.0, _ok(medium.partition_id, 12.0))
        landed = [x.partition_id for x in policy.cur.landed]
        assert (medium.partition_id in landed) == (late_policy == "fold")
        assert slow.ticket in policy.inflight


def _fedasync(k=2):
    rate = lambda s, n, mean: 0.5 * (1 + s) ** -0.5  # noqa: E731
    return FedAsyncPolicy([0, 1, 2, 3, 4], k, seed=0, rate=rate)


def test_fedasync_keeps_k_trainings_in_flight_and_discounts_stale_updates():
    policy = _fedasync()
    sends = policy.open_round(1, 0.0, 0.0, None)
    assert len(sends) == 2 and all(s.round == 1 for s in sends)
    for s in sends:
        policy.sent(s)
    first = policy.on_reply(sends[0].ticket, 1.0, _ok(sends[0].partition_id))
    fold, nxt = first
    assert fold == Fold(sends[0].ticket, 0.5, 0) and nxt.round == 1
    policy.folded(fold.ticket, True)
    policy.sent(nxt)  # sent with model version 1
    assert not policy.round_over(1.0)
    second = policy.on_reply(sends[1].ticket, 2.0, _ok(sends[1].partition_id))
    fold2, nxt2 = second
    assert fold2.staleness == 1 and fold2.rate == pytest.approx(0.5 / math.sqrt(2))
    assert nxt2.round == 2  # the k-th reply of round 1 dispatches for round 2
    policy.folded(fold2.ticket, False)  # not finite: the version does not move
    assert policy.version == 1 and policy.round_over(2.0)
    close = policy.close_round(1)
    assert close.expected == [sends[0].partition_id, sends[1].partition_id]
    assert close.schedule == {"model_version": 1, "in_flight": 2}


def test_fedasync_replaces_a_failed_client_without_folding():
    policy = _fedasync()
    sends = policy.open_round(1, 0.0, 0.0, None)
    for s in sends:
        policy.sent(s)
    (nxt,) = policy.on_reply(sends[0].ticket, 1.0, None)
    assert isinstance(nxt, Send) and nxt.partition_id not in (s.partition_id for s in sends[1:])
    policy.on_timer(float("inf"))  # nothing else can land
    assert policy.round_over(1.0)


def _tifl(**kw):
    policy = TiflPolicy(list(STEP_S), 3, sample_size=2, seed=0, config=CONFIG, timeout=10.0, **kw)
    _probe(policy)
    return policy


def test_tifl_trains_one_tier_and_its_deadline_fails_the_rest():
    policy = _tifl()
    sends = policy.open_round(1, 0.0, 0.0, None)
    tier = policy.schedule["tier"]
    members = {0: {0, 1}, 1: {2, 3}, 2: {4, 5}}[tier]
    assert {s.partition_id for s in sends} == members
    assert policy.schedule["tier_sizes"] == [2, 2, 2] and policy.wake_at() == 10.0
    policy.on_reply(sends[0].ticket, 3.0, Report(sends[0].partition_id, 3.0, 100, 10.0, 1.0, 2.5))
    assert not policy.round_over(3.0)
    assert policy.on_timer(10.0) == [Cancel(sends[1].ticket)]
    assert policy.round_over(10.0)
    assert policy.book.clients[sends[1].partition_id].failures == 1
    close = policy.close_round(1)
    assert [x.partition_id for x in close.landed] == [sends[0].partition_id]
    assert policy.tier_loss[tier] == 2.5  # the next tier choice prefers tiers that do worse


def test_tifl_tier_choice_is_seeded_and_respects_credits():
    a, b = _tifl(credits=1), _tifl(credits=1)
    tiers = []
    for rnd in (1, 2, 3):
        for p in (a, b):
            p.open_round(rnd, 0.0, 0.0, None)
            p.on_timer(100.0)
            p.close_round(rnd)
        assert a.schedule == b.schedule
        tiers.append(a.schedule["tier"])
    assert sorted(tiers) == [0, 1, 2]  # one credit each: every tier exactly once


def test_tiered_heartbeats_only_clients_not_seen_within_the_max_age():
    """A client whose update landed (or who answered a heartbeat) within heartbeat_max_age_s
    is live without a heartbeat; a failure, a missed window or age makes it asked again; 0
    asks every idle client every round (the design before)."""
    policy = _tiered(heartbeat_max_age_s=10.0)
    assert policy.heartbeat_targets(0.0) == policy.idle() == sorted(STEP_S)  # nobody seen yet
    sends = _by_tier(policy, policy.open_round(1, 0.0, 0.0, {0, 1, 2, 3, 4, 5}))
    # the heartbeat's answers count as seen, at the time they came back
    assert policy.presumed_alive(0.0) == set(policy.idle())
    fast = sends[0]
    policy.on_reply(fast.ticket, 2.0, _ok(fast.partition_id, 2.0))
    assert fast.partition_id in policy.presumed_alive(5.0)
    assert fast.partition_id not in policy.heartbeat_targets(5.0)
    assert fast.partition_id in policy.heartbeat_targets(12.5)  # seen 10.5 s ago: asked again
    # a failed training: asked again at once
    medium = sends[1]
    policy.on_reply(medium.ticket, 3.0, None)
    assert medium.partition_id in policy.heartbeat_targets(3.0)
    # a heartbeat that fails: asked again
    policy.on_probe(fast.partition_id, None)
    assert fast.partition_id in policy.heartbeat_targets(5.0)
    # max age 0: everyone idle is heartbeated every round
    always = _tiered(heartbeat_max_age_s=0.0)
    s0 = _by_tier(always, always.open_round(1, 0.0, 0.0, set(STEP_S)))[0]
    always.on_reply(s0.ticket, 2.0, _ok(s0.partition_id, 2.0))
    assert always.heartbeat_targets(2.5) == always.idle() and always.presumed_alive(2.5) == set()
    with pytest.raises(ValueError, match="heartbeat_max_age_s"):
        TieredParams(heartbeat_max_age_s=-1.0)


def test_a_tiered_policy_from_a_checkpoint_before_the_max_age_heartbeats_as_it_did():
    """A pickled policy from before heartbeat_max_age_s (no such field, no last_seen) resumes
    with the design it was written with: every idle client heartbeated every round."""
    import pickle

    policy = _tiered()
    policy.open_round(1, 0.0, 0.0, set(STEP_S))
    old = pickle.loads(pickle.dumps(policy))
    delattr(old, "last_seen")
    p_state = dict(vars(old.p))
    del p_state["heartbeat_max_age_s"]
    old.p = TieredParams.__new__(TieredParams)
    old.p.__setstate__(p_state)
    restored = pickle.loads(pickle.dumps(old))
    assert restored.p.heartbeat_max_age_s == 0.0 and restored.last_seen == {}
    assert restored.heartbeat_targets(0.5) == restored.idle()


def test_tiered_presumed_clients_keep_their_time_and_a_missed_window_asks_again():
    policy = _tiered(heartbeat_max_age_s=10.0, round_s=10.0)  # windows of 1 and more rounds
    # round 1's heartbeat took 0.5 s: its answers are stamped when the last came back
    sends = _by_tier(policy, policy.open_round(1, 0.0, 0.5, set(STEP_S)))
    assert all(policy.last_seen[p] == 0.5 for p in policy.idle())
    fast, medium = sends[0], sends[1]
    policy.on_reply(fast.ticket, 3.0, _ok(fast.partition_id, 2.5))
    policy.on_timer(10.0)
    policy.close_round(1)
    # round 2: the fast client (seen at 3.0) is presumed, nobody answered a heartbeat;
    # presumed clients are not re-stamped
    assert fast.partition_id not in policy.heartbeat_targets(10.0)
    policy.open_round(2, 10.0, 10.0, set())
    assert policy.last_seen[fast.partition_id] == 3.0
    assert fast.partition_id in policy.cur.alive
    # the medium client's window (1 round of 10 s) ends with no update: asked again
    assert policy.inflight[medium.ticket].window_end == pytest.approx(10.0)
    policy.on_timer(10.5)
    assert policy.inflight[medium.ticket].missed
    assert medium.partition_id not in policy.last_seen
    # a wall-clock resume forgets who was seen; a virtual one keeps it
    policy.resumed(virtual=True)
    assert fast.partition_id in policy.last_seen
    policy.resumed(virtual=False)
    assert policy.last_seen == {} and policy.heartbeat_targets(11.0) == policy.idle()


def test_tiered_does_not_wait_for_a_silent_client_again_within_the_max_age():
    """A client that left a heartbeat unanswered (offline) is neither asked nor scheduled for
    heartbeat_max_age_s: asking it every round held each round for the whole timeout."""
    policy = _tiered(heartbeat_max_age_s=10.0)
    silent = 5
    policy.open_round(1, 0.0, 1.0, set(STEP_S) - {silent})  # it did not answer (1 s timeout)
    assert policy.silent_at == {silent: 1.0}
    assert silent not in policy.cur.alive
    assert silent not in [s.pid for s in policy.inflight.values()]
    assert silent not in policy.heartbeat_targets(5.0)  # not asked again for 10 s
    assert silent in policy.heartbeat_targets(11.5)  # then asked again
    # it answers: live again, no longer silent
    policy.cur.ended = True
    policy.close_round(1)
    policy.open_round(2, 11.5, 12.0, set(policy.heartbeat_targets(11.5)))
    assert silent not in policy.silent_at and policy.last_seen[silent] == 12.0
    # at max age 0 a silent client is asked every round (the design before)
    always = _tiered(heartbeat_max_age_s=0.0)
    always.open_round(1, 0.0, 1.0, set(STEP_S) - {silent})
    assert silent in always.heartbeat_targets(1.5)
