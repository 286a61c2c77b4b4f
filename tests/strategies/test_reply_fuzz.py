"""Fuzz suite (issue 31): every field of every reply type the server decodes, mutated (another
dtype, shape, length, type, NaN/Inf, 1e300, garbage bytes, a header that lies, a field dropped,
renamed or added; up to three mutations per reply), in a round with three honest clients.
Whatever the hostile reply holds, the server never raises, the global model stays finite, the
honest clients are used, the hostile reply is used or rejected with a reason, and it takes no
more than its share of any sample-weighted average.

Reply types: training replies under six aggregation rules, the three compression codecs and
CKKS ciphertexts; federated-evaluation replies; preprocessing statistics; discovery answers;
scheduler probes; synthetic rows. `catalogue_size()` counts the (field, mutation) pairs.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from flwr.app import ConfigRecord, MessageType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies.claims import ClaimPolicy
from tests.strategies import hostile as h

HOSTILE = h.NODES - 1
EXAMPLES = int(os.environ.get("FEDAPP_FUZZ_EXAMPLES", "60"))  # per reply type (15 types)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def mutations(spec):
    return st.lists(st.sampled_from(h.catalogue(spec)), min_size=1, max_size=3)


def apply(spec, chosen):
    for part, key, op in chosen:
        fields = spec.get(part) if part != "record" else {"": None}
        if fields is None or key not in fields:
            continue  # removed by an earlier mutation of this reply
        try:
            spec = h.mutate(spec, part, key, op)
        except (TypeError, ValueError, OverflowError):
            continue  # a value Flower cannot carry at all (never reaches a server)
    return spec


def build(node, spec, kind=MessageType.TRAIN, arrays_name="arrays"):
    """The Message, or None where Flower itself refuses the mutated fields (cannot be sent)."""
    try:
        return h.message(node, spec, kind, arrays_name)
    except (TypeError, ValueError):
        return None


def _finite(arrays):
    return all(np.isfinite(a.numpy()).all() for a in arrays.values() if a.numpy().dtype.kind == "f")


def _statuses_fine(clients):
    assert all(clients[p].status == "ok" for p in range(HOSTILE)), clients
    status = clients[HOSTILE].status
    assert status == "ok" or status.startswith(("rejected: ", "error")), status


# -- training replies ------------------------------------------------------------------------------
TRAIN = [
    ("fedavg", "none"),
    ("trust", "none"),
    ("contribution", "none"),
    ("fednova", "none"),
    ("multikrum", "none"),
    ("fedmedian", "none"),
    ("fedavg", "fp16"),
    ("fedavg", "int8"),
    ("fedavg", "topk"),
]


@pytest.mark.parametrize("name, codec", TRAIN, ids=[f"{n}-{c}" for n, c in TRAIN])
@FUZZ
@given(data=st.data())
def test_a_fuzzed_training_reply_never_breaks_the_round(name, codec, data):
    spec = h.train_spec(4.0, codec)
    spec = apply(spec, data.draw(mutations(spec)))
    s, grid, nodes, g = h.strategy(name, codec)
    list(s.configure_train(1, g, ConfigRecord({}), grid))
    hostile = build(nodes[HOSTILE], spec)
    replies = [h.message(nodes[i], h.train_spec(float(i + 1), codec)) for i in range(HOSTILE)]
    arrays, _ = s.aggregate_train(1, [*replies, *([hostile] if hostile else [])])
    assert arrays is not None and _finite(arrays)
    clients = {c.partition_id: c for c in s.rounds[1].clients}
    if hostile is None:
        return
    _statuses_fine(clients)
    weight = clients[HOSTILE].weight
    if name in ("fedavg", "fednova") and weight is not None:
        assert weight <= 0.25 + 1e-9  # its statistics' count bounds its claim
    if name == "trust" and weight is not None:
        assert weight <= 0.5 + 1e-9


@pytest.fixture(scope="module")
def ckks(tmp_path_factory):
    from fedapp.features.secure import CT, SecureSpec, create_keys, encrypt, load_context

    folder = tmp_path_factory.mktemp("keys")
    secret, public = create_keys(folder, SecureSpec(name="ckks"))
    secret_ctx = load_context(secret, need_secret=True)
    blobs = [encrypt(secret_ctx, np.full(5, float(i + 1))) for i in range(h.NODES)]
    return secret_ctx, load_context(public, need_secret=False), CT, blobs


@FUZZ
@given(data=st.data())
def test_a_fuzzed_ciphertext_reply_never_breaks_the_encrypted_sum(ckks, data):
    from fedapp.features.secure import SecureAggregator, decrypt

    secret, public, ct, blobs = ckks
    spec = {"arrays": {ct: blobs[HOSTILE]}, "metrics": h.train_metrics()}
    spec = apply(spec, data.draw(mutations(spec)))
    s, grid, nodes, g = h.strategy()
    s.secure = SecureAggregator(public, None, length=5)
    list(s.configure_train(1, g, ConfigRecord({}), grid))
    honest = [
        h.message(nodes[i], {"arrays": {ct: blobs[i]}, "metrics": h.train_metrics()})
        for i in range(HOSTILE)
    ]
    hostile = build(nodes[HOSTILE], spec)
    arrays, _ = s.aggregate_train(1, [*honest, *([hostile] if hostile else [])])
    assert arrays is not None
    assert np.isfinite(decrypt(secret, arrays[ct].numpy())).all()
    clients = {c.partition_id: c for c in s.rounds[1].clients}
    if hostile is not None:
        _statuses_fine(clients)
        assert (clients[HOSTILE].weight or 0.0) <= 0.25 + 1e-9


# -- federated evaluation --------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_a_fuzzed_evaluation_reply_never_breaks_the_averages(data):
    spec = h.eval_spec(1.0)
    spec = apply(spec, data.draw(mutations(spec)))
    s, grid, nodes, g = h.strategy()
    list(s.configure_evaluate(1, g, ConfigRecord({}), grid))
    honest = [h.message(nodes[i], h.eval_spec(0.5), MessageType.EVALUATE) for i in range(HOSTILE)]
    hostile = build(nodes[HOSTILE], spec, MessageType.EVALUATE)
    metrics = s.aggregate_evaluate(1, [*honest, *([hostile] if hostile else [])])
    assert metrics is not None
    pooled = s.rounds[1].eval_metrics
    assert all(math.isfinite(v) for v in pooled.values()), pooled
    assert 0.5 - 1e-9 <= pooled["eval_accuracy"] <= 0.5 * (60 + 2 * 40) / (60 + 40) + 1e-9
    if hostile is not None:
        clients = {c.partition_id: c for c in s.rounds[1].clients}
        _statuses_fine(clients)
        if clients[HOSTILE].ok:  # at most twice its share: 2 x the validation share of its rows
            assert clients[HOSTILE].metrics["num-examples"] <= 2 * h.HONEST_VAL + 1e-9


# -- preprocessing statistics ----------------------------------------------------------------------
def _stats_spec(mean=0.5):
    rows = h.HONEST_N
    return {
        "arrays": None,
        "metrics": {
            "stats.count": [float(rows)] * 2,
            "stats.sum": [rows * mean] * 2,
            "stats.sumsq": [rows * (1.0 + mean**2)] * 2,
            "stats.labels": [60.0, 40.0],
        },
    }


class _StatsGrid:
    def __init__(self, specs):
        self.specs = specs

    def send_and_receive(self, messages, timeout=None):
        out = []
        for msg, spec in zip(messages, self.specs, strict=True):
            reply = build(msg.metadata.dst_node_id, spec, msg.metadata.message_type)
            if reply is not None:
                out.append(reply)
        return out


class _Task:
    def screen_stats(self, values):
        from tasks.tabular import screen_stats

        return screen_stats(values, 2, 2, 1e12)


@FUZZ
@given(data=st.data())
def test_fuzzed_statistics_never_move_the_global_means_far(data):
    from fedapp.server_app import collect_stats, robust_stats
    from tasks.tabular import combine_stats

    spec = _stats_spec(0.9)
    spec = apply(spec, data.draw(mutations(spec)))
    specs = [_stats_spec(0.1 * (i + 1)) for i in range(HOSTILE)] + [spec]
    by_client: dict = {}
    collect_stats(_StatsGrid(specs), list(range(1, h.NODES + 1)), 1.0, _Task(), by_client)
    assert {1, 2, 3} <= set(by_client)
    stats, rows, _ = robust_stats(by_client, ClaimPolicy())
    prep = combine_stats(stats)
    for key, values in prep.items():
        assert all(math.isfinite(v) for v in values), (key, values)
    honest = combine_stats(specs_to_stats(specs[:HOSTILE]))
    spread = 1.0  # every honest client's standard deviation
    for got, want in zip(prep["prep.mean"], honest["prep.mean"], strict=True):
        assert abs(got - want) <= 10 * spread + 1e-9  # bounded by the plausibility check
    assert max(prep["prep.std"]) <= 30 * spread
    assert rows.get(4, 0) <= 100 * h.HONEST_N + 1e-6


def specs_to_stats(specs):
    return [{k: list(v) for k, v in sp["metrics"].items()} for sp in specs]


# -- discovery answers -----------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_a_fuzzed_discovery_answer_never_stops_the_federation(tmp_path_factory, data):
    from fedapp.features.clients import ClientGrid, NodeInfo, client_id

    spec = {"arrays": None, "metrics": {"partition-id": 3, "num-partitions": 4, "has-data-path": 1}}
    spec = apply(spec, data.draw(mutations(spec)))
    nodes = {
        n: NodeInfo.from_metrics({"partition-id": n - 1, "num-partitions": 4, "has-data-path": 1})
        for n in (1, 2, 3)
    }
    reply = build(9, spec, MessageType.QUERY)
    if reply is not None:
        metrics = reply.content.metric_records.get("metrics")
        nodes[9] = NodeInfo.from_metrics(metrics if metrics is not None else {})
    grid = ClientGrid(h.FakeGrid(list(nodes)), nodes, None, tmp_path_factory.mktemp("s"))
    claimed = nodes[9].partition_id if 9 in nodes and nodes[9].has_data_path else None
    for p in range(3):  # an honest client is served, unless the hostile node claimed its id
        # too: then neither serves it (refused and recorded; taking either could hand an
        # institution's place to an impostor)
        assert grid.node_partitions.get(client_id(p)) == (None if p == claimed else p)
    if claimed is not None and 0 <= claimed < 3:
        assert "all claim partition-id" in grid.ignored[9]
    assert len(grid.node_partitions) <= 4 + 1


# -- scheduler probes ------------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_a_fuzzed_probe_is_a_report_or_a_failed_probe(data):
    from strategies.scheduler import probe_report

    spec = {
        "arrays": h.model(0.0),
        "metrics": {"num-examples": 50, "train_steps": 5.0, "train_time_s": 0.2},
    }
    spec = apply(spec, data.draw(mutations(spec)))
    reply = build(3000, spec)
    if reply is None:
        return
    report = probe_report(reply, 0, 1.0)
    if report is not None:
        assert report.num_examples is None or 0 < report.num_examples <= 1e15
        assert report.train_steps is None or 0 <= report.train_steps <= 1e15


# -- synthetic rows --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharing(tmp_path_factory):
    from fedapp.core.config import compose
    from fedapp.features.synthetic import generator_spec, make_generator, rows_record, sample_rows
    from tasks import get_task
    from tests.conftest import DATA_DIR

    cfg = compose("task=medical strategy=synthetic clients_per_round=4 eval_clients_per_round=0")
    task = get_task(cfg, DATA_DIR)
    prep = task.aggregate_stats([task.client_stats(task.load_partition(i)) for i in range(4)])
    spec = generator_spec(cfg)
    rows = sample_rows(make_generator(task, spec), np.array([0, 1] * 10), prep, 3.0, seed=1)
    record = rows_record(rows, prep)
    return cfg, task, prep, {k: record[k].numpy() for k in record}


@FUZZ
@given(data=st.data())
def test_fuzzed_synthetic_rows_never_break_the_sharing_round(sharing, data):
    from fedapp.features.synthetic import attach
    from strategies import build_strategy

    cfg, task, prep, arrays = sharing
    spec = {"arrays": dict(arrays), "metrics": {"num-examples": 20, "synthetic-rows": 20}}
    spec = apply(spec, data.draw(mutations(spec)))
    s = build_strategy(cfg, num_nodes=4)
    nodes = [3000 + 5 * p for p in range(4)]
    s.bind({n: p for p, n in enumerate(nodes)}, seed=0)
    attach(s, cfg, task, prep, settings=None)  # the generator phase, the task's table
    s._sharing, s._received = True, {}
    honest = [
        h.message(
            nodes[i],
            {"arrays": dict(arrays), "metrics": {"num-examples": 20, "synthetic-rows": 20}},
            arrays_name="rows",
        )
        for i in range(3)
    ]
    hostile = build(nodes[3], spec, arrays_name="rows")
    accepted = s.screen_replies(1, [*honest, *([hostile] if hostile else [])], "train")
    assert len(accepted) >= 3
    for m in accepted:
        rows = s._received[m.metadata.src_node_id]
        assert np.isfinite(np.nan_to_num(rows.numeric, nan=0.0)).all()
        assert ((rows.y >= 0) & (rows.y < task.num_classes)).all()


# -- the suite's size -------------------------------------------------------------------------------
def catalogue_size() -> dict[str, int]:
    """(field, mutation) pairs per reply type (each example draws one to three of them)."""
    from fedapp.features.secure import CT

    specs = {
        **{f"train/{n}/{c}": h.train_spec(1.0, c) for n, c in TRAIN},
        "train/ckks": {"arrays": {CT: np.zeros(8, np.uint8)}, "metrics": h.train_metrics()},
        "evaluate": h.eval_spec(),
        "stats": _stats_spec(),
        "discovery": {"metrics": {"partition-id": 3, "num-partitions": 4, "has-data-path": 1}},
        "probe": {
            "arrays": h.model(0.0),
            "metrics": {"num-examples": 50, "train_steps": 5.0, "train_time_s": 0.2},
        },
        "synthetic_rows": {
            "arrays": {"numeric": 0, "codes": 0, "y": 0},
            "metrics": {"num-examples": 20, "synthetic-rows": 20},
        },
    }
    return {name: len(h.catalogue(spec)) for name, spec in specs.items()}


def test_the_catalogue_covers_every_field_of_every_reply_type():
    sizes = catalogue_size()
    assert len(sizes) == 15 and all(n >= 30 for n in sizes.values()), sizes
