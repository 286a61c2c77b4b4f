"""Local training loop: hooks (FedProx's proximal term), settings transport, divergence handling."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from strategies.fedprox import ProximalHook
from tasks.training import (
    TrainHook,
    TrainSettings,
    evaluate_classifier,
    proximal_term,
    train_classifier,
)


def _data(n=256, d=8, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    return TensorDataset(x, (x @ w).argmax(1))


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def _distance(a: nn.Module, b: nn.Module) -> float:
    return float(
        sum((p - q).pow(2).sum() for p, q in zip(a.parameters(), b.parameters(), strict=True))
    )


def test_proximal_term_is_squared_distance():
    m, g = _model(0), _model(1)
    expected = _distance(m, g)
    assert float(proximal_term(m, [p.detach() for p in g.parameters()])) == pytest.approx(
        expected, rel=1e-5
    )
    assert float(proximal_term(m, [p.detach() for p in m.parameters()])) == 0.0


def test_proximal_term_keeps_local_model_near_global():
    data = _data()
    start = _model()
    free, prox = _model(), _model()
    train_classifier(free, data, TrainSettings(local_epochs=5, lr=0.1))
    train_classifier(prox, data, TrainSettings(local_epochs=5, lr=0.1), hooks=[ProximalHook(5.0)])
    assert _distance(prox, start) < 0.5 * _distance(free, start)


def test_proximal_gradient_is_added():
    # Two SGD steps by hand: the 2nd step carries mu * (w - w_global) in its gradient.
    data = TensorDataset(torch.randn(4, 8), torch.tensor([0, 1, 2, 0]))
    mu, lr = 0.7, 0.05
    model = _model()
    train_classifier(
        model, data, TrainSettings(local_epochs=2, batch_size=4, lr=lr), hooks=[ProximalHook(mu)]
    )
    ref = _model()
    w0 = [p.detach().clone() for p in ref.parameters()]
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(2):
        ref.zero_grad()
        loss = loss_fn(ref(data.tensors[0]), data.tensors[1]) + 0.5 * mu * proximal_term(ref, w0)
        loss.backward()
        with torch.no_grad():
            for p in ref.parameters():
                p -= lr * p.grad
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_settings_roundtrip_through_config_record_keys():
    s = TrainSettings(local_epochs=3, max_steps=7, batch_size=16, lr=0.2, momentum=0.5, seed=5)
    cfg = s.to_config()
    assert cfg["local-epochs"] == 3 and cfg["max-steps"] == 7
    assert TrainSettings.from_config({**cfg, "proximal-mu": 0.5}) == s  # other keys ignored


def test_steps_per_round_counts_batches_and_respects_the_cap():
    assert TrainSettings(batch_size=10, local_epochs=2).steps_per_round(95) == 20
    assert TrainSettings(batch_size=10, local_epochs=2, max_steps=7).steps_per_round(95) == 7


class _Recorder(TrainHook):
    def __init__(self):
        self.calls = []

    def start(self, model, device):
        self.calls.append("start")

    def extra_loss(self, model, xb, yb, logits):
        self.calls.append("loss")
        return logits.sum() * 0.0 + 1.0  # a constant: changes the loss, not the gradients

    def after_backward(self, model):
        self.calls.append("backward")
        for p in model.parameters():
            p.grad.zero_()  # no step at all


def test_hooks_are_called_in_order_and_can_change_gradients():
    model, hook = _model(), _Recorder()
    before = [p.detach().clone() for p in model.parameters()]
    out = train_classifier(model, _data(n=16), TrainSettings(batch_size=8), hooks=[hook])
    assert hook.calls == ["start", "loss", "backward", "loss", "backward"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert out["train_steps"] == 2.0


def test_max_steps_caps_local_work():
    out = train_classifier(
        _model(), _data(), TrainSettings(local_epochs=10, batch_size=8, max_steps=3)
    )
    assert out["train_steps"] == 3 and out["train_samples_seen"] == 24


def test_training_is_reproducible_for_a_seed():
    a, b = _model(), _model()
    train_classifier(a, _data(), TrainSettings(seed=3))
    train_classifier(b, _data(), TrainSettings(seed=3))
    assert _distance(a, b) == 0.0


def test_divergence_raises_instead_of_returning_nan():
    model = _model()
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="diverged"):
        train_classifier(model, _data(), TrainSettings())


def test_training_improves_accuracy():
    data, model = _data(), _model()
    before = evaluate_classifier(model, data, num_classes=3)["accuracy"]
    train_classifier(model, data, TrainSettings(local_epochs=20, lr=0.1))
    assert evaluate_classifier(model, data, num_classes=3)["accuracy"] > before + 0.3
