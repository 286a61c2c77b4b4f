"""Strategies: one module per strategy, each a thin Flower strategy over pure functions.

`build_strategy` is in `strategies.factory`; the package itself imports nothing, so that the
pure-NumPy `strategies.aggregation` loads where Flower is not installed (bench/throughput.py).
"""

from __future__ import annotations

__all__ = ["build_strategy", "FedappStrategyMixin"]


def __getattr__(name: str):
    if name in ("build_strategy", "NOT_ARGUMENTS"):
        from strategies import factory

        return getattr(factory, name)
    if name == "FedappStrategyMixin":
        from strategies.base import FedappStrategyMixin

        return FedappStrategyMixin
    raise AttributeError(f"module 'strategies' has no attribute {name!r}")
