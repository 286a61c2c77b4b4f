"""Shared strategy plumbing: seeded sampling, reply screening, aggregation and round logs."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedapp.checks import compose
from strategies import build_strategy
from strategies.base import aggregate_scalar_metrics, sample_partitions
from tests.conftest import FakeGrid, error_reply, reply


def _strategy(name="fedavg", nodes=10, cpr=4, min_replies=1, extra=""):
    cfg = compose(f"strategy={name} clients_per_round={cpr} eval_clients_per_round={cpr} {extra}")
    s = build_strategy(cfg, num_nodes=nodes)
    node_ids = [1000 + 7 * p for p in range(nodes)]
    s.bind({n: p for p, n in enumerate(node_ids)}, seed=cfg.seed, min_replies=min_replies)
    return s, FakeGrid(node_ids), node_ids


def _global(shape=(3,)):
    return ArrayRecord([np.zeros(shape, dtype=np.float32), np.zeros(2, dtype=np.float32)])


# --- sampling ---------------------------------------------------------------------------------
@given(
    available=st.sets(st.integers(0, 500), min_size=1, max_size=60),
    seed=st.integers(0, 2**31),
    rnd=st.integers(1, 1000),
    data=st.data(),
)
def test_sample_partitions_is_a_deterministic_subset(available, seed, rnd, data):
    k = data.draw(st.integers(1, len(available)))
    a = sample_partitions(available, k, seed, rnd)
    assert a == sample_partitions(sorted(available, reverse=True), k, seed, rnd)  # order-free
    assert len(a) == k == len(set(a))
    assert set(a) <= available


def test_sample_partitions_changes_with_round_and_seed():
    pool = range(200)
    draws = {tuple(sample_partitions(pool, 20, 0, r)) for r in range(1, 11)}
    assert len(draws) == 10
    assert sample_partitions(pool, 20, 0, 1) != sample_partitions(pool, 20, 1, 1)


def test_sample_partitions_rejects_oversampling():
    with pytest.raises(ValueError):
        sample_partitions([1, 2], 3, 0, 1)


def test_configure_train_samples_by_partition_not_node_id():
    s1, grid1, nodes1 = _strategy()
    msgs1 = list(s1.configure_train(1, _global(), ConfigRecord({}), grid1))
    # same partitions on other (random) node ids: same choice of partitions
    s2, _, _ = _strategy()
    other = [5 + 11 * p for p in range(10)]
    s2.bind({n: p for p, n in enumerate(other)}, seed=0)
    msgs2 = list(s2.configure_train(1, _global(), ConfigRecord({}), FakeGrid(other)))
    assert len(msgs1) == 4
    p1 = sorted(s1.partition_of(m.metadata.dst_node_id) for m in msgs1)
    p2 = sorted(s2.partition_of(m.metadata.dst_node_id) for m in msgs2)
    assert p1 == p2 == s1.rounds[1].expected
    assert s1.rounds[1].bytes_down == 4 * _global().count_bytes()


def test_fedprox_sends_proximal_mu():
    s, grid, _ = _strategy("fedprox", extra="strategy.proximal_mu=0.3")
    msgs = list(s.configure_train(1, _global(), ConfigRecord({}), grid))
    assert all(m.content["config"]["proximal-mu"] == pytest.approx(0.3) for m in msgs)


# --- screening and aggregation ------------------------------------------------------------------
def _ok(node, value, n):
    return reply(
        node,
        [np.full(3, value, np.float32), np.full(2, value, np.float32)],
        {"num-examples": n, "train_loss": 1.0},
    )


def test_fedavg_weighted_mean_and_bad_replies_are_dropped():
    s, grid, nodes = _strategy()
    list(s.configure_train(1, _global(), ConfigRecord({}), grid))
    replies = [
        _ok(nodes[0], 1.0, 10),
        _ok(nodes[1], 4.0, 30),
        reply(
            nodes[2],
            [np.full(3, np.nan, np.float32), np.zeros(2, np.float32)],
            {"num-examples": 10, "train_loss": 1.0},
        ),
        reply(
            nodes[3],
            [np.zeros(4, np.float32), np.zeros(2, np.float32)],
            {"num-examples": 10, "train_loss": 1.0},
        ),
        error_reply(nodes[4], "client crashed"),
        reply(
            nodes[5],
            [np.zeros(3, np.float32), np.zeros(2, np.float32)],
            {"num-examples": 10, "other": 1.0},
        ),
        reply(
            nodes[6],
            [np.zeros(3, np.float32), np.zeros(2, np.float32)],
            {"num-examples": 0, "train_loss": 1.0},
        ),
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, (10 * 1 + 30 * 4) / 40))
    assert metrics["train_loss"] == pytest.approx(1.0)
    status = {c.partition_id: c.status for c in s.rounds[1].clients}
    assert status[0] == status[1] == "ok"
    assert "non-finite" in status[2]
    assert "layout" in status[3]
    assert "client crashed" in status[4]
    assert "metric keys" in status[5]
    assert "positive" in status[6]
    assert s.rounds[1].num_replies == 2
    assert s.rounds[1].aggregated


def test_min_replies_keeps_previous_model():
    s, grid, nodes = _strategy(min_replies=3)
    list(s.configure_train(1, _global(), ConfigRecord({}), grid))
    arrays, metrics = s.aggregate_train(1, [_ok(nodes[0], 1.0, 10), error_reply(nodes[1])])
    assert arrays is None and metrics is None
    assert not s.rounds[1].aggregated


@settings(deadline=None, max_examples=25)
@given(st.lists(st.tuples(st.floats(-5, 5), st.integers(1, 1000)), min_size=1, max_size=8))
def test_identical_clients_give_their_model(params):
    s, grid, nodes = _strategy(nodes=10, cpr=8)
    list(s.configure_train(1, _global(), ConfigRecord({}), grid))
    value = params[0][0]
    arrays, _ = s.aggregate_train(1, [_ok(nodes[i], value, n) for i, (_, n) in enumerate(params)])
    np.testing.assert_allclose(
        arrays.to_numpy_ndarrays()[0], np.full(3, value, np.float32), rtol=1e-5, atol=1e-5
    )


def test_evaluate_aggregation_skips_empty_validation_sets():
    s, grid, nodes = _strategy()
    list(s.configure_evaluate(1, _global(), ConfigRecord({}), grid))
    reps = [
        reply(
            nodes[0],
            None,
            {"num-examples": 10, "eval_loss": 1.0, "eval_accuracy": 0.5},
            MessageType.EVALUATE,
        ),
        reply(
            nodes[1],
            None,
            {"num-examples": 30, "eval_loss": 2.0, "eval_accuracy": 0.9},
            MessageType.EVALUATE,
        ),
        reply(
            nodes[2],
            None,
            {"num-examples": 0, "eval_loss": 0.0, "eval_accuracy": 0.0},
            MessageType.EVALUATE,
        ),
    ]
    metrics = s.aggregate_evaluate(1, reps)
    assert metrics["eval_accuracy"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)


def test_scalar_metric_aggregation_drops_histograms():
    recs = [
        RecordDict({"m": MetricRecord({"num-examples": 1, "loss": 1.0, "label-counts": [1, 0]})}),
        RecordDict({"m": MetricRecord({"num-examples": 3, "loss": 3.0, "label-counts": [0, 3]})}),
    ]
    out = aggregate_scalar_metrics(recs, "num-examples")
    assert "label-counts" not in out
    assert out["loss"] == pytest.approx(2.5)


def test_qfedavg_with_q_zero_matches_fedavg_direction():
    # q-FedAvg with q=0 moves the model by the (unweighted) mean of the client deltas.
    s, grid, nodes = _strategy("qfedavg", extra="strategy.q=0.0 train.lr=1.0")
    list(s.configure_train(1, _global(), ConfigRecord({}), grid))
    arrays, _ = s.aggregate_train(1, [_ok(nodes[0], 1.0, 10), _ok(nodes[1], 3.0, 30)])
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, 2.0), rtol=1e-6)
    assert all(a.numpy().dtype == np.float32 for a in arrays.values())  # same dtype as the model


def test_build_strategy_caps_sampling_to_available_clients():
    cfg = compose("clients_per_round=50 eval_clients_per_round=50")
    s = build_strategy(cfg, num_nodes=5)
    assert s.min_train_nodes == 5 and s.min_evaluate_nodes == 5


def test_aggregation_does_not_depend_on_reply_order():
    rng = np.random.default_rng(0)
    values = [
        (rng.normal(size=3) * 10.0 ** rng.integers(-3, 4)).astype(np.float32) for _ in range(8)
    ]
    results = []
    for order in (range(8), reversed(range(8)), [3, 1, 7, 0, 5, 2, 6, 4]):
        s, grid, nodes = _strategy(nodes=10, cpr=8)
        list(s.configure_train(1, _global(), ConfigRecord({}), grid))
        reps = [
            reply(
                nodes[i],
                [values[i], np.zeros(2, np.float32)],
                {"num-examples": 7 + i, "train_loss": 1.0},
            )
            for i in order
        ]
        arrays, _ = s.aggregate_train(1, reps)
        results.append(arrays.to_numpy_ndarrays()[0])
    assert all(np.array_equal(results[0], r) for r in results[1:])
