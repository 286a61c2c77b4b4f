"""Local training loop: hooks (FedProx's proximal term), settings transport, divergence handling."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from strategies.fedprox import ProximalHook
from tasks.training import (
    TensorBatches,
    TrainHook,
    TrainSettings,
    evaluate_classifier,
    proximal_term,
    resolve_device,
    seeded_generator,
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


# --- device selection and the tensor-batch fast path (issue 19) ------------------------------
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 70),
    batch=st.integers(1, 32),
    epochs=st.integers(1, 3),
    seed=st.integers(0, 2**31),
)
def test_tensor_batches_are_the_dataloaders_batches(n, batch, epochs, seed):
    x, y = torch.arange(n * 2, dtype=torch.float32).view(n, 2), torch.arange(n)
    data = TensorDataset(x, y)
    fast = TensorBatches(data, batch, seeded_generator(seed), "cpu")
    slow = DataLoader(data, batch_size=batch, shuffle=True, generator=seeded_generator(seed))
    assert len(fast) == len(slow)
    for _ in range(epochs):  # the generator's state carries over epochs in both
        got, want = list(fast), list(slow)
        assert len(got) == len(want)
        for (gx, gy), (wx, wy) in zip(got, want, strict=True):
            assert torch.equal(gx, wx) and torch.equal(gy, wy)


class _Rows(Dataset):
    """The same rows behind a plain Dataset, so training takes the DataLoader path."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


@pytest.mark.parametrize("epochs,max_steps", [(3, 0), (4, 50)])
def test_the_fast_path_trains_bit_for_bit_like_the_dataloader(epochs, max_steps):
    data = _data(n=100)
    fast, slow = _model(), _model()
    work = TrainSettings(local_epochs=epochs, max_steps=max_steps, batch_size=7, seed=11)
    out_fast = train_classifier(fast, data, work)
    out_slow = train_classifier(slow, _Rows(data), work)
    assert _distance(fast, slow) == 0.0
    assert out_fast["train_loss"] == out_slow["train_loss"]
    assert out_fast["train_steps"] == out_slow["train_steps"]


def test_auto_is_the_cpu_without_cuda_and_never_initializes_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert not torch.cuda.is_initialized()


def test_cpu_does_not_even_ask_for_cuda(monkeypatch):
    def boom():
        raise AssertionError("device=cpu asked CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", boom)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


def test_auto_takes_the_gpu_when_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_naming_cuda_without_a_gpu_says_what_to_set(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="set device=auto or device=cpu"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="set device=auto or device=cpu"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="sees 1 GPU"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match="not one of"):
        resolve_device("tpu")


# --- mixed precision of local training (issue 19) ---------------------------------------------
def test_bf16_trains_under_autocast_close_to_fp32_and_keeps_fp32_weights():
    data = _data()
    full, mixed = _model(), _model()
    a = train_classifier(full, data, TrainSettings(local_epochs=5, lr=0.1, seed=2))
    b = train_classifier(
        mixed, data, TrainSettings(local_epochs=5, lr=0.1, seed=2, precision="bf16")
    )
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    assert _distance(full, mixed) > 0.0  # autocast did change the arithmetic
    # ... but not the outcome: same data order, losses within bf16's ~3 significant digits
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.05)
    acc = [evaluate_classifier(m, data, num_classes=3)["accuracy"] for m in (full, mixed)]
    assert abs(acc[0] - acc[1]) <= 0.03
    assert "train_skipped_steps" not in b


class _Overflow(TrainHook):
    """A loss term whose gradient on the fp16 logits (times the loss scale) is beyond fp16."""

    def extra_loss(self, model, xb, yb, logits):
        return 1e5 * logits.float().sum()


def test_fp16_skips_and_counts_steps_whose_gradients_overflow():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    out = train_classifier(
        model,
        _data(),
        TrainSettings(batch_size=8, max_steps=3, precision="fp16"),
        hooks=[_Overflow()],
    )
    assert out["train_steps"] == 3 and out["train_skipped_steps"] == 3
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    fine = train_classifier(
        _model(), _data(), TrainSettings(batch_size=8, max_steps=3, precision="fp16")
    )
    assert fine["train_skipped_steps"] == 0


