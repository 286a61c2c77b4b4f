"""Pieces of update arithmetic shared by the scoring strategies (trust, contribution): a
weighted aggregate of client models with per-client clipping, flattening, and the score of an
update's norm relative to the round's. Pure NumPy, tested without Flower."""

from __future__ import annotations

import math
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


def finite_layers(arrays: Sequence[np.ndarray]) -> bool:
    """Whether every floating layer of `arrays` is finite (integer layers always are)."""
    return all(
        bool(np.all(np.isfinite(a)))
        for a in arrays
        if np.issubdtype(np.asarray(a).dtype, np.floating)
    )


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


def _require_decay(what: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {value}")


def _require_rate(what: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be finite and positive, got {value}")


def check_server_step(momentum: float, learning_rate: float) -> None:
    """The settings of `server_momentum_step`: momentum in [0, 1), a finite positive rate."""
    _require_decay("server momentum", momentum)
    _require_rate("server learning rate", learning_rate)


def server_momentum_step(
    global_arrays: Sequence[np.ndarray],
    aggregate: Sequence[np.ndarray],
    buffer: list[np.ndarray] | None,
    momentum: float,
    learning_rate: float,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Server SGD with momentum on an aggregate (FedAvgM's step, Hsu et al. 2019, with any
    strategy's aggregate in place of FedAvg's mean): u_t = momentum u_{t-1} + (x_t - a_t),
    u_1 = x_1 - a_1, and x_{t+1} = x_t - learning_rate u_t. Returns (x_{t+1}, u_t).

    Floating layers only, the momentum kept in float64 and the new layer in the global
    model's dtype; integer layers take the aggregate's value. Every floating layer gets the
    step, BatchNorm's running statistics included (as under Flower's FedAvgM). momentum 0 and
    learning_rate 1 give the aggregate itself, bit for bit. Written here rather than taken from
    Flower's FedAvgM because that class computes its own (sample-weighted) mean: the step is two
    lines, the aggregate is the strategy's."""
    check_server_step(momentum, learning_rate)
    new: list[np.ndarray] = []
    velocity: list[np.ndarray] = []
    for i, (g, a) in enumerate(zip(global_arrays, aggregate, strict=True)):
        if not np.issubdtype(g.dtype, np.floating):
            new.append(np.array(a, copy=True))
            velocity.append(np.zeros(np.shape(g)))
            continue
        delta = np.asarray(g, np.float64) - np.asarray(a, np.float64)
        u = delta if buffer is None else momentum * buffer[i] + delta
        velocity.append(u)
        if momentum == 0.0 and learning_rate == 1.0:
            new.append(np.array(a, dtype=g.dtype, copy=True))
        else:
            new.append((np.asarray(g, np.float64) - learning_rate * u).astype(g.dtype))
    return new, velocity


def check_server_adam(eta: float, beta_1: float, beta_2: float, tau: float) -> None:
    """The settings of `server_adam_step`: a finite positive eta and tau, betas in [0, 1)."""
    _require_rate("server Adam's eta", eta)
    _require_decay("server Adam's beta_1", beta_1)
    _require_decay("server Adam's beta_2", beta_2)
    _require_rate("server Adam's tau", tau)


def server_adam_step(
    global_arrays: Sequence[np.ndarray],
    aggregate: Sequence[np.ndarray],
    moments: tuple[list[np.ndarray], list[np.ndarray]] | None,
    t: int,
    eta: float,
    beta_1: float,
    beta_2: float,
    tau: float,
) -> tuple[list[np.ndarray], tuple[list[np.ndarray], list[np.ndarray]]]:
    """Adam on the server with an aggregate as its target (FedAdam's step, Reddi et al. 2021,
    with any strategy's aggregate in place of FedAvg's mean): the pseudo-gradient
    d_t = a_t - x_t, m_t = beta_1 m_{t-1} + (1 - beta_1) d_t, v_t = beta_2 v_{t-1} +
    (1 - beta_2) d_t^2 (m_0 = v_0 = 0), and x_{t+1} = x_t + eta_t m_t / (sqrt(v_t) + tau) with
    Adam's bias correction eta_t = eta sqrt(1 - beta_2^t) / (1 - beta_1^t), as Flower's FedAdam
    (which counts t as server_round + 1: pass that to take the same steps). Returns
    (x_{t+1}, (m_t, v_t)).

    Floating layers only, the moments in float64 and the new layer in the global model's dtype;
    integer layers take the aggregate's value. Written here rather than taken from Flower's
    FedAdam because that class computes its own (sample-weighted) mean."""
    check_server_adam(eta, beta_1, beta_2, tau)
    if t < 1:
        raise ValueError(f"Adam's step count starts at 1, got {t}")
    if moments is not None:
        m_in, v_in = moments
        shapes = [np.shape(g) for g in global_arrays]
        if [np.shape(m) for m in m_in] != shapes or [np.shape(v) for v in v_in] != shapes:
            raise ValueError(
                "server Adam's moments do not match the model's layers (a checkpoint of "
                "another model?): start a fresh run, or resume the one they came from"
            )
    eta_t = eta * math.sqrt(1.0 - beta_2**t) / (1.0 - beta_1**t)
    new: list[np.ndarray] = []
    first: list[np.ndarray] = []
    second: list[np.ndarray] = []
    for i, (g, a) in enumerate(zip(global_arrays, aggregate, strict=True)):
        if not np.issubdtype(g.dtype, np.floating):
            new.append(np.array(a, copy=True))
            first.append(np.zeros(np.shape(g)))
            second.append(np.zeros(np.shape(g)))
            continue
        x = np.asarray(g, np.float64)
        d = np.asarray(a, np.float64) - x
        m_prev, v_prev = (0.0, 0.0) if moments is None else (moments[0][i], moments[1][i])
        m = beta_1 * m_prev + (1.0 - beta_1) * d
        v = beta_2 * v_prev + (1.0 - beta_2) * d * d
        first.append(m)
        second.append(v)
        new.append((x + eta_t * m / (np.sqrt(v) + tau)).astype(g.dtype))
    return new, (first, second)
