"""fedapp-tune: the search's accounting (Papernot and Steinke 2022, against dp_accounting), the
per-trial epsilon meeting the target, selection on validation rows only, and the written
overrides composing into a run."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedapp.checks import compose
from fedapp.cli import tune as tune_mod
from fedapp.cli.tune import (
    ORDERS,
    Accounting,
    repeat_and_select_rdp,
    search_epsilon,
    tune,
    validation_score,
)
from fedapp.core.config import ConfigError
from fedapp.features.privacy import epsilon_of

# one client's run: the statistics release, then 2000 DP-SGD steps at sample rate 0.01
HISTORY = [(3.0, 1.0, 1), (0.9, 0.01, 2000)]


@pytest.mark.parametrize("mean", [1.0, 3.0, 10.0])
def test_the_search_total_exceeds_one_trial_and_matches_dp_accounting(mean):
    from dp_accounting import (
        ComposedDpEvent,
        GaussianDpEvent,
        PoissonSampledDpEvent,
        SelfComposedDpEvent,
    )
    from dp_accounting.dp_event import RepeatAndSelectDpEvent
    from dp_accounting.rdp import RdpAccountant

    trial = ComposedDpEvent(
        [
            GaussianDpEvent(3.0),
            SelfComposedDpEvent(PoissonSampledDpEvent(0.01, GaussianDpEvent(0.9)), 2000),
        ]
    )
    accountant = RdpAccountant(ORDERS)
    accountant.compose(RepeatAndSelectDpEvent(trial, mean, math.inf))
    total = search_epsilon([HISTORY], mean, 1e-5)
    assert total == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-4)
    assert total > epsilon_of(HISTORY, 1e-5)  # a single trial, as the clients account it


@settings(max_examples=50, deadline=None)
@given(st.floats(0.3, 20), st.floats(1, 50), st.floats(0, 10))
def test_repeating_costs_more_the_more_trials(sigma, mean, more):
    rdp = np.array([a / (2 * sigma**2) for a in ORDERS])  # the Gaussian mechanism's RDP
    once = repeat_and_select_rdp(ORDERS, rdp, mean)
    assert np.all(once >= rdp - 1e-12)
    assert np.all(repeat_and_select_rdp(ORDERS, rdp, mean + more) >= once - 1e-12)


def test_a_mixture_of_settings_costs_at_least_its_worst_setting():
    other = [(3.0, 1.0, 1), (1.2, 0.05, 400)]
    both = search_epsilon([HISTORY, other], 10, 1e-5)
    assert both >= max(search_epsilon([HISTORY], 10, 1e-5), search_epsilon([other], 10, 1e-5))


class GaussianAccounting(Accounting):
    """One client releasing one Gaussian per trial at noise c / per_trial (no config needed)."""

    def __init__(self, mean: float) -> None:  # noqa: D107 (no compose: the histories are given)
        self.mean, self.delta = mean, 1e-5

    def histories(self, per_trial: float):
        return {0: [[(4.0 / per_trial, 1.0, 1)]]}


@pytest.mark.parametrize("target", [3.0, 8.0])
def test_the_per_trial_epsilon_meets_the_target_and_no_larger_one_does(target):
    accounting = GaussianAccounting(mean=10)
    per_trial, totals = accounting.per_trial_epsilon(target)
    assert 0 < per_trial < target and totals[0] <= target
    step = target / 2**7
    assert max(accounting.totals(per_trial + 2 * step).values()) > target


class Recording(dict):
    """A results.json round that records which keys the tuner reads."""

    read: set[str] = set()

    def __getitem__(self, key):
        Recording.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        Recording.read.add(key)
        return super().get(key, default)


def _fake_runner(test_values: dict[str, float]):
    """Trials whose validation loss is the learning rate's distance to 0.1 and whose test
    metrics are `test_values[lr]` (absurd: they say the opposite)."""

    def run(overrides, out):
        lr = next(o.split("=")[1] for o in overrides if o.startswith("train.lr="))
        rnd = Recording(
            round=1,
            client_loss=abs(float(lr) - 0.1),
            test_loss=test_values[lr],
            test_roc_auc=-test_values[lr],
            test_accuracy=-test_values[lr],
        )
        return {"rounds": [Recording(round=0, test_loss=0.0), rnd], "final": {"test_loss": 0}}

    return run


class FakeAccounting:
    def __init__(self, base, space, mean):
        self.delta = 1e-5

    def per_trial_epsilon(self, target):
        return target / 3, {0: target * 0.99}

    def histories(self, per_trial):
        return {0: [[(4.0 / per_trial, 1.0, 1)]]}


SPACE = {"train.lr": ["0.01", "0.1", "0.5"], "privacy.max_grad_norm": ["0.5", "2.0"]}


def test_the_choice_reads_validation_rows_only_and_ignores_absurd_test_metrics(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(tune_mod, "Accounting", FakeAccounting)
    Recording.read = set()
    base = ["task=medical", "rounds=2"]
    honest = tune(
        base,
        SPACE,
        8.0,
        10,
        tmp_path / "a",
        trials=12,
        runner=_fake_runner({"0.01": 1.0, "0.1": 2.0, "0.5": 3.0}),
    )
    hostile = tune(
        base,
        SPACE,
        8.0,
        10,
        tmp_path / "b",
        trials=12,
        runner=_fake_runner({"0.01": -1e9, "0.1": 1e9, "0.5": float("nan")}),
    )
    assert honest["chosen"]["settings"]["train.lr"] == "0.1"
    assert hostile["chosen"]["settings"] == honest["chosen"]["settings"]
    assert not {k for k in Recording.read if k.startswith("test")}, Recording.read
    with pytest.raises(Exception, match="validation metrics only"):
        validation_score({"rounds": []}, "test_roc_auc")


def test_the_written_overrides_compose_into_a_run(tmp_path, monkeypatch):
    monkeypatch.setattr(tune_mod, "Accounting", FakeAccounting)
    report = tune(
        ["task=medical", "rounds=2"],
        SPACE,
        6.0,
        10,
        tmp_path,
        trials=4,
        runner=_fake_runner({"0.01": 0, "0.1": 0, "0.5": 0}),
    )
    lines = (tmp_path / "best_overrides.txt").read_text().split()
    cfg = compose(lines)
    chosen = report["chosen"]["settings"]
    assert cfg.task.name == "medical" and cfg.privacy.name == "sample_dp"
    assert cfg.train.lr == float(chosen["train.lr"])
    assert cfg.privacy.max_grad_norm == float(chosen["privacy.max_grad_norm"])
    assert cfg.privacy.target_epsilon == pytest.approx(report["per_trial_epsilon"], rel=1e-5)
    assert report["total_epsilon"] <= 6.0


@pytest.mark.slow
def test_a_real_search_on_the_federation(tmp_path):
    """Two real inline trials on the hospitals: the totals meet the target per client and
    exceed a single trial's epsilon; the chosen trial has a run folder."""
    space = {"train.lr": ["0.05", "0.2"], "train.batch_size": ["32"]}
    report = tune(["task=medical", "rounds=2"], space, 8.0, 10, tmp_path, trials=2)
    assert report["total_epsilon"] <= 8.0 < report["per_trial_epsilon"] * 3
    assert report["single_trial_epsilon"] < report["total_epsilon"]
    assert all(e <= 8.0 for e in report["total_epsilon_per_client"].values())
    assert (tmp_path / "trials" / "000" / "results.json").exists()
    for trial in report["trials"]:  # the clients' own ledgers agree with the plan
        assert 0 < trial["spent_epsilon"] <= report["per_trial_epsilon"] * 1.01
    assert math.isfinite(report["chosen"]["validation_score"])


def test_the_space_may_not_vary_what_the_accounting_plans():
    from fedapp.cli.tune import SCOPE, parse_space

    assert parse_space(["train.lr=0.1,0.2", "privacy.max_grad_norm=0.5,1"]) == {
        "train.lr": ["0.1", "0.2"],
        "privacy.max_grad_norm": ["0.5", "1"],
    }
    for bad in (
        "privacy.target_epsilon=50",
        "rounds=2,20",
        "clients_per_round=2,4",
        "privacy=none",
    ):
        with pytest.raises(ConfigError, match="--space"):
            parse_space([bad])
    assert "sees every trial" in SCOPE
