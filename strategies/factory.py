"""Build the configured strategy (`cfg.strategy`) for a federation of a given size."""

from __future__ import annotations

from logging import WARNING

from flwr.common import log
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from strategies.base import FedappStrategyMixin, aggregate_scalar_metrics

__all__ = ["build_strategy", "FedappStrategyMixin"]

# Keys of a strategy's config that are not constructor arguments.
NOT_ARGUMENTS = ("name", "deadline_s")  # deadline_s: the round timeout the ServerApp uses


def build_strategy(cfg: DictConfig, num_nodes: int) -> FedappStrategyMixin:
    """Instantiate `cfg.strategy` (its `_target_` with the other keys as arguments; a YAML
    takes run-level values by interpolation, e.g. `momentum: ${train.momentum}`) with
    sampling sizes fitted to `num_nodes` clients."""
    scfg = OmegaConf.to_container(cfg.strategy, resolve=True)
    assert isinstance(scfg, dict)
    if not scfg.get("_target_"):
        raise ValueError(f"strategy config '{cfg.strategy.get('name')}' has no _target_")
    cls = get_class(scfg["_target_"])
    if not issubclass(cls, FedappStrategyMixin):
        raise TypeError(f"{scfg['_target_']} must derive from strategies.base.FedappStrategyMixin")
    for key in NOT_ARGUMENTS:
        scfg.pop(key, None)
    cpr = int(cfg.clients_per_round)
    ecpr = int(cfg.eval_clients_per_round)
    if cpr > num_nodes:
        log(WARNING, "clients_per_round=%d > %d clients; sampling all of them", cpr, num_nodes)
        cpr = num_nodes
    ecpr = min(ecpr, num_nodes)
    return instantiate(
        scfg,
        fraction_train=cpr / num_nodes,
        min_train_nodes=cpr,
        fraction_evaluate=ecpr / num_nodes,
        min_evaluate_nodes=ecpr,
        min_available_nodes=cpr,
        train_metrics_aggr_fn=aggregate_scalar_metrics,
        evaluate_metrics_aggr_fn=aggregate_scalar_metrics,
        _convert_="all",
    )
