"""DP synthetic data (fedapp/synthetic.py, strategies/synthetic.py): the generator's privacy
accounting, rows that respect the schema, marginals recovered on a toy table, the one-shot
mode's bytes, rare-class augmentation and the refused combinations."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from fedapp.config import ConfigError, compose
from fedapp.inline import run_inline
from fedapp.privacy import Ledger, epsilon_of, opacus, private_stats
from fedapp.synthetic import (
    GeneratorSpec,
    Layout,
    SyntheticRoundFailed,
    check,
    generator_batch,
    generator_round,
    make_generator,
    rare_class_count,
    rows_record,
    sample_rows,
    screen_rows,
    synthesize,
    train_generator,
)
from tasks import get_task
from tasks.tabular import Rows, TabularTask

MEDICAL = "task=medical clients_per_round=4 eval_clients_per_round=0"


def _context(overrides: str, partition: int = 0) -> Context:
    return Context(
        run_id=7,
        node_id=100 + partition,
        node_config={"partition-id": partition, "num-partitions": 4},
        state=RecordDict(),
        run_config={"overrides": overrides},
    )


def _message(arrays: ArrayRecord, prep: dict, rnd: int, action: str) -> Message:
    config = ConfigRecord({"seed": 0, "server-round": rnd, **prep})
    return Message(RecordDict({"arrays": arrays, "config": config}), 100, f"train.{action}")


def _prep(task):
    return task.aggregate_stats([task.client_stats(task.load_partition(i)) for i in range(4)])


def _ledger(state: RecordDict) -> Ledger:
    return Ledger.from_json(str(state.config_records["fedapp.dp"]["json"]))


def test_the_generators_epsilon_is_the_accountants_and_sampling_spends_nothing(data_dir):
    overrides = (
        f"{MEDICAL} strategy=synthetic rounds=3 privacy=sample_dp privacy.target_epsilon=2 "
        "strategy.generator.rounds=2 strategy.generator.epochs=1 "
        "strategy.generator.finetune_epochs=1"
    )
    cfg = compose(overrides)
    task = get_task(cfg, data_dir)
    prep = _prep(task)
    context = _context(overrides)
    from fedapp.node import load_node

    private_stats(load_node(context), context)  # the statistics release comes first
    gen = ArrayRecord(make_generator(task, _spec(cfg)).state_dict())
    reported, steps = [], 0
    for rnd in (1, 2):
        reply = generator_round(_message(gen, prep, rnd, "generator"), context)
        assert not reply.has_error()
        metrics = reply.content["metrics"]
        reported.append(metrics["dp_epsilon"])
        steps += int(metrics["train_steps"])
        assert "train_loss" not in metrics  # a statistic of the rows: not sent under DP
        gen = reply.content["arrays"]
    ledger = _ledger(context.state)
    n = task.load_partition(0).num_train
    batch = generator_batch(_spec(cfg), n)
    assert batch < n  # rows are subsampled
    q = 1.0 / math.ceil(n / batch)
    # an independent Opacus accountant fed the same steps one by one gives the same epsilon
    acc = opacus("opacus.accountants").RDPAccountant()
    acc.step(noise_multiplier=ledger.stats_noise_multiplier, sample_rate=1.0)
    for _ in range(steps):
        acc.step(noise_multiplier=ledger.generator_noise_multiplier, sample_rate=q)
    assert ledger.history == [
        (ledger.stats_noise_multiplier, 1.0, 1),
        (ledger.generator_noise_multiplier, q, steps),
    ]
    assert reported[1] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert reported[0] < reported[1] <= 2.0
    # sharing: fine-tuning spends the last planned epoch; drawing rows spends nothing
    before = _ledger(context.state)
    reply = synthesize(_message(gen, prep, 3, "synthesize"), context)
    assert not reply.has_error()
    after = _ledger(context.state)
    assert after.history[-1][2] - before.history[-1][2] == math.ceil(n / batch)
    # its rows' labels follow the client's own released histogram, not the federation's
    released = np.maximum(context.state.config_records["fedapp.dp-labels"]["counts"], 0.0)
    share = reply.content["rows"]["y"].numpy().mean()  # about 97 rows: seeded, sd about 0.05
    assert share == pytest.approx(released[1] / released.sum(), abs=0.12)
    assert reply.content["metrics"]["dp_epsilon"] == pytest.approx(after.epsilon())
    assert after.epsilon() <= 2.0 * (1 + 1e-9)
    vae = make_generator(task, _spec(cfg))
    for seed in range(3):
        sample_rows(vae, np.zeros(50, dtype=np.int64), prep, 5.0, seed)
    assert _ledger(context.state).history == after.history
    assert epsilon_of(after.history, 1e-5) == pytest.approx(after.epsilon())


def _spec(cfg):
    from fedapp.synthetic import generator_spec

    return generator_spec(cfg)


def test_synthetic_rows_respect_the_schema_and_bad_rows_are_refused(data_dir):
    task = get_task(compose(MEDICAL), data_dir)
    prep = _prep(task)
    layout = Layout.of(task)
    vae = make_generator(task, _spec(compose(f"{MEDICAL} strategy=synthetic")))
    labels = np.array([0, 1] * 200)
    rows = sample_rows(vae, labels, prep, 3.0, seed=1)  # an untrained generator: anything goes
    sizes = np.array(layout.categories)
    assert ((rows.codes >= 0) & (rows.codes <= sizes + 1) & (rows.codes != sizes)).all()
    z = (rows.numeric - np.array(prep["prep.mean"])) / np.array(prep["prep.std"])
    assert np.nanmax(np.abs(z)) <= 3.0 + 1e-9 and np.isnan(z).any()  # indicators: missing
    assert (rows.y == labels).all()
    record = rows_record(rows, prep)
    back, why = screen_rows(record, layout, prep, 3.0, 1000)
    assert why is None and (back.codes == rows.codes).all()
    np.testing.assert_allclose(back.numeric, rows.numeric, rtol=2e-3, atol=2e-3 * 3)

    def tampered(key, edit):
        arrays = {k: record[k].numpy().copy() for k in record}
        arrays[key] = edit(arrays[key])
        return ArrayRecord({k: Array(v) for k, v in arrays.items()})

    def put(value, dtype=None):
        def edit(a):
            a = a.astype(dtype) if dtype else a
            a.flat[0] = value
            return a

        return edit

    cases = [
        (tampered("numeric", put(np.inf)), "infinite"),
        (tampered("numeric", put(40.0)), "beyond"),
        (tampered("codes", put(sizes[0])), "outside the vocabulary"),
        (tampered("codes", put(-1)), "outside the vocabulary"),
        (tampered("y", put(2)), "label values"),
        (tampered("numeric", lambda a: a[:, :-1]), "shapes"),
        (ArrayRecord({"numeric": record["numeric"]}), "must be the arrays"),
    ]
    for bad, message in cases:
        rows_back, why = screen_rows(bad, layout, prep, 3.0, 1000)
        assert rows_back is None and message in why, (message, why)
    assert "max_rows" in screen_rows(record, layout, prep, 3.0, 10)[1]


def test_the_generator_recovers_a_toy_tables_marginals(tmp_path):
    """A toy table (two numeric columns, one with missing values, a three-value category,
    a label that shifts a numeric column): without DP, 20 epochs of batch 64 on 3,000 rows. Stated
    tolerances: numeric means within 0.15 standard deviations and standard deviations within
    20 %, the missing share within 0.05, category and label frequencies within 0.06 (total
    variation), the label's shift of x1 within 0.3 standard deviations."""
    rng = np.random.default_rng(0)
    n = 3000
    y = (rng.random(n) < 0.25).astype(int)
    x1 = rng.normal(3.0, 2.0, n) + 2.0 * y
    x2 = rng.exponential(1.0, n)
    x2[rng.random(n) < 0.2] = np.nan
    cat = rng.choice(["a", "b", "c"], size=n, p=[0.6, 0.3, 0.1])
    (tmp_path / "toy").mkdir()
    pd.DataFrame({"x1": x1, "x2": x2, "c": cat, "y": y}).to_csv(
        tmp_path / "toy" / "t.csv", index=False
    )
    cfg = compose("task=medical partition=iid partition.num_partitions=1 strategy=synthetic")
    OmegaConf.set_struct(cfg, False)
    cfg.task.files = [{"path": "toy/t.csv"}]
    cfg.task.schema = {
        **OmegaConf.to_container(cfg.task.schema),
        "label": "y",
        "positive": [1],
        "numeric": ["x1", "x2"],
        "categorical": {"c": ["a", "b", "c"]},
        "zero_is_missing": [],
        "natural_id": None,
    }
    task = TabularTask(cfg, tmp_path)
    data = task.load_partition(0)
    prep = task.aggregate_stats([task.client_stats(data)])
    spec = GeneratorSpec(batch_size=64, lr=0.01)  # 940 steps without DP
    vae = make_generator(task, spec)
    import torch

    torch.manual_seed(0)
    train_generator(vae, task, data.train, prep, spec, epochs=20, seed=0)
    real = data.train
    synth = sample_rows(vae, real.y, prep, spec.zclip, seed=3)
    for j in range(2):
        a, b = synth.numeric[:, j], real.numeric[:, j]
        sd = np.nanstd(b)
        assert abs(np.nanmean(a) - np.nanmean(b)) < 0.15 * sd
        assert np.nanstd(a) == pytest.approx(sd, rel=0.2)
    assert abs(np.isnan(synth.numeric[:, 1]).mean() - np.isnan(real.numeric[:, 1]).mean()) < 0.05
    fa = np.bincount(synth.codes[:, 0], minlength=5) / len(synth)
    fb = np.bincount(real.codes[:, 0], minlength=5) / len(real)
    assert 0.5 * np.abs(fa - fb).sum() < 0.06
    assert np.isnan(synth.numeric[:, 0]).mean() < 0.01  # x1 is never missing

    def shift(rows):
        x = rows.numeric[:, 0]
        return np.nanmean(x[rows.y == 1]) - np.nanmean(x[rows.y == 0])

    shift_real, shift_syn = shift(real), shift(synth)
    assert abs(shift_syn - shift_real) < 0.3 * np.std(real.numeric[:, 0])


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 500),
    st.integers(0, 500),
    st.floats(0.01, 0.95),
)
def test_rare_class_count_is_the_fewest_rows_that_reach_the_fraction(n, minority, fraction):
    minority = min(minority, n)
    labels = np.array([1] * minority + [0] * (n - minority))
    k = rare_class_count(labels, 1, fraction)
    assert k >= 0
    assert (minority + k) / (n + k) >= fraction - 1e-9
    if k > 0:
        assert (minority + k - 1) / (n + k - 1) < fraction


