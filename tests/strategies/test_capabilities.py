"""Every registered strategy's declared capabilities (`schedules_rounds`, `aggregation_rule`,
strategies.base.FedappStrategyMixin) say what its code does: the cross-feature checks read
the declarations, this test reads the code."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.serverapp.strategy import FedAvg
from hydra.utils import get_class
from omegaconf import OmegaConf

from fedapp.features.privacy import central_dp_refusal
from strategies.base import FedappStrategyMixin

CONF = Path(__file__).resolve().parents[2] / "conf" / "strategy"
CLASSES = sorted({str(OmegaConf.load(p)._target_) for p in CONF.glob("*.yaml")})
RULES = (
    "weighted_mean",
    "normalized_mean",
    "robust",
    "fair",
    "data_dependent",
    "personal",
    "server_optimizer",
)


@pytest.mark.parametrize("target", CLASSES)
def test_declared_capabilities_match_the_code(target):
    cls = get_class(target)
    # a strategy that schedules its own work replaces the round loop's training round (the
    # event-driven scheduler's round on the clock, strategy=synthetic's sharing round)
    assert cls.schedules_rounds == (cls.train_round is not FedappStrategyMixin.train_round)
    assert cls.aggregation_rule in RULES
    own = cls.aggregate_accepted is not FedappStrategyMixin.aggregate_accepted
    resolved = next(
        c for c in cls.__mro__ if "aggregate_train" in c.__dict__ and c is not FedappStrategyMixin
    )
    fedavgs = resolved is FedAvg or issubclass(FedAvg, resolved)
    if cls.aggregation_rule == "weighted_mean":
        # Scaffold keeps FedAvg's average of the models (its controls are extra records)
        assert fedavgs and (not own or cls.extra_array_records)
    else:
        assert own or not fedavgs


def test_central_dp_takes_fedavg_fedprox_moon_and_refuses_the_rest():
    ok = {get_class(t).__name__ for t in CLASSES if central_dp_refusal(get_class(t)) is None}
    assert ok == {"FedAvg", "FedProx", "Moon"}
