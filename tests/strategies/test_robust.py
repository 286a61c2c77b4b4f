"""Flower's robust aggregators behind the mixin: the per-client shares we report match what
Flower actually aggregated."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from fedapp.checks import compose
from strategies import build_strategy
from strategies.robust import coordinate_shares, median_bounds, trimmed_bounds
from tests.conftest import FakeGrid, reply


@lru_cache(maxsize=64)
def _compose(overrides: str):
    return compose(overrides)  # composing (~1 s) dominates these one-coordinate rounds


def _run(name, values, n=None, extra="attack=scaled attack.fraction=0.2"):
    """One round of `name` over clients whose 1-coordinate model is `values`."""
    k = len(values)
    cfg = _compose(f"strategy={name} clients_per_round={k} eval_clients_per_round={k} {extra}")
    s = build_strategy(cfg, num_nodes=k)
    nodes = [500 + p for p in range(k)]
    s.bind({nid: p for p, nid in enumerate(nodes)}, seed=0, attackers=[0])
    list(
        s.configure_train(
            1, ArrayRecord([np.zeros(1, np.float32)]), ConfigRecord({}), FakeGrid(nodes)
        )
    )
    n = n or [10] * k
    replies = [
        reply(nid, [np.array([v], np.float32)], {"num-examples": n[p], "train_loss": 1.0})
        for p, (nid, v) in enumerate(zip(nodes, values, strict=True))
    ]
    arrays, _ = s.aggregate_train(1, replies)
    shares = {c.partition_id: c.weight for c in s.rounds[1].clients}
    return s, float(arrays.to_numpy_ndarrays()[0][0]), np.array([shares[p] for p in range(k)])


distinct = st.lists(st.integers(-1000, 1000), min_size=3, max_size=15, unique=True).map(
    lambda xs: [x / 8 for x in xs]  # exact in float32
)


@settings(max_examples=20, deadline=None)
@given(values=distinct)
def test_median_and_trimmed_mean_shares_reproduce_the_aggregate(values):
    for name in ("fedmedian", "fedtrimmedavg"):
        _, agg, shares = _run(name, values)
        assert shares.sum() == pytest.approx(1.0)
        assert float(np.dot(shares, values)) == pytest.approx(agg, abs=1e-5)


@settings(max_examples=12, deadline=None)
@given(values=distinct, data=st.data())
def test_krum_family_shares_reproduce_the_aggregate(values, data):
    n = data.draw(st.lists(st.integers(1, 100), min_size=len(values), max_size=len(values)))
    for name in ("krum", "multikrum"):
        s, agg, shares = _run(name, values, n)
        assert shares.sum() == pytest.approx(1.0)
        assert float(np.dot(shares, values)) == pytest.approx(agg, abs=1e-4)
        selected = int((shares > 0).sum())
        assert selected == (1 if name == "krum" else len(values) - s.num_malicious_nodes)


@settings(max_examples=12, deadline=None)
@given(values=st.lists(st.integers(-1000, 1000), min_size=7, max_size=15, unique=True))
def test_bulyan_shares_reproduce_the_aggregate(values):
    values = [v / 8 for v in values]
    s, agg, shares = _run("bulyan", values)
    assert s.num_malicious_nodes >= 1
    assert shares.sum() == pytest.approx(1.0)
    assert float(np.dot(shares, values)) == pytest.approx(agg, abs=1e-4)


def test_coordinate_shares_bounds():
    assert median_bounds(5) == (2, 3) and median_bounds(4) == (1, 3)
    assert trimmed_bounds(10, 0.2) == (2, 8)
    x = np.array([[0.0, 5.0], [1.0, 1.0], [2.0, 0.0]])  # medians: client 1 then client 1
    np.testing.assert_allclose(coordinate_shares(x, *median_bounds(3)), [0, 1, 0])


def test_auto_num_malicious_nodes_follows_the_attack():
    for name, expect in (("krum", 6), ("bulyan", 4)):  # bulyan capped at (20 - 3) // 4
        cfg = compose(f"strategy={name} clients_per_round=20 attack=label_flip attack.fraction=0.3")
        assert build_strategy(cfg, num_nodes=100).num_malicious_nodes == expect
    cfg = compose("strategy=multikrum clients_per_round=20")
    s = build_strategy(cfg, num_nodes=100)
    assert (s.num_malicious_nodes, s.num_nodes_to_select) == (0, 20)


def test_no_shares_are_computed_without_attackers():
    values = [1.0, 2.0, 3.0]
    cfg = compose("strategy=fedmedian clients_per_round=3 eval_clients_per_round=3")
    s = build_strategy(cfg, num_nodes=3)
    s.bind({10: 0, 11: 1, 12: 2}, seed=0)
    list(
        s.configure_train(
            1, ArrayRecord([np.zeros(1, np.float32)]), ConfigRecord({}), FakeGrid([10, 11, 12])
        )
    )
    replies = [
        reply(10 + i, [np.array([v], np.float32)], {"num-examples": 5})
        for i, v in enumerate(values)
    ]
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays.to_numpy_ndarrays()[0][0] == 2.0
    assert all(c.weight is None for c in s.rounds[1].clients)