class _SeesGradients(TrainHook):
    def __init__(self):
        self.norms = []

    def after_backward(self, model):
        self.norms.append(float(sum(p.grad.float().norm() ** 2 for p in model.parameters()) ** 0.5))


def test_fp16_hooks_see_unscaled_gradients():
    seen = {}
    for precision in ("fp32", "fp16"):
        hook = _SeesGradients()
        train_classifier(
            _model(),
            _data(),
            TrainSettings(batch_size=8, max_steps=1, precision=precision),
            hooks=[hook],
        )
        seen[precision] = hook.norms[0]
    # the loss scale is 65536: a scaled gradient would be off by that factor, not by rounding
    assert seen["fp16"] == pytest.approx(seen["fp32"], rel=0.02)


def test_unknown_precision_and_fp16_under_dp_sgd_are_refused():
    from tasks.training import MixedPrecision

    with pytest.raises(ValueError, match="precision"):
        TrainSettings(precision="fp8")
    with pytest.raises(ValueError, match="DP-SGD"):
        MixedPrecision("fp16", torch.device("cpu"), private=True)
    s = TrainSettings(precision="bf16")
    assert TrainSettings.from_config(s.to_config()) == s


def test_settings_from_the_run_configs_train_block():
    from fedapp.core.config import compose

    cfg = compose(["train.lr=0.2", "train.max_steps=7", "train.precision=bf16"])
    s = TrainSettings.from_train_config(cfg.train, 5)
    assert s == TrainSettings(
        local_epochs=int(cfg.train.local_epochs),
        max_steps=7,
        batch_size=int(cfg.train.batch_size),
        lr=0.2,
        momentum=float(cfg.train.momentum),
        weight_decay=float(cfg.train.weight_decay),
        seed=5,
        precision="bf16",
    )


# --- train.optimizer: SGD or (DP-)Adam --------------------------------------------------------------
def test_adam_is_a_local_optimizer_and_an_unknown_one_is_refused():
    with pytest.raises(ValueError, match="train.optimizer"):
        TrainSettings(optimizer="lbfgs")
    s = TrainSettings(optimizer="adam", lr=0.01)
    assert TrainSettings.from_config(s.to_config()) == s
    assert isinstance(s.make_optimizer(_model().parameters()), torch.optim.Adam)
    assert isinstance(TrainSettings().make_optimizer(_model().parameters()), torch.optim.SGD)
    # a different optimizer takes different steps from the same start and batches
    a, b = _model(), _model()
    train_classifier(a, _data(), TrainSettings(lr=0.01))
    train_classifier(b, _data(), TrainSettings(lr=0.01, optimizer="adam"))
    assert _distance(a, b) > 1e-6
    data, model = _data(), _model()
    before = evaluate_classifier(model, data, num_classes=3)["accuracy"]
    train_classifier(model, data, TrainSettings(local_epochs=20, lr=0.01, optimizer="adam"))
    assert evaluate_classifier(model, data, num_classes=3)["accuracy"] > before + 0.3


def test_dp_adam_clips_and_noises_before_adams_step():
    """Under DP-SGD, Opacus' optimizer wraps Adam: every step is counted by the DP hook, and
    clipping at 0.1 with noise moves the model elsewhere than a clip that never binds without
    noise, from the same start and the same Poisson batches (seeded)."""
    from tasks.dp_sgd import DPSGDHook

    settings = TrainSettings(optimizer="adam", lr=0.01, batch_size=16, seed=1)
    noisy, clean = _model(), _model()
    train_classifier(noisy, _data(n=64), settings, hooks=[DPSGDHook(1.0, 0.1, seed=7)])
    hook = DPSGDHook(0.0, 1e6, seed=7)
    out = train_classifier(clean, _data(n=64), settings, hooks=[hook])
    assert hook.steps == out["train_steps"] > 0
    assert _distance(noisy, clean) > 1e-4  # clipping at 0.1 and noise changed the steps


def test_the_dp_femnist_model_is_small_and_refuses_batch_norm():
    from tasks.models import MODELS

    model = MODELS["cnn_dp"](62)
    assert sum(p.numel() for p in model.parameters()) < 30_000
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 62)
    with pytest.raises(ValueError, match="normalisation"):
        MODELS["cnn_dp"](62, norm="batch")
