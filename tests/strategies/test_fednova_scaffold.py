"""FedNova and SCAFFOLD: their math as pure functions, the gradient correction in the local
loop, and the known equalities with FedAvg end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from fedapp.cli.inline import run_inline
from strategies.fednova import effective_steps, fednova_aggregate
from strategies.scaffold import (
    CorrectionHook,
    client_control_update,
    client_correction,
    server_control_update,
)
from tasks.training import TrainSettings, train_classifier


def test_effective_steps():
    assert effective_steps(7) == 7.0
    rho, tau = 0.9, 5
    expected = (tau - rho * (1 - rho**tau) / (1 - rho)) / (1 - rho)
    assert effective_steps(tau, rho) == pytest.approx(expected)
    assert effective_steps(1, 0.9) == pytest.approx(1.0)  # one step moves lr * g either way
    with pytest.raises(ValueError):
        effective_steps(0)
    with pytest.raises(ValueError):
        effective_steps(3, 1.0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 50), st.data())
def test_fednova_with_equal_steps_is_fedavg(k, tau, data):
    g = np.array(
        data.draw(st.lists(st.floats(-5, 5, width=32), min_size=3, max_size=3)), np.float32
    )
    clients = [
        [
            np.array(
                data.draw(st.lists(st.floats(-5, 5, width=32), min_size=3, max_size=3)), np.float32
            )
        ]
        for _ in range(k)
    ]
    n = data.draw(st.lists(st.integers(1, 1000), min_size=k, max_size=k))
    out = fednova_aggregate([g], clients, n, [tau] * k)
    expected = np.average(np.stack([c[0] for c in clients]).astype(np.float64), axis=0, weights=n)
    np.testing.assert_allclose(out[0], expected, rtol=1e-5, atol=1e-4)


def test_fednova_normalises_by_local_steps():
    # equal data, client A took 1 step and moved by 1, client B took 4 steps and moved by 4:
    # the same per-step direction; FedAvg lands at 2.5, FedNova at tau_eff * 1 = 2.5 too, but with
    # B moving 2 (per-step 0.5) FedNova weights the per-step progress, not the raw distance.
    x = [np.zeros(1)]
    out = fednova_aggregate(x, [[np.array([1.0])], [np.array([2.0])]], [1, 1], [1, 4])
    tau_eff = 2.5
    assert out[0][0] == pytest.approx(tau_eff * (0.5 * 1.0 + 0.5 * 0.5))
    fedavg = 1.5
    assert out[0][0] != pytest.approx(fedavg)


def test_scaffold_control_updates():
    names = ["w"]
    x, y = {"w": np.array([1.0, 1.0])}, {"w": np.array([0.5, 1.5])}
    new, delta = client_control_update(names, {}, {}, x, y, steps=5, lr=0.1)
    np.testing.assert_allclose(new["w"], (x["w"] - y["w"]) / 0.5)
    np.testing.assert_allclose(delta["w"], new["w"])  # c_i was zero
    c = {"w": np.array([1.0, 0.0])}
    new2, delta2 = client_control_update(names, c, new, x, y, steps=5, lr=0.1)
    np.testing.assert_allclose(new2["w"], new["w"] - c["w"] + (x["w"] - y["w"]) / 0.5)
    np.testing.assert_allclose(delta2["w"], new2["w"] - new["w"])
    srv = server_control_update(
        {"w": np.array([1.0, 1.0])}, [{"w": np.ones(2)}, {"w": 3 * np.ones(2)}], 8
    )
    np.testing.assert_allclose(srv["w"], 1.0 + 4.0 / 8)
    corr = client_correction(["w"], {"w": (2,)}, {"w": np.array([1.0, 2.0])}, {})
    np.testing.assert_allclose(corr[0], [1.0, 2.0])
    with pytest.raises(ValueError):
        client_control_update(names, {}, {}, x, y, steps=0, lr=0.1)


def test_local_steps_follow_the_corrected_gradient():
    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    settings_ = TrainSettings(batch_size=8, lr=0.5, max_steps=1, seed=1)
    base = nn.Linear(3, 2)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    a.load_state_dict(base.state_dict())
    b.load_state_dict(base.state_dict())
    corr = [torch.full((2, 3), 0.2), torch.full((2,), -0.4)]
    train_classifier(a, ds, settings_)
    train_classifier(b, ds, settings_, hooks=[CorrectionHook(corr)])
    torch.testing.assert_close(b.weight - a.weight, -0.5 * corr[0])
    torch.testing.assert_close(b.bias - a.bias, -0.5 * corr[1])


EQUAL = (
    "task=credit partition=iid partition.num_partitions=6 clients_per_round=6 rounds=2 "
    "eval_clients_per_round=0 checkpoint=false train.max_steps=4"
)


def _losses(tmp_path, strategy):
    out = run_inline(f"{EQUAL} strategy={strategy}", tmp_path / strategy)
    res = json.loads((out / "results.json").read_text())
    return res, [r["test_loss"] for r in res["rounds"]]


def test_fednova_and_scaffold_reduce_to_fedavg_where_the_papers_say(tmp_path, data_dir):
    base, fedavg = _losses(tmp_path, "fedavg")
    res, fednova = _losses(tmp_path, "fednova")
    assert all(c["train_steps"] == 4 for r in res["rounds"][1:] for c in r["clients"])
    assert fednova == pytest.approx(fedavg, rel=1e-5)  # every client took 4 steps
    res, scaffold = _losses(tmp_path, "scaffold")
    assert scaffold[1] == pytest.approx(fedavg[1], rel=1e-6)  # zero control variates in round 1
    assert scaffold[2] != pytest.approx(fedavg[2], rel=1e-6)  # then the corrections act
    r2 = res["rounds"][2]
    # control-variate changes travel with the models: about twice FedAvg's upload
    assert r2["num_replies"] == 6 and r2["bytes_up"] > base["rounds"][2]["bytes_up"] * 1.5
