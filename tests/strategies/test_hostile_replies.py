"""A lying or broken client cannot crash or capture the run (issue 31): one hostile reply of each
kind is rejected with its reason (recorded in the round's client records, i.e. clients.csv and
results.json), the round goes on with the honest replies, and no client's claimed number of
examples takes more than its share. The fuzz suite (test_reply_fuzz.py) mutates every field of
every reply type; these are the named cases, one property each."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedapp.checks import compose
from fedapp.core.config import ConfigError
from fedapp.core.flower_compat import set_task_identity
from fedapp.server_app import collect_stats, robust_stats
from strategies.claims import ClaimError, ClaimPolicy, claim_caps
from strategies.scheduler import probe_report
from tasks.tabular import combine_stats, screen_stats
from tests.strategies import hostile as h

HOSTILE = h.NODES - 1  # the partition id of the hostile client in every round here


def _train(name="fedavg", codec="none", mutate=None, n=None, stats=True):
    """Three honest replies (values 1, 2, 3) and one hostile one (value 4, then `mutate`d)."""
    s, grid, nodes, g = h.strategy(name, codec, stats)
    list(s.configure_train(1, g, ConfigRecord({}), grid))
    specs = [h.train_spec(float(i + 1), codec) for i in range(h.NODES)]
    if n is not None:
        specs[HOSTILE]["metrics"]["num-examples"] = n
    if mutate is not None:
        specs[HOSTILE] = h.mutate(specs[HOSTILE], *mutate)
    replies = [h.message(nodes[i], spec) for i, spec in enumerate(specs)]
    arrays, _ = s.aggregate_train(1, replies)
    clients = {c.partition_id: c for c in s.rounds[1].clients if c.phase == "train"}
    return s, arrays, clients


def _assert_goes_on(arrays, clients):
    assert arrays is not None
    assert all(np.isfinite(a.numpy()).all() for a in arrays.values())
    assert all(clients[p].status == "ok" for p in range(HOSTILE)), clients


# -- training replies --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mutation, reason",
    [
        (("metrics", "num-examples", "nan"), "must be a positive number"),
        (("metrics", "num-examples", "negative"), "must be a positive number"),
        (("metrics", "num-examples", "1e300"), "up to 1e+15"),
        (("metrics", "num-examples", "list"), "must be a positive number"),
        (("metrics", "train_steps", "negative"), "must be non-negative"),
        (("metrics", "train_loss", "1e300"), "beyond 1e+15"),
        (("metrics", "train_loss", "inf"), "non-finite"),
        (("metrics", "label-counts", "frac_list"), "non-negative whole counts"),
        (("metrics", "label-counts", "neg_list"), "non-negative whole counts"),
        (
            ("metrics", "label-counts", "list_plus"),
            "holds 3 values where the round's replies hold 2",
        ),
        (("metrics", "label-counts", "long_list"), "at most 100000"),
        (("metrics", "label-counts", "huge_list"), "beyond 1e+15"),
        (("metrics", "train_loss", "drop"), "metric keys"),
        (("record", "", "extra_metric_key"), "metric keys"),
        (("record", "", "no_metrics"), "exactly one MetricRecord"),
        (("record", "", "extra_metric_record"), "exactly one MetricRecord"),
        (("record", "", "extra_array_record"), "exactly one model ArrayRecord"),
        (("arrays", "w", "float64"), "layout"),
        (("arrays", "w", "extend"), "layout"),
        (("arrays", "w", "drop"), "layout"),
        (("arrays", "w", "nan"), "non-finite"),
        (("arrays", "w", "header"), "header says"),
        (("arrays", "w", "garbage"), "malformed reply (ValueError"),
    ],
)
def test_a_hostile_training_reply_is_rejected_with_its_reason(mutation, reason):
    _, arrays, clients = _train(mutate=mutation)
    assert clients[HOSTILE].status.startswith("rejected: "), clients[HOSTILE].status
    assert reason in clients[HOSTILE].status, clients[HOSTILE].status
    _assert_goes_on(arrays, clients)
    np.testing.assert_allclose(arrays["w"].numpy(), 2.0)  # the honest mean (values 1, 2, 3)


@pytest.mark.parametrize(
    "codec, mutation, reason",
    [
        ("topk", ("arrays", "#idx", "float32"), "#idx is float32, the codec sends int32"),
        ("topk", ("arrays", "#idx", "negative"), "outside the model's"),
        ("topk", ("arrays", "#idx", "max"), "outside the model's"),
        ("topk", ("arrays", "#idx", "truncate"), "indices but"),
        ("topk", ("arrays", "#val", "float64"), "#val is float64"),
        ("topk", ("arrays", "#idx", "drop"), "cannot be decoded"),
        ("int8", ("arrays", "#int8", "float32"), "#int8 is float32"),
        ("int8", ("arrays", "#scale", "extend"), "#scale holds"),
        ("int8", ("arrays", "#scale", "inf"), "non-finite"),
        ("fp16", ("arrays", "#fp16", "float32"), "#fp16 is float32"),
        ("fp16", ("arrays", "#fp16", "truncate"), "#fp16 holds 4 values, the model needs 5"),
        ("fp16", ("arrays", "#fp16", "garbage"), "cannot be decoded"),
    ],
)
def test_a_hostile_compressed_reply_is_rejected_with_its_reason(codec, mutation, reason):
    """Top-k indices sent as floats used to raise IndexError out of the screening."""
    _, arrays, clients = _train(codec=codec, mutate=mutation)
    assert clients[HOSTILE].status.startswith("rejected: "), clients[HOSTILE].status
    assert reason in clients[HOSTILE].status, clients[HOSTILE].status
    _assert_goes_on(arrays, clients)


def test_repeated_top_k_indices_are_rejected():
    spec = h.train_spec(4.0, "topk")
    idx = spec["arrays"]["#idx"].copy()
    idx[1] = idx[0]
    spec["arrays"]["#idx"] = idx
    s, grid, nodes, g = h.strategy(codec="topk")
    list(s.configure_train(1, g, ConfigRecord({}), grid))
    replies = [h.message(nodes[i], h.train_spec(1.0, "topk")) for i in range(HOSTILE)]
    s.aggregate_train(1, [*replies, h.message(nodes[HOSTILE], spec)])
    assert "repeated top-k indices" in s.rounds[1].clients[HOSTILE].status


def test_a_scaffold_control_change_must_have_the_models_layout():
    from strategies.scaffold import CONTROL_DELTA

    s, grid, nodes, g = h.strategy("scaffold")
    list(s.configure_train(1, g, ConfigRecord({}), grid))
    good = h.record(h.model(0.1))
    bad = {
        "evil": h.record({**h.model(0.1), "evil": np.ones(10**5, np.float32)}),
        "shape": h.record({"w": np.ones(7, np.float32), "b": np.ones(2, np.float32)}),
        "ints": h.record({"w": np.ones(3, np.int64), "b": np.ones(2, np.float32)}),
    }
    for what, control in bad.items():
        specs = [{**h.train_spec(1.0), "records": {CONTROL_DELTA: good}} for _ in range(HOSTILE)]
        specs.append({**h.train_spec(1.0), "records": {CONTROL_DELTA: control}})
        s.rounds.clear()
        arrays, _ = s.aggregate_train(1, [h.message(nodes[i], sp) for i, sp in enumerate(specs)])
        status = s.rounds[1].clients[HOSTILE].status
        assert status.startswith(f"rejected: {CONTROL_DELTA}: "), (what, status)
        assert arrays is not None
    assert "evil" not in s.control  # nothing of the hostile change reached the server's control


def test_an_aggregation_that_fails_anyway_keeps_the_previous_model():
    s, grid, nodes, g = h.strategy()
    list(s.configure_train(1, g, ConfigRecord({}), grid))

    def broken(server_round, accepted):
        raise IndexError("a case no check foresaw")

    s.aggregate_accepted = broken
    arrays, _ = s.aggregate_train(1, [h.message(n, h.train_spec(1.0)) for n in nodes])
    assert arrays is None
    assert "IndexError: a case no check foresaw" in s.rounds[1].aggregation["aggregation_failed"]


# -- claims: no client takes more than its share -------------------------------------------------
CAPPED = ["fedavg", "fedprox", "trust", "contribution", "fednova", "moon", "qfedavg"]
CAPPED += ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"]


@pytest.mark.parametrize("name", CAPPED)
def test_a_claim_of_1e12_takes_at_most_its_share_by_default(name):
    """With its statistics count known (every tabular task), a claim above it is capped at it:
    the hostile client weighs as an honest one. Recorded: what it claimed, which cap."""
    s, arrays, clients = _train(name, n=10**12)
    hostile = clients[HOSTILE]
    assert hostile.status == "ok"
    assert hostile.details["num_examples_claimed"] == 1e12
    assert hostile.details["num_examples_cap"] == "stats"
    assert hostile.metrics["num-examples"] == h.HONEST_N
    if hostile.weight is not None:  # q-FedAvg has no per-client share
        assert hostile.weight <= 0.25 + 1e-6 or name in ("krum", "fedmedian")
        assert hostile.weight <= 1.0
    assert arrays is not None


def test_the_cap_does_not_change_honest_weights():
    s, arrays, clients = _train(n=h.HONEST_N)
    assert all("num_examples_claimed" not in c.details for c in clients.values())
    assert [clients[p].weight for p in range(h.NODES)] == [0.25] * 4
    np.testing.assert_allclose(arrays["w"].numpy(), 2.5)


def test_without_statistics_a_claim_is_capped_at_a_ratio_to_the_median():
    s, arrays, clients = _train(n=10**12, stats=False)
    hostile = clients[HOSTILE]
    assert hostile.details["num_examples_cap"] == "median"
    assert hostile.metrics["num-examples"] == 10 * h.HONEST_N
    assert hostile.weight == pytest.approx(1000 / 1300)  # the stated gap: R / (R + 3)


def test_claim_caps_use_earlier_claims_when_replies_come_one_at_a_time():
    """FedAsync and tiered screen replies one by one: the median includes the other clients'
    last (capped) claims, so a lone huge claim is still capped."""
    policy = ClaimPolicy()
    earlier = {0: 100.0, 1: 120.0, 2: 80.0}
    caps = claim_caps({3: 1e12}, {}, earlier, policy)
    assert caps[3] == (10 * 110.0, "median")
    assert claim_caps({3: 1e12}, {3: 90.0}, earlier, policy)[3] == (90.0, "stats")
    off = ClaimPolicy(stats_slack=0, max_examples_ratio=0)
    assert claim_caps({3: 1e12}, {3: 90.0}, earlier, off)[3][0] == math.inf


def test_claims_settings_are_checked():
    assert ClaimPolicy.from_config(compose("").claims) == ClaimPolicy()
    with pytest.raises(ClaimError, match="stats_slack"):
        ClaimPolicy.from_config({"stats_slack": 0.5})
    with pytest.raises(ClaimError, match="unknown"):
        ClaimPolicy.from_config({"max_ratio": 2})
    assert issubclass(ClaimError, ConfigError)  # a one-line setup error


def test_a_probe_with_unusable_metrics_is_a_failed_probe():
    nodes = [3000]
    good = h.message(nodes[0], {"metrics": {"num-examples": 50, "train_steps": 5.0}})
    assert probe_report(good, 0, 1.0).num_examples == 50
    for bad in ({"num-examples": float("nan")}, {"num-examples": 5, "train_steps": -1.0}, None):
        assert probe_report(h.message(nodes[0], {"metrics": bad}), 0, 1.0) is None


# -- evaluation replies --------------------------------------------------------------------------
def _evaluate(mutate=None, n=None, confusion=None, accuracy=0.5):
    s, grid, nodes, g = h.strategy()
    list(s.configure_evaluate(1, g, ConfigRecord({}), grid))
    specs = [h.eval_spec() for _ in range(HOSTILE)] + [h.eval_spec(accuracy)]
    if n is not None:
        specs[HOSTILE]["metrics"]["num-examples"] = n
    if confusion is not None:
        specs[HOSTILE]["metrics"]["eval-confusion"] = confusion
    if mutate is not None:
        specs[HOSTILE] = h.mutate(specs[HOSTILE], *mutate)
    replies = [h.message(nodes[i], sp, MessageType.EVALUATE) for i, sp in enumerate(specs)]
    metrics = s.aggregate_evaluate(1, replies)
    clients = {c.partition_id: c for c in s.rounds[1].clients if c.phase == "evaluate"}
    return s, metrics, clients


@pytest.mark.parametrize(
    "confusion, reason",
    [
        ([1e300, 0.0, 0.0, 20.0], "beyond 1e+15"),
        ([5, 5, 5, 4, 1], "not a k x k matrix"),
        ([-5, 10, 10, 5], "non-negative whole counts"),
        ([0.5, 9.5, 5.0, 5.0], "non-negative whole counts"),
        ([10, 10, 10, 10], "counts 40 rows, but the reply claims num-examples = 20"),
        ([0] * 120 + [20], "not a k x k matrix with k of 1 to 10"),
        ([0] * 8 + [20], "holds 9 values where the round's replies hold 4"),
    ],
)
def test_a_hostile_confusion_matrix_is_rejected_with_its_reason(confusion, reason):
    """1e300 used to raise OverflowError, a non-square length a reshape error."""
    s, metrics, clients = _evaluate(confusion=confusion)
    assert clients[HOSTILE].status.startswith("rejected: ")
    assert reason in clients[HOSTILE].status, clients[HOSTILE].status
    assert all(clients[p].ok for p in range(HOSTILE))
    assert metrics["eval_accuracy"] == pytest.approx(0.5)
    assert s.rounds[1].eval_metrics["eval_accuracy"] == pytest.approx(0.5)


def test_an_inflated_evaluation_claim_takes_at_most_twice_its_share():
    """A claim of 1e12 validation rows, with its confusion counts scaled to match, is capped
    at EVAL_FRACTION_SLACK x the clients' validation share of their rows: the averages (and
    the pooled counts, scaled with the claim) weigh it at most twice an honest client."""
    big = [10**12 // 2, 0, 0, 10**12 // 2]  # perfect accuracy on 1e12 rows
    s, metrics, clients = _evaluate(n=10**12, confusion=big, accuracy=1.0)
    hostile = clients[HOSTILE]
    assert hostile.ok and hostile.details["num_examples_claimed"] == 1e12
    cap = 2 * (h.HONEST_VAL / h.HONEST_N) * h.HONEST_N
    assert hostile.metrics["num-examples"] == pytest.approx(cap)
    expected = (3 * h.HONEST_VAL * 0.5 + cap * 1.0) / (3 * h.HONEST_VAL + cap)
    assert metrics["eval_accuracy"] == pytest.approx(expected)
    assert s.rounds[1].eval_metrics["eval_accuracy"] == pytest.approx(expected, abs=0.01)
    assert cap / (3 * h.HONEST_VAL + cap) <= 2 * 0.25


# -- encrypted aggregation (CKKS) -----------------------------------------------------------------
@pytest.fixture(scope="module")
def ckks(tmp_path_factory):
    from fedapp.features.secure import SecureSpec, create_keys, load_context

    folder = tmp_path_factory.mktemp("keys")
    secret, public = create_keys(folder, SecureSpec(name="ckks"))
    return load_context(secret, need_secret=True), load_context(public, need_secret=False)


def _ckks_strategy(public):
    from fedapp.features.secure import SecureAggregator

    s, grid, nodes, g = h.strategy()
    s.secure = SecureAggregator(public, None, length=5)
    list(s.configure_train(1, g, ConfigRecord({}), grid))
    return s, nodes


def test_under_ckks_claims_are_capped_before_the_plaintext_weights(ckks):
    from fedapp.features.secure import CT, decrypt, encrypt

    secret, public = ckks
    s, nodes = _ckks_strategy(public)
    values = [1.0, 2.0, 3.0, 400.0]
    replies = []
    for i, v in enumerate(values):
        spec = {"arrays": {CT: encrypt(secret, np.full(5, v))}, "metrics": h.train_metrics()}
        if i == HOSTILE:
            spec["metrics"]["num-examples"] = 10**12
        replies.append(h.message(nodes[i], spec))
    arrays, _ = s.aggregate_train(1, replies)
    weights = [c.weight for c in s.rounds[1].clients]
    assert weights == pytest.approx([0.25] * 4)
    np.testing.assert_allclose(decrypt(secret, arrays[CT].numpy()), np.mean(values), atol=1e-3)


@pytest.mark.parametrize("op", ["truncate", "random_bytes", "float32", "2d", "empty", "garbage"])
def test_a_malformed_ciphertext_is_rejected_and_the_sum_goes_on(ckks, op):
    from fedapp.features.secure import CT, encrypt

    secret, public = ckks
    s, nodes = _ckks_strategy(public)
    specs = [
        {"arrays": {CT: encrypt(secret, np.full(5, 1.0))}, "metrics": h.train_metrics()}
        for _ in range(h.NODES)
    ]
    specs[HOSTILE] = h.mutate(specs[HOSTILE], "arrays", CT, op)
    arrays, _ = s.aggregate_train(1, [h.message(nodes[i], sp) for i, sp in enumerate(specs)])
    assert arrays is not None
    status = s.rounds[1].clients[HOSTILE].status
    assert status.startswith("rejected: "), status


class RefusingGrid(h.FakeGrid):
    """Clients that train honestly (their model + 1) until `refuse_round`, where every one of
    them refuses the global model it was sent (fedapp.features.secure's client check)."""

    def __init__(self, node_ids, refuse_round):
        super().__init__(node_ids)
        self.refuse_round, self.sent = refuse_round, {}

    def send_and_receive(self, messages, timeout=None):
        out = []
        for msg in messages:
            if msg.metadata.message_type != MessageType.TRAIN:
                continue
            rnd = int(msg.content["config"]["server-round"])
            received = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            self.sent[rnd] = received
            set_task_identity(node_id=msg.metadata.dst_node_id)
            if rnd == self.refuse_round:
                error = Error(
                    code=2,
                    reason="ModelRefused: refused the global model: its L2 "
                    "norm 1e+20 exceeds this node's max-model-norm 1e+06",
                )
                out.append(Message(error, reply_to=msg))
            else:
                content = RecordDict(
                    {
                        "arrays": h.record({k: v + 1 for k, v in received.items()}),
                        "metrics": MetricRecord(h.train_metrics()),
                    }
                )
                out.append(Message(content, reply_to=msg))
        set_task_identity(node_id=0)
        return out


def test_a_global_model_the_clients_refuse_is_rolled_back():
    """Under CKKS the server cannot decrypt its aggregate; the clients check it (finite, within
    max-model-norm). When most of them refuse it, the server goes back to the model before it,
    and says so in the round record (never a poisoned model kept silently)."""
    s, _, nodes, g = h.strategy()
    s.fraction_evaluate = 0.0
    grid = RefusingGrid(nodes, refuse_round=2)
    result = s.start(grid, g, num_rounds=3)
    np.testing.assert_allclose(grid.sent[2]["w"], 1.0)  # round 1's aggregate, refused
    np.testing.assert_allclose(grid.sent[3]["w"], 0.0)  # back to the model before it
    refused = s.rounds[2].aggregation["global_model_refused"]
    assert refused["clients"] == 4 and "max-model-norm" in refused["reason"]
    assert not s.rounds[2].aggregated
    np.testing.assert_allclose(result.arrays["w"].numpy(), 1.0)


# -- preprocessing statistics ---------------------------------------------------------------------
def _stats(rows, mean, std=1.0, d=2):
    count = [float(rows)] * d
    total = [rows * mean] * d
    sumsq = [rows * (std**2 + mean**2)] * d
    return {
        "stats.count": count,
        "stats.sum": total,
        "stats.sumsq": sumsq,
        "stats.labels": [rows * 0.6, rows * 0.4],
    }


def test_huge_whole_counts_with_matching_sums_do_not_move_the_global_means():
    honest = {c: _stats(100, 0.1 * c) for c in range(1, 8)}
    exact = combine_stats(list(honest.values()))
    liars = {
        "far": _stats(10**12, 1e6),  # means far off: left out with the reason
        "near": _stats(10**12, 0.5),  # plausible means: its weight clipped to 100 x median
    }
    for kind, liar in liars.items():
        stats, rows, refused = robust_stats({**honest, 9: liar}, ClaimPolicy())
        prep = combine_stats(stats)
        if kind == "far":
            assert 9 in refused and "spreads off" in refused[9]
            assert prep == exact
        else:
            assert rows[9] == 100 * 100
            shift = abs(prep["prep.mean"][0] - exact["prep.mean"][0])
            assert shift < 0.15 and all(np.isfinite(prep["prep.std"]))
    stats, rows, refused = robust_stats(honest, ClaimPolicy())
    assert refused == {} and combine_stats(stats) == exact  # honest: exactly as before


def test_impossible_statistics_are_rejected_by_the_tabular_screen():
    good = _stats(100, 0.5)
    assert screen_stats(good, 2, 2, 1e12) is None
    more_values_than_rows = {**good, "stats.count": [150.0, 100.0]}
    assert "feature counts above" in screen_stats(more_values_than_rows, 2, 2, 1e12)
    wide = _stats(100, 0.5, std=1e7)
    assert "variances beyond" in screen_stats(wide, 2, 2, 1e6)


def test_a_statistics_reply_of_any_form_is_left_out_and_the_others_are_used():
    class StatsGrid:
        def __init__(self, bodies):
            self.bodies = bodies

        def send_and_receive(self, messages, timeout=None):
            out = []
            for msg, body in zip(messages, self.bodies, strict=True):
                set_task_identity(node_id=msg.metadata.dst_node_id)
                out.append(Message(body, reply_to=msg))
            set_task_identity(node_id=0)
            return out

    class Task:
        def screen_stats(self, values):
            return screen_stats(values, 2, 2, 1e12)

    good = RecordDict({"metrics": MetricRecord(_stats(100, 0.5))})
    bodies = [
        good,
        RecordDict({"metrics": MetricRecord({"stats.count": 5.0})}),  # a scalar, not a list
        RecordDict({"other": MetricRecord(_stats(100, 0.5))}),  # no "metrics"
        RecordDict({"metrics": ConfigRecord({"stats.count": "many"})}),
    ]
    by_client, refused = {}, {}
    stats = collect_stats(StatsGrid(bodies), [1, 2, 3, 4], 1.0, Task(), by_client, refused)
    assert len(stats) == 1 and list(by_client) == [1]
    assert set(refused) == {2, 3, 4}
    assert all("malformed statistics" in refused[c] for c in (2, 3, 4))


# -- synthetic rows (strategy=synthetic's sharing round) -------------------------------------------
def test_synthetic_rows_of_the_wrong_dtype_are_rejected(data_dir):
    from fedapp.features.synthetic import attach, rows_record, sample_rows
    from strategies import build_strategy
    from tasks import get_task

    cfg = compose("task=medical strategy=synthetic clients_per_round=4 eval_clients_per_round=0")
    task = get_task(cfg, data_dir)
    prep = task.aggregate_stats([task.client_stats(task.load_partition(i)) for i in range(4)])
    s = build_strategy(cfg, num_nodes=4)
    nodes = [3000 + 5 * p for p in range(4)]
    s.bind({n: p for p, n in enumerate(nodes)}, seed=0)
    attach(s, cfg, task, prep, settings=None)  # the generator phase, the task's table
    from fedapp.features.synthetic import make_generator

    vae = make_generator(task, s.spec)
    rows = sample_rows(vae, np.array([0, 1] * 10), prep, s.spec.zclip, seed=1)
    record = rows_record(rows, prep)
    arrays = {k: record[k].numpy() for k in record}
    hostile = {**arrays, "y": arrays["y"].astype(np.float32) + 0.5}
    s._sharing, s._received = True, {}
    replies = [
        h.message(
            nodes[i],
            {
                "arrays": None,
                "metrics": {"num-examples": 20, "synthetic-rows": 20},
                "records": {"rows": h.record(arrays if i < 3 else hostile)},
            },
        )
        for i in range(4)
    ]
    accepted = s.screen_replies(1, replies, "train")
    assert len(accepted) == 3
    assert "wrong dtype" in s.rounds[1].clients[3].status


def test_generator_rows_claim_with_garbage_arrays_do_not_raise(data_dir):
    """A sharing-round reply whose rows are bytes that are no array is a rejected reply."""
    from strategies import build_strategy

    cfg = compose("task=medical strategy=synthetic clients_per_round=4 eval_clients_per_round=0")
    s = build_strategy(cfg, num_nodes=4)
    nodes = [3000 + 5 * p for p in range(4)]
    s.bind({n: p for p, n in enumerate(nodes)}, seed=0)
    s._sharing, s._received = True, {}
    junk = Array(dtype="float16", shape=(3, 3), stype="numpy.ndarray", data=b"junk")
    rows = h.record(
        {"numeric": junk, "codes": np.zeros((3, 1), np.int8), "y": np.zeros(3, np.int8)}
    )
    reply = h.message(
        nodes[0], {"arrays": None, "metrics": {"num-examples": 3}, "records": {"rows": rows}}
    )
    assert s.screen_replies(1, [reply], "train") == []
    assert s.rounds[1].clients[0].status.startswith("rejected: malformed reply")
