"""FedBuff (strategies/fedbuff.py): the server step of Nguyen et al. 2022 as a pure function,
and runs on the fedapp clock: FedAsync's dispatch at the same concurrency, a step every K
updates with staleness weights (1 + tau)^-1/2, learning, and a resume bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedapp.checks import compose
from fedapp.core.config import ConfigError
from strategies.fedbuff import buffered_step, update_of

floats = st.floats(-10, 10, allow_nan=False, width=32)


@given(
    g=st.lists(floats, min_size=3, max_size=3),
    clients=st.lists(st.lists(floats, min_size=3, max_size=3), min_size=1, max_size=6),
)
def test_fresh_updates_with_unit_step_are_the_mean_of_the_client_models(g, clients):
    x = [np.array(g, dtype=np.float32)]
    deltas = [update_of([np.array(c, dtype=np.float32)], x) for c in clients]
    new = buffered_step(x, deltas, [1.0] * len(clients), server_lr=1.0)
    assert new[0].dtype == np.float32
    want = np.mean(np.array(clients, dtype=np.float32).astype(np.float64), axis=0)
    np.testing.assert_allclose(new[0], want, rtol=1e-5, atol=1e-5)


@given(
    g=st.lists(floats, min_size=2, max_size=2),
    deltas=st.lists(st.lists(floats, min_size=2, max_size=2), min_size=1, max_size=5),
    taus=st.lists(st.integers(0, 20), min_size=5, max_size=5),
    lr=st.floats(0.01, 3.0),
)
def test_the_step_is_the_papers(g, deltas, taus, lr):
    """x + eta_g (1/K) sum_i (1 + tau_i)^-1/2 Delta_i (Algorithm 1), integer layers kept."""
    x = [np.array(g, dtype=np.float64), np.array([3, 4], dtype=np.int64)]
    k = len(deltas)
    w = [(1 + t) ** -0.5 for t in taus[:k]]
    ds = [[np.array(d), np.array([9, 9])] for d in deltas]
    new = buffered_step(x, ds, w, lr)
    want = x[0] + lr * sum(wi * np.array(d) for wi, d in zip(w, deltas, strict=True)) / k
    np.testing.assert_allclose(new[0], want, rtol=1e-9, atol=1e-9)
    assert new[1].tolist() == [3, 4]


def test_bad_settings_and_combinations_are_refused():
    with pytest.raises(ValueError):
        buffered_step([np.zeros(1)], [], [], 1.0)
    with pytest.raises(ConfigError, match="event-driven|stale"):
        compose("strategy=fedbuff privacy=central_dp")
    with pytest.raises(ConfigError):
        compose("strategy=fedbuff secure=ckks")
    compose("strategy=fedbuff hetero=both compression=int8 attack=label_flip")


# -- runs on the clock ---------------------------------------------------------------------------
CREDIT = (
    "task=credit partition=iid partition.num_partitions=12 clients_per_round=6 "
    "eval_clients_per_round=0 checkpoint=false train.local_epochs=1"
)


def _run(tmp_path, extra: str) -> dict:
    from fedapp.cli.inline import run_inline

    out = run_inline(f"{CREDIT} {extra}", tmp_path / extra.replace(" ", "_").replace("=", "-"))
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_fedbuff_steps_every_k_updates_with_staleness_weights(tmp_path, data_dir):
    res = _run(tmp_path, "strategy=fedbuff strategy.buffer_size=3 hetero=both rounds=4")
    fedasync = _run(tmp_path, "strategy=fedasync hetero=both rounds=4")
    entries = []
    for r in res["rounds"][1:]:
        ok = [c for c in r["clients"] if c["phase"] == "train" and c["status"] == "ok"]
        entries += ok
        assert r["aggregated"] and r["aggregation"]["server_steps"] >= 1
        assert r["aggregation"]["server_steps"] <= len(ok) // 3 + 1
    steps = sum(r["aggregation"]["server_steps"] for r in res["rounds"][1:])
    buffered = res["rounds"][-1]["aggregation"]["buffered"]
    assert steps * 3 + buffered == len(entries)  # every accepted update is in a step or waiting
    for c in entries:
        assert c["staleness_weight"] == pytest.approx((1 + c["staleness"]) ** -0.5)
        assert c["weight"] == pytest.approx(c["staleness_weight"] / 3)
    assert any(c["staleness"] > 0 for c in entries)
    # matched concurrency: the same clients dispatched at the same simulated times as FedAsync
    assert [r["num_sampled"] for r in res["rounds"]] == [
        r["num_sampled"] for r in fedasync["rounds"]
    ]
    assert res["rounds"][1]["sim_time_s"] == fedasync["rounds"][1]["sim_time_s"]
    assert res["rounds"][-1]["test_roc_auc"] > 0.65  # it learned something


@pytest.mark.slow
def test_a_killed_fedbuff_run_resumes_bit_for_bit(tmp_path, data_dir):
    """The buffer, the bases of the trainings in flight and the flights themselves cross the
    checkpoint."""
    from fedapp.cli.inline import run_inline
    from tests.test_resume import SMALL, _kill_after, _same_run

    overrides = f"{SMALL} strategy=fedbuff strategy.buffer_size=2 hetero=both"
    full = run_inline(overrides, tmp_path / "full")
    _kill_after(overrides, tmp_path / "killed", k=2)
    resumed = run_inline(f"{overrides} resume={tmp_path / 'killed'}")
    _same_run(full, resumed)


def test_one_overflowing_update_does_not_discard_the_buffer():
    """A finite float32 update near 3e38 makes the buffered step overflow (here with a server
    step of 5): it is left out and the honest updates still move the model (as their own
    step would)."""
    from strategies.fedbuff import finite_step

    x = [np.zeros(2, dtype=np.float32)]
    honest = [(1.0, [np.array([1.0, 1.0])]), (1.0, [np.array([3.0, 3.0])])]
    hostile = (1.0, [np.array([3e38, 3e38])])
    assert not np.all(
        np.isfinite(buffered_step(x, [d for _, d in [*honest, hostile]], [1] * 3, 5.0)[0])
    )
    new, dropped = finite_step(x, [honest[0], hostile, honest[1]], 5.0)
    assert dropped == 1 and new[0].dtype == np.float32
    np.testing.assert_allclose(new[0], buffered_step(x, [d for _, d in honest], [1, 1], 5.0)[0])
    new, dropped = finite_step(x, [hostile], 5.0)
    assert dropped == 1 and np.array_equal(new[0], x[0])
