"""The label-histogram budget split of the statistics release (fedapp.features.privacy.split_stats_noise,
privatize_stats, private_stats): the split composes to exactly the one release the ledger records,
and on a wide table the histogram's noise shrinks by the expected factor."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from fedapp.features import privacy
from fedapp.features.privacy import (
    PrivacyError,
    PrivacySpec,
    epsilon_of,
    gaussian_noise_multiplier,
    load_ledger,
    private_stats,
    privatize_stats,
    split_stats_noise,
)

SIGMAS = st.floats(0.1, 100.0, allow_nan=False)
WIDTHS = st.integers(1, 500)
SHARES = st.floats(0.001, 0.999, allow_nan=False)


def _multipliers(sigma: float, d: int, share: float | None) -> tuple[float, float]:
    """The two parts' noise multipliers (std over L2 sensitivity: sqrt(3 d) and 1)."""
    sums_std, labels_std = split_stats_noise(sigma, d, share)
    return sums_std / math.sqrt(3 * d), labels_std


@settings(max_examples=200, deadline=None)
@given(SIGMAS, WIDTHS, SHARES)
def test_the_split_spends_exactly_the_recorded_release(sigma, d, share):
    s_sums, s_labels = _multipliers(sigma, d, share)
    # zCDP (and RDP at every order, and GDP's mu^2) add up: 1/(2 s1^2) + 1/(2 s2^2) = 1/(2 s^2)
    assert 1 / s_sums**2 + 1 / s_labels**2 == pytest.approx(1 / sigma**2, rel=1e-9)
    # the histogram's share of rho is `share`
    assert (1 / s_labels**2) / (1 / sigma**2) == pytest.approx(share, rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(SIGMAS, WIDTHS)
def test_no_split_is_the_one_mechanism_of_before(sigma, d):
    sums_std, labels_std = split_stats_noise(sigma, d, None)
    assert sums_std == labels_std == sigma * math.sqrt(3 * d + 1)
    # which is the split that gives the histogram 1/(3d+1) of the budget
    split = split_stats_noise(sigma, d, 1 / (3 * d + 1))
    assert split == pytest.approx((sums_std, labels_std), rel=1e-9)


@settings(max_examples=100, deadline=None)
@given(SIGMAS, WIDTHS, SHARES, SHARES)
def test_a_larger_share_lowers_the_histograms_noise_and_raises_the_sums(sigma, d, f1, f2):
    lo, hi = sorted((f1, f2))
    s_lo, l_lo = split_stats_noise(sigma, d, lo)
    s_hi, l_hi = split_stats_noise(sigma, d, hi)
    assert l_hi <= l_lo and s_hi >= s_lo


@pytest.mark.parametrize("share", [0.0, 1.0, -0.5, 2.0])
def test_a_share_outside_zero_one_is_refused(share):
    with pytest.raises(PrivacyError, match="stats_label_share"):
        split_stats_noise(1.0, 4, share)
    with pytest.raises(PrivacyError, match="stats_label_share"):
        PrivacySpec.from_config({"name": "sample_dp", "stats_label_share": share})


def test_the_default_share_is_the_configs():
    yaml = OmegaConf.load(Path(__file__).parents[2] / "conf" / "privacy" / "sample_dp.yaml")
    assert PrivacySpec().stats_label_share == yaml.stats_label_share == 0.25


@pytest.mark.parametrize("share", [0.05, 0.25, 0.5])
def test_an_independent_accountant_composes_the_two_parts_to_the_same_epsilon(share):
    """Google's dp_accounting (RDP and PLD), not the code's own: the sums' and the histogram's
    Gaussian mechanisms composed spend what the one release at sigma does, and the ledger's
    Opacus RDP epsilon of (sigma, 1.0, 1) is that."""
    from dp_accounting import ComposedDpEvent, GaussianDpEvent
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    sigma = gaussian_noise_multiplier(0.8, 1e-5)  # stats_share 0.1 of epsilon 8
    s_sums, s_labels = _multipliers(sigma, 64, share)
    both = ComposedDpEvent([GaussianDpEvent(s_sums), GaussianDpEvent(s_labels)])
    one = GaussianDpEvent(sigma)
    for make in (RdpAccountant, lambda: PLDAccountant(value_discretization_interval=1e-4)):
        split_eps = make().compose(both).get_epsilon(1e-5)
        one_eps = make().compose(one).get_epsilon(1e-5)
        assert split_eps == pytest.approx(one_eps, rel=2e-3)
    assert epsilon_of([(sigma, 1.0, 1)], 1e-5) == pytest.approx(0.8, abs=0.011)
    assert RdpAccountant().compose(both).get_epsilon(1e-5) == pytest.approx(0.8, rel=0.03)


def _draws(d: int, share: float | None, n: int = 300) -> dict[str, np.ndarray]:
    stats = {
        "stats.count": [1000.0] * d,
        "stats.sum": [100.0] * d,
        "stats.sumsq": [900.0] * d,
        "stats.labels": [960.0, 40.0],
    }
    out = [privatize_stats(stats, 25.0, 5.0, seed, share) for seed in range(n)]
    return {k: np.array([o[k] for o in out]) - np.array(stats[k]) for k in stats}


def test_on_a_bankruptcy_wide_table_the_positive_counts_noise_shrinks_by_the_expected_factor():
    d = 64
    before, after = _draws(d, None), _draws(d, 0.25)
    factor = math.sqrt(3 * d + 1) / math.sqrt(1 / 0.25)  # sqrt(193) / 2 = 6.95
    assert factor == pytest.approx(6.946, abs=1e-3)
    positive_before = before["stats.labels"][:, 1].std()
    positive_after = after["stats.labels"][:, 1].std()
    assert positive_before == pytest.approx(5.0 * math.sqrt(3 * d + 1), rel=0.12)
    assert positive_after == pytest.approx(5.0 * 2.0, rel=0.12)
    assert positive_before / positive_after == pytest.approx(factor, rel=0.2)
    # the sums pay for it, by 1 / sqrt(1 - 0.25) = 1.155 (a little less than the 3d+1 -> 3d)
    grow = after["stats.sum"].std() / before["stats.sum"].std()
    assert grow == pytest.approx(
        math.sqrt(3 * d) / math.sqrt(0.75) / math.sqrt(3 * d + 1), rel=0.03
    )
    assert after["stats.sum"].std() == pytest.approx(5.0 * math.sqrt(3 * d / 0.75) * 25.0, rel=0.03)


def test_the_client_release_uses_the_configs_share_and_records_one_release(monkeypatch):
    """private_stats: the noise of each part follows privacy.stats_label_share, and the ledger
    records the release once, at the combined multiplier (so the run's total is unchanged)."""
    seen = []
    real = privacy.privatize_stats

    def spy(stats, clip, sigma, seed, share=None):
        seen.append((sigma, share))
        return real(stats, clip, sigma, seed, share)

    monkeypatch.setattr(privacy, "privatize_stats", spy)
    d = 64
    stats = {
        "stats.count": [100.0] * d,
        "stats.sum": [10.0] * d,
        "stats.sumsq": [90.0] * d,
        "stats.labels": [96.0, 4.0],
    }
    task = SimpleNamespace(client_stats=lambda data, clip=None: stats, natural_ids=lambda pid: [])
    cfg = OmegaConf.create(
        {
            "seed": 0,
            "privacy": {"name": "sample_dp", "target_epsilon": 8.0, "stats_label_share": 0.4},
        }
    )
    node = SimpleNamespace(cfg=cfg, task=task, data=None, partition_id=0)
    context = SimpleNamespace(state=RecordDict(), node_config={}, run_config={}, run_id=1)
    private_stats(node, context)
    ledger = load_ledger(context.state, None)
    sigma = gaussian_noise_multiplier(0.8, 1e-5)
    assert seen == [(pytest.approx(sigma), 0.4)]
    assert ledger.history == [(pytest.approx(sigma), 1.0, 1)]
    assert ledger.epsilon() == pytest.approx(0.8, abs=0.011)
