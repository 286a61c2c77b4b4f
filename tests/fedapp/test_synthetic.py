"""DP synthetic data (fedapp/features/synthetic/, strategies/synthetic.py): the generator's privacy
accounting, rows that respect the schema, marginals recovered on a toy table, the one-shot
mode's bytes, rare-class augmentation and the refused combinations."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from hypothesis import example, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from fedapp.checks import compose
from fedapp.cli.inline import run_inline
from fedapp.core.config import ConfigError
from fedapp.features.privacy import Ledger, epsilon_of, opacus, plan_config, private_stats
from fedapp.features.synthetic import (
    GEN_CACHE_KEY,
    GEN_DIGEST,
    GEN_KEY,
    GeneratorSpec,
    Layout,
    SyntheticError,
    SyntheticRoundFailed,
    check,
    client_generator,
    discriminator_log_odds,
    generator_batch,
    generator_digest,
    generator_inputs,
    generator_round,
    initial_generator,
    make_generator,
    rare_class_count,
    rows_record,
    sample_rows,
    screen_rows,
    select_by_odds,
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
    # the run's DP plan, as the ServerApp sends it (the generator ledger reads `dp-per-round`)
    plan = plan_config(compose(f"{MEDICAL} privacy=sample_dp"))
    config = ConfigRecord({"seed": 0, "server-round": rnd, **prep, **plan})
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
    from fedapp.core.node import load_node

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
    from fedapp.features.synthetic import generator_spec

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


def _toy_task(tmp_path):
    """A toy table (two numeric columns, one with missing values, a three-value category, a
    label that shifts a numeric column), 3,000 rows, one client: (task, its data, prep)."""
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
    return task, data, task.aggregate_stats([task.client_stats(data)])


def test_the_generator_recovers_a_toy_tables_marginals(tmp_path):
    """The toy table, without DP, 20 epochs of batch 64 on its rows. Stated tolerances:
    numeric means within 0.25 standard deviations; the standard deviation of the normal x1
    within 15 %, of the skewed (exponential) x2 within 30 %: the Gaussian decoder shrinks a
    skewed column's spread (over initial seeds 0-5: x1 0.91-1.04 of the real one, x2
    0.73-0.83, means off by at most 0.19 sd); the missing share within 0.05, category and
    label frequencies within 0.06 (total variation), the label's shift of x1 within 0.3
    standard deviations. The initial weights are seeded here: earlier tests draw from torch's
    global generator, and these bounds hold over seeds, not for every one of them."""
    task, data, prep = _toy_task(tmp_path)
    spec = GeneratorSpec(batch_size=64, lr=0.01)  # 940 steps without DP
    import torch

    torch.manual_seed(0)  # before the generator's initial weights: earlier tests draw too
    vae = make_generator(task, spec)
    train_generator(vae, task, data.train, prep, spec, epochs=20, seed=0)
    real = data.train
    synth = sample_rows(vae, real.y, prep, spec.zclip, seed=3)
    for j, rel in ((0, 0.15), (1, 0.3)):
        a, b = synth.numeric[:, j], real.numeric[:, j]
        sd = np.nanstd(b)
        assert abs(np.nanmean(a) - np.nanmean(b)) < 0.25 * sd
        assert np.nanstd(a) == pytest.approx(sd, rel=rel)
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


def _distances(rows, real) -> list[float]:
    """Kolmogorov-Smirnov distance of x1 and of x2's observed values, the gap in x2's missing
    share, the category's total variation distance."""
    from scipy.stats import ks_2samp

    out = []
    for j in range(2):
        a, b = rows.numeric[:, j], real.numeric[:, j]
        out.append(ks_2samp(a[~np.isnan(a)], b[~np.isnan(b)]).statistic)
    out.append(abs(np.isnan(rows.numeric[:, 1]).mean() - np.isnan(real.numeric[:, 1]).mean()))
    fa = np.bincount(rows.codes[:, 0], minlength=5) / len(rows)
    fb = np.bincount(real.codes[:, 0], minlength=5) / len(real)
    out.append(0.5 * np.abs(fa - fb).sum())
    return out


