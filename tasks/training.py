"""Local training and evaluation loops shared by every task (PyTorch, CPU or GPU)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

DEVICES = "auto, cpu, cuda or cuda:<index>"


def device_name(spec: str | torch.device | None = "auto") -> str:
    """A `device=` setting, normalized (auto, cpu, cuda, cuda:<i>), without touching CUDA;
    anything else is a ValueError naming the choices."""
    name = "auto" if spec is None else str(spec).strip().lower()
    if name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise ValueError(f"device={name} is not one of {DEVICES}")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device of a `device=` setting: `auto` is CUDA when this process sees a GPU,
    else the CPU. `cpu` never touches CUDA. Naming CUDA on a machine without it is an error
    that says what to set, not a silent fallback."""
    name = device_name(spec)
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():  # cuda or cuda:<i>
        raise ValueError(
            f"device={name} but PyTorch sees no CUDA GPU on this machine "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
            "set device=auto or device=cpu"
        )
    index = int(name[5:]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"device={name} but this process sees {torch.cuda.device_count()} GPU(s); "
            "set device=cuda or device=auto"
        )
    return torch.device(name)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Local optimizers (`train.optimizer`): SGD (with `momentum`), or Adam (betas 0.9/0.999; DP-Adam
# under DP-SGD: Opacus clips and noises the gradients, Adam's step is post-processing)
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainSettings:
    """What a client needs to run one round of local training (sent in the round's ConfigRecord).

    Only the knobs of plain local SGD live here; what a strategy or privacy mode adds to the
    loop (proximal and distillation terms, SCAFFOLD's correction, DP-SGD) comes in as
    `TrainHook`s from the client-side units (fedapp/core/units.py)."""

    local_epochs: int = 1
    max_steps: int = 0  # 0 = no cap
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    # Mixed precision of local training: fp32 (none), bf16 or fp16 under torch.autocast; the
    # weights, their updates, evaluation and everything sent stay fp32 (PRECISIONS).
    precision: str = "fp32"
    optimizer: str = "sgd"  # OPTIMIZERS

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"train.precision={self.precision!r}: use one of {', '.join(PRECISIONS)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"train.optimizer={self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}"
            )

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainSettings:
        """Build from a flat mapping (a Flower ConfigRecord); unknown keys are ignored."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            if key in config:
                kwargs[f.name] = type(f.default)(config[key])
        return cls(**kwargs)

    @classmethod
    def from_train_config(cls, train: Mapping[str, Any], seed: int) -> TrainSettings:
        """From the run config's `train:` block (underscored keys) and the run's seed."""
        return cls.from_config(
            {**{str(k).replace("_", "-"): v for k, v in train.items()}, "seed": seed}
        )

    def to_config(self) -> dict[str, Any]:
        """Flat dict with dash-separated keys, ready for a ConfigRecord."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def steps_per_round(self, num_examples: int) -> int:
        """Local optimizer steps one round of this work takes on `num_examples` rows."""
        steps = -(-num_examples // self.batch_size) * max(self.local_epochs, 1)
        return min(steps, self.max_steps) if self.max_steps else steps


class TrainHook:
    """Something a client-side unit adds to the local training loop (all methods optional).

    Called by `train_classifier` in this order: `start` once (after the model is on its
    device), then per step `extra_loss` (terms added to the data loss, in hook order) and
    `after_backward` (gradient changes before the optimizer step), and `finish` at the end.

    Private training (a hook with `privatizes = True`, DP-SGD) replaces the model, optimizer
    and data loader through its `wrap`. Per-sample clipping only sees the gradients of terms
    computed from each sample, so hooks whose term does not depend on the samples (a
    regulariser on the weights, a constant correction) say `sample_independent = True` and
    implement `private_gradient`: under DP-SGD their `extra_loss` and `after_backward` are not
    called, and `private_gradient` adds their gradient after the noise (post-processing).
    """

    privatizes: bool = False
    sample_independent: bool = False

    def start(self, model: nn.Module, device: torch.device) -> None:
        """Called once before the first step."""

    def wrap(self, model: nn.Module, optimizer, loader, after_noise: Sequence[TrainHook]):
        """(model to call, optimizer, batches) for private training (privatizing hooks)."""
        raise NotImplementedError

    def private_gradient(self, model: nn.Module) -> None:
        """Add this term's gradient to `p.grad` after DP-SGD's noise (sample-independent
        hooks)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be used with DP-SGD")

    def finish(self) -> None:
        """Called once after the last step (also when training failed)."""

    def extra_loss(
        self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, logits: torch.Tensor
    ) -> torch.Tensor | None:
        """A term to add to this step's loss (None: nothing)."""
        return None

    def after_backward(self, model: nn.Module) -> None:
        """Change the gradients before the optimizer step."""


def proximal_term(model: nn.Module, global_params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Return ||w - w_global||^2 over the model's trainable parameters."""
    terms = [
        (p - g).pow(2).sum()
        for p, g in zip(model.parameters(), global_params, strict=True)
        if p.requires_grad
    ]
    return torch.stack(terms).sum()


def distillation_term(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 KL(softmax(teacher/T) || softmax(student/T)), batch mean (Hinton et al., 2015)."""
    return (t * t) * nn.functional.kl_div(
        nn.functional.log_softmax(student / t, dim=1),
        nn.functional.log_softmax(teacher / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )


def not_true_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits without each row's true class: shape (batch, classes - 1)."""
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[torch.arange(len(labels)), labels] = False
    return logits[keep].view(len(labels), logits.shape[1] - 1)


def seeded_generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(int(seed) % (2**63))
    return gen


def train_classifier(
    model: nn.Module,
    dataset: Dataset,
    settings: TrainSettings,
    loss_fn: nn.Module | None = None,
    device: str | torch.device = "cpu",
    hooks: Sequence[TrainHook] = (),
) -> dict[str, float]:
    """Run local SGD on `dataset`; return train loss (data term only), steps and seconds.

    `hooks` (from the client-side units) add loss terms and change gradients, see
    `TrainHook`. Raises ``FloatingPointError`` if the loss diverges, so the client reports a
    failure instead of sending NaN weights.
    """
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    device = torch.device(device)
    model.to(device)
    model.train()
    try:
        for hook in hooks:
            hook.start(model, device)
        return _local_sgd(model, dataset, settings, loss_fn, device, hooks)
    finally:
        for hook in hooks:
            hook.finish()
        # Models live on the CPU between calls (serialization, aggregation, units' deltas);
        # only training and evaluation run on the device. A no-op on the CPU.
        model.to("cpu")


class TensorBatches:
    """What `DataLoader(TensorDataset, shuffle=True, generator=g)` yields, batch for batch,
    sliced from whole tensors kept on the training device instead of collated row by row and
    copied to the device batch by batch. This is for GPUs (a small task's rows are copied once
    per call); on the CPU it trains as fast as the DataLoader, within noise
    (bench/results/throughput.md, `--loader both`).

    It draws from `g` exactly as the DataLoader does (torch 2.x, no workers): per epoch one
    int64 base seed, one `randperm` for the order and, once the sampler is exhausted, one more
    `randperm`; so results are bit for bit those of the DataLoader
    (tests/tasks/test_training.py checks it)."""

    def __init__(self, dataset: TensorDataset, batch_size: int, generator, device) -> None:
        self.tensors = [t.to(device) for t in dataset.tensors]
        self.batch_size, self.generator = int(batch_size), generator
        self.n = len(self.tensors[0])

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        g = self.generator
        torch.empty((), dtype=torch.int64).random_(generator=g)  # the DataLoader's base seed
        order = torch.randperm(self.n, generator=g).to(self.tensors[0].device)
        for start in range(0, self.n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield tuple(t[idx] for t in self.tensors)
        torch.randperm(self.n, generator=g)  # RandomSampler's draw for the remainder


def _local_sgd(model, dataset, settings, loss_fn, device, hooks) -> dict[str, float]:
    private = [h for h in hooks if h.privatizes]
    generator = seeded_generator(settings.seed)
    if isinstance(dataset, TensorDataset) and len(dataset) and not private:
        loader = TensorBatches(dataset, settings.batch_size, generator, device)
    else:  # DP-SGD's Poisson loader is built from a DataLoader; other datasets collate rows
        loader = DataLoader(
            dataset,
            batch_size=settings.batch_size,
            shuffle=True,
            generator=generator,
            drop_last=False,
        )
    opt = settings.make_optimizer(model.parameters())
    after_noise = [h for h in hooks if h.sample_independent] if private else []
    in_loop = [h for h in hooks if h not in after_noise]
    forward, batches = model, loader
    for hook in private:
        forward, opt, batches = hook.wrap(model, opt, loader, after_noise)
    amp = MixedPrecision(settings.precision, device, private=bool(private))
    t0 = time.perf_counter()
    steps, seen, loss_sum = 0, 0, 0.0
    epochs = max(settings.local_epochs, 1)
    done = False
    for _ in range(epochs):
        for xb, yb in batches:
            xb, yb = xb.to(device), yb.to(device)
            opt.zero_grad(set_to_none=True)
            with amp.autocast():
                logits = forward(xb)
            if len(yb) == 0:  # Poisson sampling drew no row: a noise-only step (DP-SGD)
                (logits.sum() * 0.0).backward()
                opt.step()
                steps += 1
                continue
            with amp.autocast():
                data_loss = loss_fn(logits, yb)
                loss = data_loss
                for hook in in_loop:
                    extra = hook.extra_loss(model, xb, yb, logits)
                    if extra is not None:
                        loss = loss + extra
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"local training diverged at step {steps} (loss={loss.item()}); "
                    "lower train.lr or check the data"
                )
            amp.backward(loss, opt)  # hooks below see true (unscaled) gradients
            for hook in in_loop:
                hook.after_backward(model)
            amp.step(opt)
            steps += 1
            seen += len(yb)
            loss_sum += float(data_loss.detach()) * len(yb)
            if settings.max_steps and steps >= settings.max_steps:
                done = True
                break
        if done:
            break
    out = {
        "train_loss": loss_sum / max(seen, 1),
        "train_steps": float(steps),
        "train_samples_seen": float(seen),
        "train_time_s": time.perf_counter() - t0,
    }
    if amp.scaler is not None:
        out["train_skipped_steps"] = float(amp.skipped)
    return out


class MixedPrecision:
    """torch.autocast for one local training call, with fp16's loss scaling.

    bf16 has fp32's range, so it needs no scaling. fp16 does: `torch.amp.GradScaler` scales the
    loss, unscales the gradients before the hooks see them (SCAFFOLD's correction is added to
    true gradients) and skips a step whose gradients overflowed, lowering the scale. Skipped
    steps are counted (`train_skipped_steps`), never hidden. DP-SGD clips per-sample gradients
    inside the optimizer, which loss scaling would shift, so fp16 is refused there; bf16 runs
    under Opacus (its per-sample gradients are cast back to fp32 before clipping)."""

    def __init__(self, precision: str, device: torch.device, private: bool = False) -> None:
        self.dtype = PRECISIONS[precision]
        self.device_type = torch.device(device).type
        if precision == "fp16" and private:
            raise ValueError(
                "train.precision=fp16 cannot be combined with DP-SGD (loss scaling changes what "
                "per-sample clipping bounds); use bf16 or fp32"
            )
        self.scaler = torch.amp.GradScaler(self.device_type) if precision == "fp16" else None
        self.skipped = 0

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor, opt) -> None:
        if self.scaler is None:
            loss.backward()
            return
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(opt)

    def step(self, opt) -> None:
        if self.scaler is None:
            opt.step()
            return
        scale = self.scaler.get_scale()
        self.scaler.step(opt)
        self.scaler.update()
        self.skipped += int(self.scaler.get_scale() < scale)  # update() lowers it on overflow


@torch.no_grad()
def predict_logits(
    model: nn.Module, dataset: Dataset, batch_size: int = 512, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Return (logits, labels) for a whole dataset."""
    model.to(device)
    model.eval()
    outs, labels = [], []
    try:
        if isinstance(dataset, TensorDataset):  # slices, not row-by-row collation
            x, y = dataset.tensors[0], dataset.tensors[1]
            batches = (
                (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)
            )
        else:
            batches = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for xb, yb in batches:
            outs.append(model(xb.to(device)).float().cpu())
            labels.append(yb)
    finally:
        model.to("cpu")
    if not outs:
        return np.zeros((0, 0), dtype=np.float32), np.zeros((0,), dtype=np.int64)
    return torch.cat(outs).numpy(), torch.cat(labels).numpy()


def evaluate_classifier(
    model: nn.Module,
    dataset: Dataset,
    num_classes: int,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
) -> dict:
    """Every metric of `tasks.metrics.classification_report` plus `num_examples`."""
    from tasks.metrics import classification_report  # scikit-learn: only when evaluating

    logits, labels = predict_logits(model, dataset, batch_size, device)
    out = classification_report(logits, labels, num_classes)
    out["num_examples"] = float(len(labels))
    return out
