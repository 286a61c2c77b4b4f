"""The one-run canary audit (fedapp.features.audit, Steinke, Nasr and Jagielski 2023): the bound's math,
and the audit of a client's DP-SGD without DP, with DP, and with reproducible noise."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedapp.checks import compose
from fedapp.features.audit import canary_audit, canary_epsilon_bound, canary_p_value, canary_plan
from tasks.dp_sgd import SEEDED_NOISE_ENV

# medical: ~200 training rows per hospital, 7 steps per epoch; 5 rounds keep the audit fast
MEDICAL = "task=medical rounds=5"


@st.composite
def counts(draw):
    m = draw(st.integers(2, 400))
    r = draw(st.integers(1, m))
    v = draw(st.integers(0, r - 1))
    return m, r, v


@settings(max_examples=60, deadline=None)
@given(counts(), st.sampled_from([0.0, 1e-5, 1e-3]), st.sampled_from([0.01, 0.05]))
def test_more_correct_guesses_never_lower_the_bound(mrv, delta, beta):
    m, r, v = mrv
    assert canary_epsilon_bound(m, r, v + 1, delta, beta) >= canary_epsilon_bound(
        m, r, v, delta, beta
    )


@settings(max_examples=60, deadline=None)
@given(counts(), st.floats(0, 10))
def test_p_value_is_a_probability_that_grows_with_delta(mrv, eps):
    m, r, v = mrv
    low, high = canary_p_value(m, r, v, eps, 0.0), canary_p_value(m, r, v, eps, 1e-3)
    assert 0.0 <= low <= high <= 1.0


def test_all_correct_without_delta_matches_the_closed_form():
    # P[all r right] = q^r under eps-DP: rejected while q^r < beta, q = e^eps / (1 + e^eps)
    q = 0.05 ** (1 / 1000)
    assert canary_epsilon_bound(1000, 1000, 1000, 0.0) == pytest.approx(math.log(q / (1 - q)), 1e-6)
    assert canary_epsilon_bound(1000, 1000, 500, 1e-5) == 0.0  # guessing refutes nothing
    assert canary_epsilon_bound(1000, 1000, 1000, 1e-5) < canary_epsilon_bound(1000, 1000, 1000, 0)


def test_without_dp_the_bound_is_large():
    report = canary_audit(canary_plan(compose(MEDICAL)), canaries=500)
    assert report["claimed_epsilon"] is None and report["noise_multiplier"] == 0.0
    assert report["epsilon_lower_bound"] > 3


@pytest.mark.parametrize("eps", [1.0, 3.0, 8.0])
def test_with_dp_the_bound_stays_below_the_claim(eps):
    plan = canary_plan(compose(f"{MEDICAL} privacy=sample_dp privacy.target_epsilon={eps}"))
    assert plan.claimed_epsilon == eps and plan.noise_multiplier > 0.5
    report = canary_audit(plan, canaries=500)
    assert report["epsilon_lower_bound"] < eps and not report["flagged"]


@pytest.mark.parametrize("eps", [1.0, 3.0])
def test_reproducible_noise_subtracted_is_flagged(eps, monkeypatch):
    """The test-only fault: noise seeded from the run seed (the insecure test mode), which the
    auditor regenerates and subtracts; the bound then exceeds the claim."""
    monkeypatch.setenv(SEEDED_NOISE_ENV, "1")
    plan = canary_plan(compose(f"{MEDICAL} privacy=sample_dp privacy.target_epsilon={eps}"))
    report = canary_audit(plan, canaries=500)
    assert report["flagged"] and report["epsilon_lower_bound"] > eps
    assert report["best"]["attack"] == "seed_replay"
    monkeypatch.delenv(SEEDED_NOISE_ENV)
    honest = canary_audit(plan, canaries=500)  # the same plan with secret noise: no flag
    assert not honest["flagged"]


def test_fedapp_audit_reports_the_bound_beside_the_claim(tmp_path, data_dir, capsys, monkeypatch):
    """A run folder as a run leaves it (an untrained model: the canary audit reads only the
    run's config), audited from the command line."""
    import json

    import torch
    from omegaconf import OmegaConf

    from fedapp.features.audit import main
    from tasks import get_task

    monkeypatch.setenv("TQDM_DISABLE", "1")
    cfg = compose(MEDICAL)
    task = get_task(cfg, data_dir)
    prep = task.aggregate_stats(
        [task.client_stats(task.load_partition(p)) for p in range(task.num_partitions())]
    )
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (tmp_path / "preprocessing.json").write_text(json.dumps(prep))
    torch.save(task.make_model().state_dict(), tmp_path / "final_model.pt")
    assert main([str(tmp_path), "--members", "60", "--canaries", "300", "--client", "1"]) == 0
    canary = json.loads((tmp_path / "audit.json").read_text())["canary"]
    assert canary["client"] == 1 and canary["canaries"] == 300
    assert canary["claimed_epsilon"] is None and canary["epsilon_lower_bound"] > 2  # no DP
    assert "canary audit of client 1: epsilon >=" in capsys.readouterr().out
