"""DP-SGD around the local training loop (Opacus), importing only torch and Opacus.

`fedapp.privacy` plans and accounts the budget and builds `DPSGDHook` for each round; the hook
lives here, beside `tasks.training`, so that `bench/throughput.py` can time private training on
a machine that has PyTorch and Opacus but not Flower.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from tasks.training import TrainHook

# Opacus' hooks warn on every backward through a first layer whose input needs no gradient.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def opacus(module: str = "opacus"):
    """Import an Opacus module. Opacus calls `logging.basicConfig` when it is first imported,
    which would print every Flower log line twice; the root logger is put back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        return importlib.import_module(module)
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


class NotPrivatizable(ValueError):
    """The model has layers Opacus cannot compute per-sample gradients for."""


class PrivateStep:
    """A DPOptimizer's step with the sample-independent gradient terms (proximal, SCAFFOLD's
    correction) added after clipping and noise, where they cost no privacy."""

    def __init__(self, optimizer, model: nn.Module, after_noise: Sequence[TrainHook]) -> None:
        self.optimizer, self.model, self.after_noise = optimizer, model, list(after_noise)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none)

    def step(self) -> None:
        if self.optimizer.pre_step():  # clip per sample, add noise, scale, account
            for hook in self.after_noise:
                hook.private_gradient(self.model)
            self.optimizer.original_optimizer.step()


class DPSGDHook(TrainHook):
    """Opacus' DP-SGD around the local training loop; counts the steps it takes."""

    privatizes = True

    def __init__(self, noise_multiplier: float, max_grad_norm: float, seed: int) -> None:
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.seed = int(seed)
        self.steps = 0
        self.sample_rate = 0.0

    def wrap(self, model: nn.Module, optimizer, loader, after_noise: Sequence[TrainHook]):
        GradSampleModule = opacus().GradSampleModule
        DPDataLoader = opacus("opacus.data_loader").DPDataLoader
        DPOptimizer = opacus("opacus.optimizers").DPOptimizer
        errors = opacus("opacus.validators").ModuleValidator.validate(model, strict=False)
        if errors:
            raise NotPrivatizable(
                f"the model cannot be trained with DP-SGD ({errors[0]}); use a model without "
                "BatchNorm (GroupNorm instead)"
            )
        private_loader = DPDataLoader.from_data_loader(loader)  # Poisson, the loader's generator
        self.sample_rate = 1.0 / len(loader)
        self.gsm = GradSampleModule(model)
        # The noise comes from a seeded generator on the model's device (Opacus draws it with
        # `torch.normal(..., device=grad.device, generator=...)`), so a GPU run is seeded too.
        device = next(model.parameters()).device
        noise = torch.Generator(device=device).manual_seed(self.seed % (2**63))
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=loader.batch_size,
            generator=noise,
        )
        dp_optimizer.attach_step_hook(self._count)
        return self.gsm, PrivateStep(dp_optimizer, model, after_noise), private_loader

    def _count(self, optimizer) -> None:
        self.steps += 1

    def finish(self) -> None:
        if hasattr(self, "gsm"):
            self.gsm.cleanup()
