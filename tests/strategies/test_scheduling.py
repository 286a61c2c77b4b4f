"""The scheduling math of the tiered scheduler, TiFL and FedAsync, as pure functions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.scheduling import (
    ProfileBook,
    allocate_slots,
    apply_updates,
    assign_tiers,
    mix,
    staleness_discount,
    steps_for_window,
    tifl_probabilities,
)


@pytest.mark.parametrize("kind", ["constant", "polynomial", "hinge"])
def test_staleness_discount_is_in_unit_interval_and_non_increasing(kind):
    values = [staleness_discount(t, kind, a=0.5, b=3) for t in range(50)]
    assert values[0] == 1.0
    assert all(0 < v <= 1 for v in values)
    assert all(b <= a for a, b in zip(values, values[1:], strict=False))


def test_staleness_discount_matches_the_fedasync_formulas():
    assert staleness_discount(3, "polynomial", a=0.5) == pytest.approx(4**-0.5)
    assert staleness_discount(3, "hinge", a=2, b=4) == 1.0
    assert staleness_discount(6, "hinge", a=2, b=4) == pytest.approx(1 / (2 * 2 + 1))
    with pytest.raises(ValueError):
        staleness_discount(1, "exponential")
    with pytest.raises(ValueError):
        staleness_discount(-1)


def test_mix_interpolates_and_keeps_dtypes():
    g = [np.zeros(3, np.float32), np.array([1, 2], np.int64)]
    c = [np.ones(3, np.float32), np.array([5, 6], np.int64)]
    out = mix(g, c, 0.25)
    np.testing.assert_allclose(out[0], 0.25)
    assert out[0].dtype == np.float32
    np.testing.assert_array_equal(out[1], [1, 2])  # integer buffers: alpha < 0.5 keeps global
    np.testing.assert_array_equal(mix(g, c, 1.0)[0], c[0])
    with pytest.raises(ValueError):
        mix(g, c, 1.5)


arrays = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=1, max_size=6).map(
    lambda x: np.array(x, dtype=np.float32)
)


@settings(max_examples=60, deadline=None)
@given(
    g=arrays,
    n=st.integers(1, 5),
    data=st.data(),
)
def test_apply_updates_with_fresh_bases_is_the_weighted_mean(g, n, data):
    clients = [
        [
            np.array(
                data.draw(st.lists(st.floats(-10, 10, width=32), min_size=len(g), max_size=len(g))),
                np.float32,
            )
        ]
        for _ in range(n)
    ]
    w = data.draw(st.lists(st.floats(0.1, 5), min_size=n, max_size=n))
    out = apply_updates([g], [[g]] * n, clients, w)
    expected = np.average(np.stack([c[0] for c in clients]).astype(np.float64), axis=0, weights=w)
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-4)


def test_apply_updates_moves_by_a_stale_clients_own_progress():
    current, old_base = [np.array([10.0])], [np.array([0.0])]
    client = [np.array([1.0])]  # one unit of progress from its (old) starting point
    out = apply_updates(current, [old_base], [client], [1.0])
    assert out[0][0] == pytest.approx(11.0)  # not pulled back to 1.0
    with pytest.raises(ValueError):
        apply_updates(current, [old_base], [client], [0.0])


@settings(max_examples=80, deadline=None)
@given(
    st.dictionaries(
        st.integers(0, 500), st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=60
    ),
    st.integers(1, 5),
)
def test_tiers_are_ordered_by_predicted_time_and_balanced(pred, k):
    tiers = assign_tiers(pred, k)
    assert set(tiers) == set(pred)
    used = min(k, len(pred))
    sizes = [sum(t == i for t in tiers.values()) for i in range(used)]
    assert max(sizes) - min(sizes) <= 1
    for p in pred:
        for q in pred:
            if pred[p] < pred[q]:
                assert tiers[p] <= tiers[q]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=5), st.integers(0, 60))
def test_slots_add_up_respect_sizes_and_reach_every_tier(sizes, k):
    slots = allocate_slots(sizes, k)
    assert sum(slots) == min(k, sum(sizes))
    assert all(0 <= s <= n for s, n in zip(slots, sizes, strict=True))
    nonempty = [i for i, n in enumerate(sizes) if n > 0]
    if k >= len(nonempty):
        assert all(slots[i] >= 1 for i in nonempty)


def test_slots_are_proportional():
    assert allocate_slots([60, 80, 60], 20) == [6, 8, 6]
    assert allocate_slots([1, 0, 10], 5) == [1, 0, 4]


def test_steps_fill_the_window_or_refuse():
    assert steps_for_window(10, 2, 0.5, min_steps=2, max_steps=20) == 16
    assert steps_for_window(100, 2, 0.5, min_steps=2, max_steps=20) == 20
    assert steps_for_window(2.9, 2, 0.5, min_steps=2, max_steps=20) == 0


def test_tifl_prefers_tiers_that_do_worse_and_respects_credits():
    p = tifl_probabilities([0.5, 0.9, 0.1], [1, 1, 1])
    assert p.sum() == pytest.approx(1) and p[1] > p[0] > p[2]
    q = tifl_probabilities([0.5, 0.9, 0.1], [1, 0, 1])
    assert q[1] == 0 and q.sum() == pytest.approx(1)
    assert tifl_probabilities([math.nan, 0.2], [1, 1])[0] > 0.5  # unseen tier first


def test_profile_book_learns_speed_and_reliability():
    book = ProfileBook(ema=0.5)
    assert book.predict(3, 10) is None
    book.observe(3, duration_s=12.0, steps=10, compute_s=10.0)
    assert book.predict(3, 20) == pytest.approx(2.0 + 20 * 1.0)
    book.fail(3)
    assert book.clients[3].reliability == pytest.approx(0.5)
    assert book.clients[3].failures == 1 and book.clients[3].successes == 1
