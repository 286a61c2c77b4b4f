"""MOON: the contrastive term as a pure function, its hook in the local loop, and a run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedapp.cli.inline import run_inline
from strategies.moon import MoonHook, Representation, contrastive_loss
from tasks.training import TrainSettings, train_classifier


def test_contrastive_loss_is_log2_when_previous_and_global_agree():
    z = torch.randn(5, 4)
    g = torch.randn(5, 4)
    assert contrastive_loss(z, g, g, 0.5).item() == pytest.approx(math.log(2))


def test_contrastive_loss_prefers_the_global_representation():
    g, prev = torch.randn(6, 8), torch.randn(6, 8)
    near_global = contrastive_loss(g + 0.01 * torch.randn(6, 8), g, prev, 0.5)
    near_previous = contrastive_loss(prev + 0.01 * torch.randn(6, 8), g, prev, 0.5)
    assert near_global < math.log(2) < near_previous
    # the paper's formula, written out for one sample
    z = torch.randn(1, 8)
    expected = -math.log(
        math.exp(nn.functional.cosine_similarity(z, g[:1]).item() / 0.5)
        / (
            math.exp(nn.functional.cosine_similarity(z, g[:1]).item() / 0.5)
            + math.exp(nn.functional.cosine_similarity(z, prev[:1]).item() / 0.5)
        )
    )
    assert contrastive_loss(z, g[:1], prev[:1], 0.5).item() == pytest.approx(expected, rel=1e-5)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def test_representation_is_the_input_of_the_last_linear_layer():
    model = _model(0)
    tap = Representation(model)
    x = torch.randn(4, 6)
    model(x)
    torch.testing.assert_close(tap.value, torch.relu(model[0](x)))
    tap.remove()
    assert not model[2]._forward_pre_hooks  # noqa: SLF001 - the hook is gone


def test_a_local_step_follows_the_gradient_of_loss_plus_mu_times_the_term():
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
    previous, mu, lr = _model(1), 3.0, 0.1
    moon = _model(0)
    hook = MoonHook(mu, 0.5, previous.state_dict())
    settings = TrainSettings(batch_size=8, lr=lr, max_steps=1, seed=0)
    train_classifier(moon, data, settings, hooks=[hook])
    hook.finish()
    # the same step by hand
    ref, glob = _model(0), _model(0)
    taps = [Representation(m) for m in (ref, glob, previous)]
    x, y = data.tensors
    logits = ref(x)
    with torch.no_grad():
        glob(x), previous(x)
    z, z_glob, z_prev = (t.value for t in taps)
    loss = nn.functional.cross_entropy(logits, y) + mu * contrastive_loss(z, z_glob, z_prev, 0.5)
    loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= lr * p.grad
    for p, q in zip(moon.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    assert not any(m._forward_pre_hooks for m in moon.modules())  # noqa: SLF001 - removed


def test_without_a_previous_model_the_term_has_no_gradient():
    data = TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    settings = TrainSettings(batch_size=8, lr=0.1, seed=0)
    free, moon = _model(0), _model(0)
    train_classifier(free, data, settings)
    hook = MoonHook(5.0, 0.5, None)
    train_classifier(moon, data, settings, hooks=[hook])
    for p, q in zip(free.parameters(), moon.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_moon_equals_fedavg_in_round_one_and_differs_after(tmp_path, data_dir):
    common = (
        "task=credit partition=dirichlet partition.alpha=0.5 partition.num_partitions=4 "
        "clients_per_round=4 eval_clients_per_round=0 rounds=2 checkpoint=false "
        "train.local_epochs=1"
    )
    losses = {}
    for name in ("fedavg", "moon"):
        out = run_inline(f"{common} strategy={name}", tmp_path / name)
        res = json.loads((out / "results.json").read_text())
        losses[name] = [r["test_loss"] for r in res["rounds"]]
    # round 1: no client has a previous model yet, so the term is log 2 with no gradient
    # (equal up to the rounding of adding and removing its two opposite gradient halves)
    assert losses["moon"][1] == pytest.approx(losses["fedavg"][1], rel=1e-5)
    # then the previous models pull
    assert losses["moon"][2] != pytest.approx(losses["fedavg"][2], rel=1e-3)
