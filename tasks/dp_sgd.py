"""DP-SGD around the local training loop (Opacus), importing only torch and Opacus.

`fedapp.features.privacy` plans and accounts the budget and builds `DPSGDHook` for each round; the hook
lives here, beside `tasks.training`, so that `bench/throughput.py` can time private training on
a machine that has PyTorch and Opacus but not Flower.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
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


# DP noise is secret: every draw of a DP mechanism (DP-SGD's noise and its Poisson sampling, the
# statistics release, the synthetic-data generator's and discriminator's DP-SGD, central DP) comes
# from a generator seeded with 63 bits of fresh operating-system entropy (`secrets`), drawn anew
# for every use and never written anywhere. The server's run seed never reaches it: otherwise
# whoever knows the seed recomputes the noise and subtracts it. The generators themselves are
# PyTorch's (Philox on CUDA, Mersenne Twister on the CPU) and numpy's PCG64: statistical, not
# cryptographic generators, seeded secretly; Opacus' `secure_mode` (which needs torchcsprng, not
# available for our torch) is not used; its floating-point-attack mitigation is (`SECURE_NOISE`).
#
# For tests only, a node may set FEDAPP_INSECURE_SEEDED_DP_NOISE=1 in its own environment (a
# server cannot): the noise is then seeded from the run seed as before, the run is reproducible
# bit for bit, every reply says so (`dp_noise_seeded`) and results.json `meta.privacy` states that
# the guarantee does not hold.
SEEDED_NOISE_ENV = "FEDAPP_INSECURE_SEEDED_DP_NOISE"
# Opacus' mitigation of floating-point attacks on the Gaussian mechanism (Mironov 2012;
# Jin et al. 2021, arXiv 2107.10138): each noise value is a sum of four draws (DPOptimizer's
# `secure_mode`), so its low bits no longer reveal the draw. Measured cost: bench/dp_noise.py.
SECURE_NOISE = True


def seeded_noise() -> bool:
    """Whether this node runs the insecure, seeded-noise test mode (its own environment)."""
    return os.environ.get(SEEDED_NOISE_ENV, "") == "1"


def noise_seed(reproducible: int) -> int:
    """The seed of one DP noise generator: fresh OS entropy, or `reproducible` (derived from
    the run seed) in the insecure test mode only."""
    if seeded_noise():
        return int(reproducible) % (2**63)
    return secrets.randbits(63)


def noise_generator(reproducible: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator for DP noise on `device`, seeded by `noise_seed`."""
    return torch.Generator(device=device).manual_seed(noise_seed(reproducible))


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

    def __init__(
        self,
        noise_multiplier: float,
        max_grad_norm: float,
        seed: int,
        secure_noise: bool = SECURE_NOISE,
    ) -> None:
        """`seed`: only used in the insecure seeded-noise test mode (`noise_seed`)."""
        self.noise_multiplier = float(noise_multiplier)
        self.secure_noise = bool(secure_noise)
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
        # Poisson sampling is part of the mechanism (amplification by subsampling assumes the
        # batches are secret), so it draws from a secret generator too.
        private_loader = DPDataLoader.from_data_loader(
            loader, generator=noise_generator(self.seed ^ 0x5A3)
        )
        self.sample_rate = 1.0 / len(loader)
        self.gsm = GradSampleModule(model)
        # The noise comes from a generator on the model's device (Opacus draws it with
        # `torch.normal(..., device=grad.device, generator=...)`).
        device = next(model.parameters()).device
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=loader.batch_size,
            generator=noise_generator(self.seed, device),
            secure_mode=self.secure_noise,
        )
        dp_optimizer.attach_step_hook(self._count)
        return self.gsm, PrivateStep(dp_optimizer, model, after_noise), private_loader

    def _count(self, optimizer) -> None:
        self.steps += 1

    def finish(self) -> None:
        if hasattr(self, "gsm"):
            self.gsm.cleanup()
