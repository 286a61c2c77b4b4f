"""Contribution-aware aggregation: each dimension, the weights, the ledger, and a run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedapp.cli.inline import run_inline
from strategies.aggregation import server_adam_step, server_momentum_step
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


arrays_st = st.integers(1, 4).flatmap(
    lambda k: st.tuples(
        *[
            st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=3, max_size=3)
            for _ in range(k)
        ]
    )
)


@settings(max_examples=50, deadline=None)
@given(arrays_st, st.floats(-3, 3))
def test_server_momentum_zero_with_step_one_is_the_aggregate_bit_for_bit(g, shift):
    glob = [np.asarray(x, np.float32) for x in g]
    agg = [(a + np.float32(shift)).astype(np.float32) for a in glob]
    new, u = server_momentum_step(glob, agg, None, 0.0, 1.0)
    assert all(
        n.dtype == np.float32 and np.array_equal(n, a) for n, a in zip(new, agg, strict=True)
    )
    assert all(
        np.allclose(v, ga.astype(np.float64) - a) for v, ga, a in zip(u, glob, agg, strict=True)
    )


@settings(max_examples=50, deadline=None)
@given(
    st.floats(0.0, 0.95),
    st.floats(0.1, 2.0),
    st.lists(st.floats(-1, 1), min_size=2, max_size=6),
)
def test_server_momentum_is_fedavgm_step_for_step(beta, eta, shifts):
    """Against Hsu et al.'s recursion written out: u_1 = d_1, u_t = beta u_{t-1} + d_t,
    x_{t+1} = x_t - eta u_t, with d_t = x_t - a_t the round's pseudo-gradient."""
    x = [np.array([0.5, -1.0, 2.0])]
    u_ref = None
    buf = None
    x_ref = x[0].copy()
    for s in shifts:
        agg = [x[0] + s * np.array([1.0, 2.0, -1.0])]
        d = x_ref - agg[0]
        u_ref = d if u_ref is None else beta * u_ref + d
        x_ref = x_ref - eta * u_ref
        x, buf = server_momentum_step(x, agg, buf, beta, eta)
        assert np.allclose(x[0], x_ref, atol=1e-9)
        assert np.allclose(buf[0], u_ref, atol=1e-9)


def test_server_momentum_leaves_integer_buffers_to_the_aggregate_and_refuses_nonsense():
    glob = [np.zeros(2, np.float32), np.array([3], np.int64)]
    agg = [np.ones(2, np.float32), np.array([5], np.int64)]
    new, _ = server_momentum_step(glob, agg, None, 0.9, 1.0)
    assert new[1].dtype == np.int64 and new[1].tolist() == [5]
    assert new[0].dtype == np.float32 and new[0].tolist() == [1.0, 1.0]
    for beta, eta in ((1.0, 1.0), (-0.1, 1.0), (0.9, 0.0)):
        with pytest.raises(ValueError, match="server"):
            server_momentum_step(glob, agg, None, beta, eta)


def test_contribution_with_flat_weights_and_server_momentum_is_fedavgm(tmp_path, data_dir):
    common = (
        "task=credit partition=dirichlet partition.alpha=0.5 partition.num_partitions=4 "
        "clients_per_round=4 eval_clients_per_round=0 rounds=3 checkpoint=false "
    )
    m = run_inline(common + "strategy=fedavgm", tmp_path / "fedavgm")
    flat = run_inline(
        common + "strategy=contribution strategy.temperature=1e9 strategy.temperatures=[] "
        "strategy.local.proximal_mu=0 strategy.server_momentum=0.9",
        tmp_path / "flat",
    )
    plain = run_inline(
        common + "strategy=contribution strategy.temperature=1e9 strategy.temperatures=[] "
        "strategy.local.proximal_mu=0",
        tmp_path / "plain",
    )
    last = [json.loads((o / "results.json").read_text())["rounds"] for o in (m, flat, plain)]
    for a, b in zip(last[0], last[1], strict=True):
        assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-5)
    # ... and the momentum did something: without it the run is FedAvg's, not FedAvgM's
    assert last[2][-1]["test_loss"] != pytest.approx(last[1][-1]["test_loss"], rel=1e-3)