def test_one_shot_bytes_are_the_generator_rounds_plus_the_rows(tmp_path, data_dir):
    overrides = (
        f"{MEDICAL} strategy=synthetic rounds=2 strategy.generator.rounds=1 "
        "strategy.generator.epochs=1 strategy.server_epochs=2 strategy.rows_factor=0.5"
    )
    out = run_inline(overrides, tmp_path / "run")
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["status"] == "completed"
    syn = json.loads((out / "synthetic.json").read_text())
    cfg = compose(overrides)
    task = get_task(cfg, data_dir)
    gen_bytes = ArrayRecord(make_generator(task, _spec(cfg)).state_dict()).count_bytes()
    prep = {"prep.mean": [0.0] * 6, "prep.std": [1.0] * 6}
    rows_bytes = 0
    for pid, n in syn["rows_per_client"].items():
        assert n == round(0.5 * task.load_partition(int(pid)).num_train)
        empty = Rows(
            np.zeros((n, 6)), np.zeros((n, 7), dtype=np.int64), np.zeros(n, dtype=np.int64)
        )
        rows_bytes += rows_record(empty, prep).count_bytes()
    generator_round, sharing = res["rounds"][1], res["rounds"][2]
    assert generator_round["bytes_up"] == 4 * gen_bytes
    assert sharing["bytes_up"] == rows_bytes == sharing["aggregation"]["rows_bytes"]
    assert res["final"]["total_bytes_up"] == 4 * gen_bytes + rows_bytes
    assert sharing["aggregated"] and sharing["test_roc_auc"] > 0.5
    assert syn["rows"] == sum(syn["rows_per_client"].values())
    q = syn["quality_vs_server_test"]
    assert 0 <= q["ks_numeric_mean"] <= 1 and q["dcr_median"] > 0
    assert (out / "synthetic_rows.npz").exists()


