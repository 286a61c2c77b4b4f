"""Pieces of update arithmetic shared by the scoring strategies (trust, contribution): a
weighted aggregate of client models with per-client clipping, flattening, and the score of an
update's norm relative to the round's. Pure NumPy, tested without Flower."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sanity_scores(ratio: np.ndarray, low: float, high: float) -> np.ndarray:
    """1 inside [low, high]; ratio/low below (0 for a zero update); high/ratio above."""
    out = np.ones_like(ratio, dtype=np.float64)
    if low > 0:
        below = ratio < low
        out[below] = ratio[below] / low
    above = ratio > high
    out[above] = high / ratio[above]
    return out


def weighted_aggregate(
    global_arrays: Sequence[np.ndarray],
    client_arrays: Sequence[Sequence[np.ndarray]],
    weights: np.ndarray,
    clip: np.ndarray,
) -> list[np.ndarray]:
    """sum_k weights_k * (w + clip_k (w_k - w)), layer by layer, in each layer's dtype.

    Unclipped clients enter with their own arrays (no w + (w_k - w) round trip) and the sum is
    accumulated as Flower's FedAvg does, so equal trust reproduces FedAvg exactly.
    """
    out: list[np.ndarray] = []
    for i, g in enumerate(global_arrays):
        acc = None
        for w_k, p, c in zip(client_arrays, weights, clip, strict=True):
            layer = w_k[i]
            if c < 1.0 and np.issubdtype(layer.dtype, np.floating):
                layer = (g + c * (layer - g)).astype(layer.dtype)
            term = layer * float(p)
            acc = term if acc is None else acc + term
        out.append(np.asarray(acc).astype(g.dtype) if acc is not None else g.copy())
    return out


def flatten(arrays: Sequence[np.ndarray], floats_only: bool = True) -> np.ndarray:
    """Layers concatenated into one float64 vector; integer buffers skipped unless
    `floats_only` is False."""
    if floats_only:
        parts = [a.ravel() for a in arrays if np.issubdtype(a.dtype, np.floating)]
        return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
