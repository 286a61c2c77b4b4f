"""Strategies: one module per strategy, each a thin Flower strategy over pure functions."""

from __future__ import annotations

from logging import WARNING

from flwr.common.logger import log
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from strategies.base import FedappStrategyMixin, aggregate_scalar_metrics

__all__ = ["build_strategy", "FedappStrategyMixin"]


def build_strategy(cfg: DictConfig, num_nodes: int) -> FedappStrategyMixin:
    """Instantiate `cfg.strategy._target_` with sampling sizes fitted to `num_nodes` clients."""
    scfg = OmegaConf.to_container(cfg.strategy, resolve=True)
    assert isinstance(scfg, dict)
    target = scfg.pop("_target_", None)
    scfg.pop("name", None)
    scfg.pop("deadline_s", None)  # read by the ServerApp: the round timeout it passes to start()
    if not target:
        raise ValueError(f"strategy config '{cfg.strategy.get('name')}' has no _target_")
    cls = get_class(target)
    if not issubclass(cls, FedappStrategyMixin):
        raise TypeError(f"{target} must derive from strategies.base.FedappStrategyMixin")
    cpr = int(cfg.clients_per_round)
    ecpr = int(cfg.eval_clients_per_round)
    if cpr > num_nodes:
        log(WARNING, "clients_per_round=%d > %d clients; sampling all of them", cpr, num_nodes)
        cpr = num_nodes
    ecpr = min(ecpr, num_nodes)
    common = {
        "fraction_train": cpr / num_nodes,
        "min_train_nodes": cpr,
        "fraction_evaluate": ecpr / num_nodes,
        "min_evaluate_nodes": ecpr,
        "min_available_nodes": cpr,
        "train_metrics_aggr_fn": aggregate_scalar_metrics,
        "evaluate_metrics_aggr_fn": aggregate_scalar_metrics,
    }
    return cls.from_config(cfg, scfg, common)