def test_rare_class_augmentation_adds_minority_rows_within_one_budget(tmp_path):
    out = run_inline(
        f"{MEDICAL} strategy=fedavg augment=rare_class augment.target_fraction=0.7 rounds=3 "
        "augment.generator.rounds=1 augment.generator.epochs=1 privacy=sample_dp "
        "privacy.target_epsilon=3",
        tmp_path / "aug",
    )
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["status"] == "completed"
    assert res["rounds"][1]["aggregation"] == {"phase": "generator"}
    for r in res["rounds"][2:]:
        train = [c for c in r["clients"] if c["phase"] == "train"]
        assert train and all(c["status"] == "ok" for c in train)
        assert all(c["synthetic-rows"] > 0 for c in train)  # the minority made up to 70 %
        assert all(c["dp_epsilon"] <= 3.0 for c in train)
    # the generator's share (0.3 of 3) after round 1, the rest by the end
    assert res["rounds"][1]["dp_epsilon"] <= 0.9 + 1e-6 < res["rounds"][3]["dp_epsilon"] <= 3.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ("task=femnist strategy=synthetic", "tabular tasks"),
        (f"{MEDICAL} strategy=synthetic privacy=central_dp", "cannot be combined"),
        (f"{MEDICAL} strategy=fedavg augment=rare_class privacy=central_dp", "privacy=sample_dp"),
        (f"{MEDICAL} strategy=synthetic compression=int8", "compression=int8"),
        (f"{MEDICAL} strategy=fedasync augment=rare_class", "round-based"),
        (f"{MEDICAL} strategy=fedavg augment=rare_class rounds=3", "rounds > 3"),
        (f"{MEDICAL} strategy=synthetic augment=rare_class", "augment=none"),
        (f"{MEDICAL} strategy=synthetic strategy.generator.epsilon_share=0", "epsilon_share"),
        (f"{MEDICAL} strategy=synthetic +strategy.generator.depth=3", "unknown keys"),
    ],
)
def test_combinations_that_cannot_be_honest_are_refused(overrides, message, data_dir):
    with pytest.raises(ConfigError, match=message):  # SyntheticError, PrivacyError
        cfg = compose(overrides)
        check(cfg, get_task(cfg, data_dir))


def test_a_failed_sharing_round_fails_the_run(tmp_path):
    """Fewer clients than min_replies send rows: the task model was never trained, so the
    run fails (and says why), whatever the generator rounds did."""
    out = tmp_path / "run"
    with pytest.raises(SyntheticRoundFailed, match="synthetic rows"):
        run_inline(
            f"{MEDICAL} strategy=synthetic rounds=2 strategy.generator.rounds=1 "
            "strategy.generator.epochs=1 min_replies=5",
            out,
        )
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["status"] == "failed"
    assert "synthetic rows" in res["meta"]["status_detail"]["error"]