def test_the_discriminator_picks_candidates_nearer_the_real_rows(tmp_path):
    """An untrained generator's candidates, 4 per real row: the rows a discriminator (no DP,
    5 epochs) selects fit every marginal better than as many candidates taken in order with
    the same labels, and the toy's four distances together fall by more than 30 %."""
    import torch

    task, data, prep = _toy_task(tmp_path)
    spec = GeneratorSpec(batch_size=64, lr=0.01, refine_epochs=5)
    torch.manual_seed(0)
    vae = make_generator(task, spec)
    real = data.train
    cand = sample_rows(vae, np.repeat(real.y, 4), prep, spec.zclip, seed=3)

    def inputs(rows):
        return generator_inputs(task, rows, prep, spec.zclip).tensors[0]

    log_odds = discriminator_log_odds(inputs(real), inputs(cand), spec, seed=0)
    chosen = cand.take(select_by_odds(log_odds, cand.y, real.y, seed=0))
    labels, counts = np.unique(real.y, return_counts=True)
    firsts = [np.flatnonzero(cand.y == c)[:k] for c, k in zip(labels, counts, strict=True)]
    in_order = cand.take(np.sort(np.concatenate(firsts)))
    assert np.array_equal(np.bincount(chosen.y), np.bincount(real.y))
    before, after = _distances(in_order, real), _distances(chosen, real)
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
    assert sum(after) < 0.7 * sum(before), (before, after)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.integers(0, 2), min_size=1, max_size=40),
    st.integers(2, 5),
    st.integers(0, 2**31 - 1),
)
def test_selection_keeps_the_label_counts_and_takes_the_favoured_candidates(wanted, k, seed):
    """Each label's count is the one wanted, no candidate twice, and candidates whose odds
    dwarf the others' (e^25 against at most about e^4) are the ones taken."""
    wanted = np.asarray(wanted)
    labels = np.repeat(wanted, k)
    rng = np.random.default_rng(seed)
    favoured = np.zeros(len(labels), dtype=bool)
    for c, count in zip(*np.unique(wanted, return_counts=True), strict=True):
        favoured[rng.choice(np.flatnonzero(labels == c), count, replace=False)] = True
    log_odds = np.where(favoured, 25.0, rng.normal(0.0, 1.0, len(labels)))
    keep = select_by_odds(log_odds, labels, wanted, seed)
    assert len(np.unique(keep)) == len(keep) == len(wanted)
    assert np.array_equal(np.bincount(labels[keep], minlength=3), np.bincount(wanted, minlength=3))
    assert favoured[keep].all()


def test_refinement_spends_the_rest_of_the_generators_share_in_the_same_ledger(data_dir):
    """generator.refine=discriminator under sample_dp: the VAE is calibrated to 70 % of the
    generator's share, the discriminator's DP-SGD to the rest, both in the client's one
    ledger; the epsilon the client reports is an independent Opacus accountant's over the
    whole history, and within the share."""
    overrides = (
        f"{MEDICAL} strategy=synthetic rounds=1 privacy=sample_dp privacy.target_epsilon=2 "
        "strategy.generator.finetune_epochs=1 strategy.generator.epsilon_share=0.5 "
        "strategy.generator.refine=discriminator strategy.generator.refine_epochs=2"
    )
    cfg = compose(overrides)
    task = get_task(cfg, data_dir)
    spec = _spec(cfg)
    context = _context(overrides)
    from fedapp.core.node import load_node

    private_stats(load_node(context), context)
    reply = synthesize(_message(ArrayRecord(), _prep(task), 1, "synthesize"), context)
    assert not reply.has_error()
    metrics = reply.content["metrics"]
    rows = int(metrics["synthetic-rows"])
    assert len(reply.content["rows"]["y"].numpy()) == rows
    assert metrics["synthetic-candidates"] == 4 * rows
    n = task.load_partition(0).num_train + 4 * rows  # the discriminator's rows
    per_epoch = math.ceil(n / generator_batch(spec, n))
    ledger = _ledger(context.state)
    stats, vae, disc = ledger.history
    assert disc == (metrics["dp_refine_noise_multiplier"], 1.0 / per_epoch, 2 * per_epoch)
    assert epsilon_of([stats, vae], 1e-5) <= 2.0 * 0.5 * 0.7 * (1 + 1e-9)
    acc = opacus("opacus.accountants").RDPAccountant()
    for sigma, q, steps in ledger.history:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert metrics["dp_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
    assert 1.0 - 0.02 <= metrics["dp_epsilon"] <= 1.0 * (1 + 1e-9)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 500),
    st.integers(0, 500),
    st.floats(0.01, 0.95),
)
@example(1, 0, 0.9)  # the closed form gives 10 (0.9 / (1 - 0.9) = 9.000...02); 9 reach 90 %
@example(33, 5, 0.3)  # an insurance client: 7, not 8
def test_rare_class_count_is_the_fewest_rows_that_reach_the_fraction(n, minority, fraction):
    minority = min(minority, n)
    labels = np.array([1] * minority + [0] * (n - minority))
    k = rare_class_count(labels, 1, fraction)
    assert k >= 0
    assert (minority + k) / (n + k) >= fraction - 1e-9
    if k > 0:
        assert (minority + k - 1) / (n + k - 1) < fraction