@settings(max_examples=50, deadline=None)
@given(
    st.floats(0.0, 0.95),
    st.floats(0.0, 0.999),
    st.floats(1e-4, 1.0),
    st.floats(1e-3, 0.1),
    st.lists(st.floats(-1, 1), min_size=1, max_size=6),
    st.integers(0, 3),
)
def test_server_adam_is_fedadams_step_for_step(beta_1, beta_2, eta, tau, shifts, start):
    """Against Reddi et al.'s recursion as Flower's FedAdam writes it: d_t = a_t - x_t,
    m_t = b1 m + (1 - b1) d_t, v_t = b2 v + (1 - b2) d_t^2, x += eta_t m_t / (sqrt(v_t) + tau)
    with eta_t = eta sqrt(1 - b2^t) / (1 - b1^t), t = server_round + 1."""
    x = [np.array([0.5, -1.0, 2.0])]
    x_ref, m_ref, v_ref = x[0].copy(), np.zeros(3), np.zeros(3)
    moments = None
    for r, s in enumerate(shifts, start=start + 1):
        agg = [x[0] + s * np.array([1.0, 2.0, -1.0])]
        d = agg[0] - x_ref
        m_ref = beta_1 * m_ref + (1 - beta_1) * d
        v_ref = beta_2 * v_ref + (1 - beta_2) * d**2
        t = r + 1
        eta_t = eta * np.sqrt(1 - beta_2**t) / (1 - beta_1**t)
        x_ref = x_ref + eta_t * m_ref / (np.sqrt(v_ref) + tau)
        x, moments = server_adam_step(x, agg, moments, t, eta, beta_1, beta_2, tau)
        assert np.allclose(x[0], x_ref, atol=1e-9)
        assert np.allclose(moments[0][0], m_ref) and np.allclose(moments[1][0], v_ref)


def test_server_adam_keeps_dtypes_leaves_integers_to_the_aggregate_and_refuses_nonsense():
    glob = [np.zeros(2, np.float32), np.array([3], np.int64)]
    agg = [np.ones(2, np.float32), np.array([5], np.int64)]
    new, (m, v) = server_adam_step(glob, agg, None, 1, 0.1, 0.9, 0.99, 1e-3)
    assert new[1].dtype == np.int64 and new[1].tolist() == [5]
    # first step: m = 0.1, v = 0.01, eta_1 = 0.1 sqrt(0.01) / 0.1 = 0.1: x = 0.1 * 0.1 / 0.101
    assert new[0].dtype == np.float32 and np.allclose(new[0], 0.1 * 0.1 / (0.1 + 1e-3))
    assert m[0].dtype == np.float64 and v[0].dtype == np.float64
    for bad in (
        dict(eta=0.0),
        dict(beta_1=1.0),
        dict(beta_2=-0.1),
        dict(tau=0.0),
        dict(eta=float("nan")),
    ):
        settings_ = {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3, **bad}
        with pytest.raises(ValueError, match="Adam"):
            server_adam_step(glob, agg, None, 1, **settings_)
    with pytest.raises(ValueError, match="step count"):
        server_adam_step(glob, agg, None, 0, 0.1, 0.9, 0.99, 1e-3)
    # moments of another model (a checkpoint of another run) are refused, not broadcast
    wrong = ([np.zeros(3), np.zeros(1)], [np.zeros(3), np.zeros(1)])
    with pytest.raises(ValueError, match="do not match the model's layers"):
        server_adam_step(glob, agg, wrong, 2, 0.1, 0.9, 0.99, 1e-3)


def test_contribution_refuses_an_ambiguous_or_unknown_server_optimizer():
    from hydra.errors import InstantiationException

    from fedapp.checks import compose
    from strategies import build_strategy

    for ovr, match in (
        ("strategy.server_optimizer=lamb", "unknown server_optimizer"),
        ("strategy.server_optimizer=adam strategy.server_momentum=0.9", "server_adam.eta"),
        ("+strategy.server_adam.gamma=1", "unknown server_adam"),
        ("strategy.server_optimizer=adam strategy.server_adam.beta_2=1", "beta_2"),
        # a setting sgd would ignore
        ("strategy.server_adam.eta=0.01", r"server_adam \['eta'\] changed"),
    ):
        with pytest.raises(InstantiationException, match=match):
            build_strategy(compose(f"strategy=contribution {ovr}"), num_nodes=3)


