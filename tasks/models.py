"""Model definitions that import only torch, so that `bench/throughput.py` can build them on a
machine without Flower, Hydra or the dataset libraries."""

from __future__ import annotations

import torch
from torch import nn


class FemnistCNN(nn.Module):
    """Two 5x5 conv layers + two FC layers (LEAF's FEMNIST CNN when hidden=2048: 6.6M params)."""

    def __init__(self, num_classes: int = 62, hidden: int = 2048) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(7 * 7 * 64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


MODELS = {
    "leaf_cnn": lambda n: FemnistCNN(n, hidden=2048),  # 6.6M parameters (Caldas et al., 2018)
    "cnn_small": lambda n: FemnistCNN(n, hidden=352),  # 1.2M parameters, practical on CPU
}