@pytest.mark.parametrize("refine", ["none", "discriminator"])
def test_one_shot_bytes_are_the_generator_rounds_plus_the_rows(tmp_path, data_dir, refine):
    """Also with the discriminator's refinement: its candidates stay on the client."""
    overrides = (
        f"{MEDICAL} strategy=synthetic rounds=2 strategy.generator.rounds=1 "
        "strategy.generator.epochs=1 strategy.server_epochs=2 strategy.rows_factor=0.5 "
        f"strategy.generator.refine={refine} strategy.generator.refine_epochs=1"
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
    sent = [c for c in sharing["clients"] if c["phase"] == "train"]
    if refine == "discriminator":
        assert all(c["synthetic-candidates"] == 4 * c["synthetic-rows"] for c in sent)
    else:
        assert all("synthetic-candidates" not in c for c in sent)
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
        # the minority made up to 70 % by the client's noisy released histogram (its exact
        # counts never set the reply's row count), so a client may add none
        assert all(c["synthetic-rows"] >= 0 for c in train)
        assert sum(c["synthetic-rows"] for c in train) > 0
        assert all(c["dp_epsilon"] <= 3.0 for c in train)
    # the generator's share (0.3 of 3) after round 1, the rest by the end
    assert res["rounds"][1]["dp_epsilon"] <= 0.9 + 1e-6 < res["rounds"][3]["dp_epsilon"] <= 3.0


def test_rare_class_sends_the_generator_once_per_client_and_again_after_a_failure(
    tmp_path, data_dir
):
    """Each client gets the generator with its first training message after the generator
    rounds and keeps it; one that crashed (its state is rolled back, as Flower does) gets it
    again. Bytes down are the models plus exactly the generators sent, and no client ever
    trains without the generator (no "holds no copy" error)."""
    overrides = (
        f"{MEDICAL} strategy=fedavg augment=rare_class rounds=6 augment.generator.rounds=1 "
        "augment.generator.epochs=1 attack=crash attack.fraction=0.25 attack.probability=0.5"
    )
    out = run_inline(overrides, tmp_path / "aug")
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["status"] == "completed"
    cfg = compose(overrides)
    task = get_task(cfg, data_dir)
    gen_bytes = ArrayRecord(make_generator(task, _spec(cfg)).state_dict()).count_bytes()
    model_bytes = ArrayRecord(task.make_model().state_dict()).count_bytes()
    holders: set[int] = set()
    for r in res["rounds"][2:]:
        train = [c for c in r["clients"] if c["phase"] == "train"]
        assert len(train) == 4
        ok = {c["partition_id"] for c in train if not c["status"].startswith("error")}
        for c in train:
            if c["status"].startswith("error"):
                assert "holds no copy" not in c["status"] and "crash" in c["status"].lower()
        needing = {c["partition_id"] for c in train} - holders
        assert r["aggregation"]["generator_sent"] == len(needing)
        assert r["bytes_down"] == 4 * model_bytes + len(needing) * gen_bytes
        holders = (holders | ok) - ({c["partition_id"] for c in train} - ok)
    sent = [r["aggregation"]["generator_sent"] for r in res["rounds"][2:]]
    assert sent[0] == 4  # everyone with its first training message
    assert sum(sent[1:]) > 0  # a client that crashed got it again
    assert sum(sent) < 4 * len(sent)  # not with every model


def test_a_client_uses_its_kept_generator_only_when_it_is_the_servers(data_dir):
    task = get_task(compose(MEDICAL), data_dir)
    gen = ArrayRecord(initial_generator(task, GeneratorSpec(), 0).state_dict())
    other = ArrayRecord(initial_generator(task, GeneratorSpec(), 1).state_dict())
    digest = generator_digest(gen)
    assert digest == generator_digest(ArrayRecord(gen.to_torch_state_dict()))
    assert digest != generator_digest(other)

    def job(state, carries=None, wanted=digest):
        content = RecordDict({"config": ConfigRecord({GEN_DIGEST: wanted} if wanted else {})})
        if carries is not None:
            content[GEN_KEY] = carries
        return SimpleNamespace(config=content["config"], content=content, state=state)

    state = RecordDict()
    with pytest.raises(SyntheticError, match="holds no copy"):
        client_generator(job(state))  # never received it
    assert client_generator(job(state, gen)) is gen  # received: kept
    assert GEN_CACHE_KEY in state.array_records
    kept = client_generator(job(state))
    assert generator_digest(kept) == digest
    with pytest.raises(SyntheticError, match="holds no copy"):
        client_generator(job(state, wanted=generator_digest(other)))  # a different generator
    with pytest.raises(SyntheticError, match="does not match"):
        client_generator(job(RecordDict(), other))  # the message's generator is not the named one
    with pytest.raises(SyntheticError, match="another fedapp version"):
        client_generator(job(RecordDict(), wanted=""))


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
        (f"{MEDICAL} strategy=synthetic strategy.generator.refine=gan", "none or discriminator"),
        (
            f"{MEDICAL} strategy=fedavg augment=rare_class +augment.generator.refine=discriminator",
            "refine=none",
        ),
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


def test_a_refusal_after_the_sharing_round_never_goes_back_before_it():
    """Hybrid mode: the sharing round's model is not an aggregate of updates, so clients that
    claim to refuse the next round's model (a reason only CKKS clients give; synthetic runs
    refuse CKKS) cannot send the run back to the model before the rows were shared (found by
    a hostile review: the first training round after it had that model as its way back)."""
    import types

    import torch

    from fedapp.core.config import compose
    from strategies import build_strategy

    cfg = compose(
        "task=medical strategy=synthetic strategy.mode=hybrid strategy.generator.rounds=1 "
        "rounds=4 clients_per_round=4 eval_clients_per_round=0"
    )
    s = build_strategy(cfg, num_nodes=4)
    s.bind({3000 + p: p for p in range(4)}, seed=0)
    start, shared = ArrayRecord({"w": torch.zeros(2)}), ArrayRecord({"w": torch.ones(2)})
    s.phase = types.SimpleNamespace(rounds=1, play_round=lambda *a, **k: None)
    s.sharing_round = lambda grid, arrays, config, timeout: shared
    refusal = types.SimpleNamespace(
        has_error=lambda: True,
        error=types.SimpleNamespace(reason="refused the global model: it has NaN/Inf values"),
    )

    class Grid:
        def send_and_receive(self, msgs, timeout=None):
            return [refusal] * 4

    s.configure_train = lambda rnd, arrays, config, grid: []
    s.aggregate_train = lambda rnd, replies: (None, None)
    s.evaluate_round = lambda *a, **k: None
    seen = []
    result = s.start(Grid(), start, num_rounds=4, evaluate_fn=lambda r, a: seen.append(r))
    assert float(result.arrays["w"].numpy().sum()) == 2.0  # the shared model stays
    assert not any("global_model_refused" in r.aggregation for r in s.rounds.values())
    assert seen == [0, 1, 2, 3, 4]
