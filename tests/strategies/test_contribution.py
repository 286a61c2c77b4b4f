"""Contribution-aware aggregation: each dimension, the weights, the ledger, and a run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedapp.cli.inline import run_inline
from strategies.contribution import (
    DIMENSIONS,
    Ledger,
    combine,
    contribution_scores,
    direction_scores,
    diversity_scores,
    gain_scores,
    js_divergence,
    leave_one_out,
    score_weights,
    select_temperature,
    volume_scores,
)
from tasks.base import holdout_positions
from tasks.training import distillation_term, not_true_logits

MIX = {d: 1.0 for d in DIMENSIONS}


def test_dimensions_rank_what_they_should():
    assert volume_scores(np.array([10, 1000]))[1] == 1.0
    assert volume_scores(np.array([10, 1000]))[0] < 0.5
    balanced, one_class, mixed = [50, 50, 50], [150, 0, 0], [80, 50, 20]
    d = diversity_scores(np.array([balanced, one_class, mixed], float))
    assert d[0] > d[2] > d[1]
    assert js_divergence(np.array([1.0, 0]), np.array([0, 1.0])) == pytest.approx(1.0)
    assert js_divergence(np.array([1.0, 2]), np.array([2.0, 4])) == pytest.approx(0.0)
    g = gain_scores(np.array([1.0, 1.0, 1.0, 0.0]), np.array([0.5, 1.0, 3.0, 0.0]))
    np.testing.assert_allclose(g, [0.75, 0.5, 0.0, 0.5])  # helped, nothing, hurt, unknown
    u = np.array([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]])
    dirs = direction_scores(u, np.array([1.0, 1.0, 0.2]))
    assert dirs[0] > 0.9 and dirs[2] == 0.0


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.integers(0, 10_000), st.floats(0.05, 5.0))
def test_weights_are_a_distribution_and_follow_the_clients(k, seed, temperature):
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 500, k).astype(float)
    scores = contribution_scores(
        n,
        rng.integers(0, 30, (k, 4)).astype(float),
        rng.uniform(0.5, 1.0, k),
        rng.uniform(0.2, 1.2, k),
        rng.normal(size=(k, 6)),
        marginal=rng.normal(size=k),
    )
    s, w = combine(scores, MIX, n, temperature)
    assert np.all(w > 0) and w.sum() == pytest.approx(1.0)
    perm = rng.permutation(k)
    _, wp = combine({d: v[perm] for d, v in scores.items()}, MIX, n[perm], temperature)
    np.testing.assert_allclose(wp, w[perm], rtol=1e-12)
    # a higher combined score never gets a smaller weight per example
    per_example = w / n
    order = np.argsort(s)
    assert np.all(np.diff(per_example[order]) >= -1e-12)


def test_equal_scores_or_a_huge_temperature_give_fedavg():
    n = np.array([10.0, 30.0, 60.0])
    same = {d: np.full(3, 0.4) for d in DIMENSIONS}
    np.testing.assert_allclose(combine(same, MIX, n, 0.1)[1], n / n.sum())
    varied = {d: np.array([0.1, 0.9, 0.5]) for d in DIMENSIONS}
    np.testing.assert_allclose(combine(varied, MIX, n, 1e9)[1], n / n.sum(), rtol=1e-6)
    with pytest.raises(ValueError):
        combine(varied, {d: 0.0 for d in DIMENSIONS}, n, 1.0)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.integers(0, 10_000))
def test_selected_temperature_is_never_worse_than_fedavg_on_the_server_rows(k, seed):
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 500, k).astype(float)
    s = rng.uniform(0, 1, k)
    xs = rng.normal(size=(k, 3))  # client models; the server loss is a quadratic bowl
    target = rng.normal(size=3)

    def loss(w):
        return float(np.sum((w @ xs - target) ** 2))

    chosen, w, losses = select_temperature(s, n, [0.1, 0.25, 1.0], loss)
    assert set(losses) == {None, 0.1, 0.25, 1.0}
    assert loss(w) == min(losses.values()) <= losses[None]
    np.testing.assert_allclose(w, score_weights(s, n, chosen))
    np.testing.assert_allclose(score_weights(s, n, None), n / n.sum())


def test_temperature_selection_follows_the_server_loss():
    n = np.array([100.0, 100.0, 100.0])
    s = np.array([1.0, 0.0, 0.0])  # client 0 scores best
    xs = np.array([1.0, 0.0, 0.0])
    # the server rows want client 0's model: the sharpest weighting wins
    sharp, w, _ = select_temperature(s, n, [0.1, 1.0], lambda w: (w @ xs - 1.0) ** 2)
    assert sharp == 0.1 and w[0] > 0.99
    # they want the plain average: FedAvg's weights win, and ties go to FedAvg
    flat, w, _ = select_temperature(s, n, [0.1, 1.0], lambda w: (w @ xs - 1 / 3) ** 2)
    assert flat is None and np.allclose(w, 1 / 3)
    tie, _, _ = select_temperature(s, n, [0.1, 1.0], lambda w: 0.0)
    assert tie is None
    # a candidate whose aggregate has a non-finite loss is never chosen
    nan_first, _, _ = select_temperature(s, n, [0.1], lambda w: float("nan") if w[0] < 0.5 else 1.0)
    assert nan_first == 0.1


def test_leave_one_out_matches_its_closed_form_for_a_linear_loss():
    # L(w) = a.w  =>  phi_k = a.(w_-k - w) = p_k a.(w - x_k) / (1 - p_k)
    rng = np.random.default_rng(3)
    a = rng.normal(size=5)
    xs = rng.normal(size=(4, 5))
    n = np.array([10.0, 20.0, 30.0, 40.0])
    p = n / n.sum()
    phi, full = leave_one_out(
        [[x[:2], x[2:]] for x in xs], n, lambda w: float(a @ np.concatenate(w))
    )
    w = p @ xs
    assert full == pytest.approx(a @ w)
    np.testing.assert_allclose(phi, p * ((w - xs) @ a) / (1 - p), rtol=1e-10, atol=1e-12)


def test_leave_one_out_credits_helpers_and_blames_the_harmful():
    target = np.array([1.0, -2.0, 0.5])
    loss = lambda w: float(np.sum((w[0] - target) ** 2))  # noqa: E731
    good = [target + 0.1 * np.array([1, 0, 0]), target + 0.1 * np.array([0, 1, 0]), target]
    bad = [target + np.array([5.0, 5.0, -5.0])]
    phi, _ = leave_one_out([[x] for x in good + bad], np.ones(4), loss)
    assert np.all(phi[:3] > 0) and phi[3] < 0  # removing the poisoner lowers the loss
    # permuting the clients permutes the scores; a lone client scores 0
    perm = [3, 1, 0, 2]
    phi_p, _ = leave_one_out([[x] for x in np.array(good + bad)[perm]], np.ones(4), loss)
    np.testing.assert_allclose(phi_p, phi[perm])
    assert leave_one_out([[target]], np.ones(1), loss)[0].tolist() == [0.0]


@settings(max_examples=40, deadline=None)
@given(st.integers(4, 300), st.floats(0.05, 0.6), st.integers(0, 1000))
def test_holdout_is_a_seeded_stratified_partition(n, fraction, seed):
    labels = np.random.default_rng(seed).integers(0, 3, n)
    val, rest = holdout_positions(labels, fraction, seed)
    assert len(val) > 0 and len(rest) > 0
    assert sorted(np.concatenate([val, rest]).tolist()) == list(range(n))
    again = holdout_positions(labels, fraction, seed)
    assert val.tolist() == again[0].tolist()
    counts = np.bincount(labels, minlength=3)
    if counts.min() >= 2 and 3 <= len(val) <= n - 3:  # stratified: each class ~ its share
        got = np.bincount(labels[val], minlength=3)
        assert np.all(np.abs(got - counts * len(val) / n) <= 1.0 + 1e-9)


def test_holdout_refuses_nonsense():
    with pytest.raises(ValueError):
        holdout_positions(np.zeros(10), 0.0, 0)
    with pytest.raises(ValueError):
        holdout_positions(np.zeros(10), 1.0, 0)


def test_ledger_accumulates_shares(tmp_path):
    ledger = Ledger()
    for w in (0.25, 0.75):
        ledger.add(1, w, {d: 1.0 for d in DIMENSIONS})
    ledger.add(2, 1.0, {d: 0.0 for d in DIMENSIONS})
    rows = {r["partition_id"]: r for r in ledger.table()}
    assert rows[1]["share"] == pytest.approx(0.5) and rows[1]["rounds"] == 2
    assert rows[2]["mean_gain"] == 0.0
    ledger.write(tmp_path)
    assert (tmp_path / "contribution_ledger.csv").read_text().count("\n") == 3
    assert (tmp_path / "contribution_ledger.png").stat().st_size > 0


def test_distillation_term_is_zero_for_the_teacher_itself():
    logits = torch.randn(5, 4)
    assert distillation_term(logits, logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_term(logits, torch.randn(5, 4), 2.0).item() > 0


def test_not_true_distillation_ignores_the_true_class():
    logits = torch.tensor([[5.0, 1.0, 2.0, 3.0], [0.0, 9.0, -1.0, 4.0]])
    labels = torch.tensor([0, 1])
    np.testing.assert_array_equal(
        not_true_logits(logits, labels), [[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]]
    )
    # a teacher that differs only on the true class teaches nothing not-true
    teacher = logits.clone()
    teacher[0, 0], teacher[1, 1] = -7.0, 0.5
    nt = distillation_term(not_true_logits(logits, labels), not_true_logits(teacher, labels), 1.0)
    assert nt.item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_term(logits, teacher, 1.0).item() > 0.1


def test_contribution_run_logs_scores_and_writes_the_ledger(tmp_path, data_dir):
    out = run_inline(
        "task=credit partition=dirichlet partition.alpha=0.3 partition.num_partitions=6 "
        "clients_per_round=6 rounds=2 eval_clients_per_round=0 checkpoint=false "
        "strategy=contribution strategy.local.distill_weight=0.5 server_val_fraction=0.1",
        tmp_path / "run",
    )
    res = json.loads((out / "results.json").read_text())
    for r in res["rounds"][1:]:
        ok = [c for c in r["clients"] if c["status"] == "ok"]
        assert sum(c["weight"] for c in ok) == pytest.approx(1.0)
        for c in ok:
            assert all(0.0 <= c[f"contrib_{d}"] <= 1.0 for d in DIMENSIONS if d != "marginal")
            assert np.isfinite(c["contrib_marginal"])  # a raw loss difference
        assert len({c["contrib_marginal"] for c in ok}) > 1
        # the temperature was chosen on the server rows, FedAvg's weights among the candidates
        agg = r["aggregation"]
        assert set(agg["server_val_loss"]) == {"fedavg", "0.1", "0.25", "1"}
        chosen = "fedavg" if agg["temperature"] is None else f"{agg['temperature']:g}"
        assert agg["server_val_loss"][chosen] == min(agg["server_val_loss"].values())
    assert res["rounds"][-1]["test_roc_auc"] > 0.6
    # the server validation rows left the test set: 10% of the credit task's 6000 test rows
    assert res["meta"]["server_val_rows"] == 600
    assert res["rounds"][-1]["test_confusion"] and sum(res["rounds"][-1]["test_confusion"]) == 5400
    ledger = (out / "contribution_ledger.csv").read_text().splitlines()
    assert len(ledger) == 7 and ledger[0].startswith("partition_id,rounds,total_weight,share")
    assert ledger[0].endswith("mean_direction,mean_marginal")


def test_step_normalised_contribution_with_flat_weights_is_fednova(tmp_path, data_dir):
    # clients of very different sizes take very different numbers of steps in one epoch
    common = (
        "task=credit partition=size_skew partition.num_partitions=4 clients_per_round=4 "
        "eval_clients_per_round=0 rounds=2 checkpoint=false train.local_epochs=1 "
    )
    nova = run_inline(common + "strategy=fednova", tmp_path / "nova")
    flat = run_inline(
        common + "strategy=contribution strategy.normalize_steps=true strategy.temperature=1e9 "
        "strategy.temperatures=[] strategy.local.proximal_mu=0",
        tmp_path / "flat",
    )
    last = [json.loads((o / "results.json").read_text())["rounds"][-1] for o in (nova, flat)]
    assert last[1]["test_loss"] == pytest.approx(last[0]["test_loss"], rel=1e-6)
    # ... and FedNova differs from FedAvg here: the clients' step counts differ
    steps = {c["train_steps"] for c in last[1]["clients"] if c["phase"] == "train"}
    assert len(steps) == 4