def test_contribution_with_flat_weights_and_server_adam_takes_fedadams_steps():
    """Flat weights (a huge temperature) under server Adam give the models Flower's FedAdam
    gives from the same replies, round after round (to float32 rounding: Flower keeps its
    moments in float32, we keep them in float64). FedAdam's steps are far from FedAvg's
    mean, so a server_optimizer that was ignored fails here."""
    from flwr.app import ArrayRecord, ConfigRecord

    from fedapp.checks import compose
    from strategies import build_strategy
    from tests.conftest import FakeGrid, reply

    nodes = [11, 12, 13]
    rng = np.random.default_rng(0)
    shapes = [(4, 3), (3,)]
    rounds = [
        [[rng.normal(0, 0.1, s).astype(np.float32) for s in shapes] for _ in nodes]
        for _ in range(4)
    ]
    sizes = [50, 120, 80]

    def run(name, extra):
        cfg = compose(f"strategy={name} clients_per_round=3 {extra}")
        s = build_strategy(cfg, num_nodes=3)
        s.bind({n: p for p, n in enumerate(nodes)}, seed=0, attackers=[])
        g = ArrayRecord([np.zeros(sh, np.float32) for sh in shapes])
        out, mean = [], None
        for rnd, shifts in enumerate(rounds, start=1):
            list(s.configure_train(rnd, g, ConfigRecord({}), FakeGrid(nodes)))
            base = [a.numpy() for a in g.values()]
            replies = [
                reply(
                    n,
                    [b + d for b, d in zip(base, shift, strict=True)],
                    {"num-examples": k, "train_loss": 1.0},
                )
                for n, shift, k in zip(nodes, shifts, sizes, strict=True)
            ]
            if rnd == 1:
                mean = [
                    sum(k * (b + d[i]) for k, d in zip(sizes, shifts, strict=True)) / sum(sizes)
                    for i, b in enumerate(base)
                ]
            g = s.aggregate_train(rnd, replies)[0]
            out.append([a.numpy() for a in g.values()])
        return out, mean

    flower, mean = run("fedadam", "")
    ours, _ = run(
        "contribution",
        "strategy.temperature=1e9 strategy.temperatures=[] strategy.server_optimizer=adam",
    )
    for a_round, b_round in zip(flower, ours, strict=True):
        for a, b in zip(a_round, b_round, strict=True):
            assert b.dtype == a.dtype == np.float32
            assert np.allclose(b, a, rtol=1e-4, atol=1e-6)
    assert not np.allclose(ours[0][0], mean[0], atol=1e-3)  # not FedAvg's mean


def test_a_refused_server_step_leaves_the_velocity_as_it_was():
    """A step that is not finite (float32 overflow) is refused by the round loop, which keeps
    the previous model; the velocity must not move on with it."""
    from flwr.app import ArrayRecord, ConfigRecord

    from fedapp.checks import compose
    from strategies import build_strategy
    from tests.conftest import FakeGrid, reply

    cfg = compose("strategy=contribution strategy.server_momentum=0.9 clients_per_round=3")
    s = build_strategy(cfg, num_nodes=3)
    nodes = [11, 12, 13]
    s.bind({n: p for p, n in enumerate(nodes)}, seed=0, attackers=[])
    grid = FakeGrid(nodes)
    g = ArrayRecord([np.zeros(8, np.float32)])

    def round_(rnd, g):
        list(s.configure_train(rnd, g, ConfigRecord({}), grid))
        replies = [
            reply(n, [np.full(8, 10.0 + i, np.float32)], {"num-examples": 50, "train_loss": 1.0})
            for i, n in enumerate(nodes)
        ]
        return s.aggregate_train(rnd, replies)[0]

    g1 = round_(1, g)
    assert g1 is not None and s.server_velocity is not None
    kept = [v.copy() for v in s.server_velocity]
    s.server_learning_rate = 1e38  # x - 1e38 u overflows float32
    assert round_(2, g1) is None  # refused: the previous model stays
    assert all(np.array_equal(a, b) for a, b in zip(kept, s.server_velocity, strict=True))


def test_adams_state_that_would_overflow_keeps_the_previous_model_and_moments():
    """A finite reply whose square overflows (0.01 d^2 of 1e160 is inf in float64): v_t inf would
    make every later step 0 while the model itself stays finite. The round is refused (the
    previous model stays) and the moments stay as they were."""
    from flwr.app import ArrayRecord, ConfigRecord

    from fedapp.checks import compose
    from strategies import build_strategy
    from tests.conftest import FakeGrid, reply

    cfg = compose("strategy=contribution strategy.server_optimizer=adam clients_per_round=3")
    s = build_strategy(cfg, num_nodes=3)
    nodes = [11, 12, 13]
    s.bind({n: p for p, n in enumerate(nodes)}, seed=0, attackers=[])
    grid = FakeGrid(nodes)

    def round_(rnd, g, value):
        list(s.configure_train(rnd, g, ConfigRecord({}), grid))
        replies = [
            reply(n, [np.full(8, value + i, np.float64)], {"num-examples": 50, "train_loss": 1.0})
            for i, n in enumerate(nodes)
        ]
        return s.aggregate_train(rnd, replies)[0]

    g1 = round_(1, ArrayRecord([np.zeros(8, np.float64)]), 1.0)
    assert g1 is not None and s.server_moments is not None
    kept = [a.copy() for a in (*s.server_moments[0], *s.server_moments[1])]
    assert round_(2, g1, 1e160) is None  # refused: the previous model stays
    assert s.round_log(2).aggregation["server_state_not_finite"] is True  # and says why
    now = [*s.server_moments[0], *s.server_moments[1]]
    assert all(np.array_equal(a, b) for a, b in zip(kept, now, strict=True))
    g3 = round_(3, g1, 2.0)  # the next sane round steps from the kept state
    assert g3 is not None and np.all(np.isfinite(g3.to_numpy_ndarrays()[0]))
