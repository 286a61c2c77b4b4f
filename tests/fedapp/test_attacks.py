"""The attack harness: who attacks, and what each attack sends."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedapp.checks import compose
from fedapp.client_app import compose_units
from fedapp.core.units import run_units
from fedapp.features.attacks import (
    AttackError,
    AttackHarness,
    AttackSpec,
    attacker_partitions,
    crashes_now,
    flipped_labels,
    inflated_claim,
    poisoned_state,
    trains_locally,
)


@given(n=st.integers(1, 500), frac=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_attackers_are_a_seeded_fraction(n, frac, seed):
    a = attacker_partitions(n, frac, seed)
    assert a == attacker_partitions(n, frac, seed)
    assert len(a) == round(frac * n) == len(set(a))
    assert all(0 <= p < n for p in a)


def test_attackers_change_with_seed():
    assert attacker_partitions(200, 0.3, 0) != attacker_partitions(200, 0.3, 1)


def test_label_flip():
    assert flipped_labels(np.array([0, 1, 1]), 2).tolist() == [1, 0, 0]
    assert flipped_labels(np.arange(62), 62).tolist() == list(range(61, -1, -1))


def _states():
    g = {"w": torch.zeros(3, 4), "steps": torch.tensor(7)}
    local = {"w": torch.ones(3, 4), "steps": torch.tensor(7)}
    return g, local


def test_poisoned_updates():
    g, local = _states()
    scaled = poisoned_state(AttackSpec("scaled", 0.3, scale=-4), g, local, 1)
    assert torch.equal(scaled["w"], torch.full((3, 4), -4.0))
    assert scaled["steps"].item() == 7
    gauss = poisoned_state(AttackSpec("gaussian", 0.3, std=2.0), g, local, 1)
    assert gauss["w"].dtype == torch.float32 and 0.5 < gauss["w"].std().item() < 4
    assert torch.equal(
        gauss["w"], poisoned_state(AttackSpec("gaussian", 0.3, std=2.0), g, local, 1)["w"]
    )
    free = poisoned_state(AttackSpec("free_rider", 0.3, mode="unchanged"), g, local, 1)
    assert torch.equal(free["w"], g["w"])
    stale = {"w": torch.full((3, 4), 5.0), "steps": torch.tensor(3)}
    old = poisoned_state(AttackSpec("free_rider", 0.3, mode="stale"), g, local, 1, stale)
    assert torch.equal(old["w"], stale["w"])
    first = poisoned_state(AttackSpec("free_rider", 0.3, mode="stale"), g, local, 1, None)
    assert torch.equal(first["w"], g["w"])
    nan = poisoned_state(AttackSpec("crash", 0.3, mode="nan"), g, local, 1)
    assert torch.isnan(nan["w"]).all()
    assert torch.equal(g["w"], torch.zeros(3, 4))  # inputs untouched


def test_crash_probability_is_per_round_and_seeded():
    spec = AttackSpec("crash", 0.3, mode="exception", probability=0.5)
    draws = [crashes_now(spec, seed) for seed in range(400)]
    assert 150 < sum(draws) < 250
    assert draws == [crashes_now(spec, seed) for seed in range(400)]
    assert not crashes_now(AttackSpec("gaussian", 0.3), 0)


def test_config_group_and_errors():
    for name in ("none", "label_flip", "gaussian", "scaled", "free_rider", "crash", "inflate"):
        spec = AttackSpec.from_config(compose(f"attack={name}").attack)
        assert spec.name == name and spec.active == (name != "none")
    with pytest.raises(AttackError, match="fraction"):
        AttackSpec.from_config({"name": "gaussian", "fraction": 1.5})
    with pytest.raises(AttackError, match="choose one of"):
        AttackSpec.from_config({"name": "backdoor"})
    with pytest.raises(AttackError, match="free_rider"):
        AttackSpec.from_config({"name": "free_rider", "fraction": 0.1, "mode": "lazy"})


def test_inflate_claims_a_huge_consistent_number_of_examples():
    spec = AttackSpec.from_config(compose("attack=inflate").attack)
    assert spec.name == "inflate" and spec.claim == 1e12 and spec.fraction == 0.1
    assert trains_locally(spec)  # honest weights: only the claim lies
    n, counts = inflated_claim(np.array([70, 30]), spec.claim)
    assert n == sum(counts) and abs(n - 1e12) <= 2
    assert counts[0] / counts[1] == pytest.approx(70 / 30)
    with pytest.raises(AttackError, match="claim"):
        AttackSpec.from_config({"name": "inflate", "fraction": 0.1, "claim": 0.5})


def test_an_inflate_attacker_s_reply_claims_it(data_dir):
    """Through the attack harness: the reply's num-examples and label histogram say `claim`
    (the ClientApp's train handler puts `reply_metrics` over its own numbers)."""
    from tests.fedapp.test_units import _job

    job = _job(data_dir, "attack=inflate attack.fraction=1.0 attack.claim=5e9", {})
    units = compose_units(job)
    assert [type(u) for u in units] == [AttackHarness]
    weights_before = {k: v.clone() for k, v in job.model.state_dict().items()}
    job.task.train = lambda model, *a, **k: {"train_loss": 0.5, "train_steps": 1.0}
    run_units(job, units)
    n = job.reply_metrics["num-examples"]
    assert abs(n - 5e9) <= len(job.data.label_counts)
    assert sum(job.reply_metrics["label-counts"]) == n
    for k, v in job.model.state_dict().items():  # the (here untrained) model is sent as is
        assert torch.equal(v, weights_before[k])
