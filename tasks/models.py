"""Model definitions that import only torch, so that `bench/throughput.py` can build them on a
machine without Flower, Hydra or the dataset libraries."""

from __future__ import annotations

import copy

import torch
from torch import nn

NORMS = ("none", "batch")  # a model's optional normalisation layers (`task.norm`)


class _FloatCounter:
    """BatchNorm whose batch counter is float32, like every other array of the model (an int64
    buffer would be averaged into floats by FedAvg and refused by the update codecs); it only
    counts (the running statistics use `momentum`, never the count)."""

    def _float_counter(self) -> None:
        self.num_batches_tracked = torch.zeros(1)  # shape (1,): codecs keep no 0-d arrays


class BatchNorm2d(_FloatCounter, nn.BatchNorm2d):
    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self._float_counter()


class BatchNorm1d(_FloatCounter, nn.BatchNorm1d):
    """BatchNorm1d that normalises a training batch of one row by its running statistics
    (PyTorch's refuses: one value per channel has no batch variance)."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self._float_counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return nn.functional.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        return super().forward(x)


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ValueError(f"task.norm={norm!r}: use one of {', '.join(NORMS)}")
    return norm


class FemnistCNN(nn.Module):
    """Two 5x5 conv layers + two FC layers (LEAF's FEMNIST CNN when hidden=2048: 6.6M params);
    `norm="batch"` adds BatchNorm after each conv and the hidden FC layer (for FedBN)."""

    def __init__(self, num_classes: int = 62, hidden: int = 2048, norm: str = "none") -> None:
        super().__init__()
        batch = check_norm(norm) == "batch"

        def bn(layer: nn.Module) -> list[nn.Module]:
            return [layer] if batch else []

        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2),
            *bn(BatchNorm2d(32)),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            *bn(BatchNorm2d(64)),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(7 * 7 * 64, hidden),
            *bn(BatchNorm1d(hidden)),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DPFemnistCNN(nn.Module):
    """A small CNN for DP-SGD (28k parameters for 62 classes): two strided convolutions and
    two FC layers with tanh activations, the MNIST architecture of Papernot et al. ("Tempered
    Sigmoid Activations for Deep Learning with Differential Privacy", 2021) and Opacus' MNIST
    example. DP-SGD's noise has one coordinate per parameter, so a model 40x smaller than
    cnn_small keeps far more signal per step at the same noise multiplier; bounded
    activations keep the clipped gradients informative. No normalisation layers (BatchNorm
    mixes samples, which per-sample clipping forbids)."""

    def __init__(self, num_classes: int = 62, norm: str = "none") -> None:
        super().__init__()
        if check_norm(norm) != "none":
            raise ValueError("task.model=cnn_dp has no normalisation layers; use task.norm=none")
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 8, stride=2, padding=3),
            nn.Tanh(),
            nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, stride=2),
            nn.Tanh(),
            nn.MaxPool2d(2, 1),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 32),
            nn.Tanh(),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS = {
    # 6.6M parameters (Caldas et al., 2018)
    "leaf_cnn": lambda n, norm="none": FemnistCNN(n, hidden=2048, norm=norm),
    # 1.2M parameters, practical on CPU
    "cnn_small": lambda n, norm="none": FemnistCNN(n, hidden=352, norm=norm),
    # 28k parameters, tanh: for sample-level DP (DPFemnistCNN)
    "cnn_dp": DPFemnistCNN,
}


class Fenda(nn.Module):
    """FENDA-FL's model (Tian et al., "FENDA-FL: Personalized Federated Learning on
    Heterogeneous Clinical Datasets", 2022): a local and a global feature extractor, each a
    copy of the base model's body (all but its last linear layer), and a classifier head on
    their concatenated features. Federated: `global_extractor`; kept by the client: `local_extractor`
    and `head` (strategy=fenda, strategies/personal.py)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
        if not names:
            raise ValueError("FENDA needs a model whose last layer is linear")
        head: nn.Linear = base.get_submodule(names[-1])
        body = copy.deepcopy(base)
        parent, _, leaf = names[-1].rpartition(".")
        setattr(body.get_submodule(parent) if parent else body, leaf, nn.Identity())
        self.global_extractor = body
        self.local_extractor = copy.deepcopy(body)
        self.head = nn.Linear(2 * head.in_features, head.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.local_extractor(x), self.global_extractor(x)], dim=1))


def with_extractors(model: nn.Module, fenda: bool) -> nn.Module:
    """`task.fenda`: the model as FENDA's two extractors and a head, else as it is."""
    return Fenda(model) if fenda else model
