"""The Flower adapter (fedapp/flower_compat.py): every private or semi-private Flower API
fedapp relies on, exercised here so that an upgrade that moves or changes one fails here,
loudly, instead of somewhere in a run. And a guard: nothing else imports them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedapp.config import PROJECT_ROOT
from fedapp.flower_compat import (
    SUPERLINK_NODE_ID,
    ErrorCode,
    aggregate_arrayrecords,
    aggregate_metricrecords,
    recorddict_from_bytes,
    recorddict_to_bytes,
    select_multikrum,
    set_message_id,
    set_src_node_id,
    set_task_identity,
)


def test_message_ids_can_be_assigned_and_replies_point_to_them():
    set_task_identity(run_id=7, task_id=1, node_id=SUPERLINK_NODE_ID)
    msg = Message(RecordDict(), dst_node_id=42, message_type=MessageType.TRAIN)
    set_message_id(msg, "m-1")
    assert msg.metadata.message_id == "m-1" and msg.metadata.run_id == 7
    set_task_identity(node_id=42)
    reply = Message(RecordDict({"metrics": MetricRecord({"a": 1})}), reply_to=msg)
    assert reply.metadata.reply_to_message_id == "m-1"
    assert reply.metadata.src_node_id == 42 and reply.metadata.dst_node_id == SUPERLINK_NODE_ID
    error = Message(Error(ErrorCode.NODE_UNAVAILABLE, "gone"), reply_to=msg)
    assert error.has_error() and error.error.code == ErrorCode.NODE_UNAVAILABLE
    set_task_identity(run_id=1, task_id=1, node_id=0)


def test_a_replys_sender_can_be_restamped():
    msg = Message(RecordDict(), dst_node_id=42, message_type=MessageType.TRAIN)
    set_message_id(msg, "m-2")
    reply = Message(RecordDict(), reply_to=msg)
    set_src_node_id(reply, 7)
    assert reply.metadata.src_node_id == 7 and reply.metadata.reply_to_message_id == "m-2"


def test_recorddicts_survive_the_wire_format_with_their_arrays():
    records = RecordDict(
        {
            "arrays": ArrayRecord([np.arange(5, dtype=np.float32), np.ones((2, 3), np.int64)]),
            "metrics": MetricRecord({"a": 1, "b": [0.5, 2.0]}),
            "config": ConfigRecord({"s": "text", "raw": b"\x00\x01"}),
        }
    )
    back = recorddict_from_bytes(recorddict_to_bytes(records))
    assert set(back) == set(records)
    for a, b in zip(
        back["arrays"].to_numpy_ndarrays(), records["arrays"].to_numpy_ndarrays(), strict=True
    ):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert dict(back["metrics"]) == dict(records["metrics"])
    assert dict(back["config"]) == dict(records["config"])


def test_error_codes_fedapp_uses_exist_and_differ():
    codes = [
        ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
        ErrorCode.NODE_UNAVAILABLE,
        ErrorCode.CLIENT_APP_CRASHED,
        ErrorCode.MESSAGE_UNAVAILABLE,
    ]
    assert len(set(codes)) == 4 and all(isinstance(c, int) for c in codes)


def _record(value: float, n: int) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord([np.full(3, value, np.float32)]),
            "metrics": MetricRecord({"num-examples": n, "loss": value}),
        }
    )


def test_flowers_fedavg_math_is_the_weighted_mean():
    records = [_record(1.0, 10), _record(4.0, 30)]
    arrays = aggregate_arrayrecords(records, "num-examples")
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, 3.25))
    metrics = aggregate_metricrecords(records, "num-examples")
    assert metrics["loss"] == 3.25


def test_multikrum_selection_leaves_out_the_outlier():
    records = [_record(v, 10) for v in (1.0, 1.1, 0.9, 50.0)]
    selected = select_multikrum(records, 1, 2)
    assert len(selected) == 2 and all(r is not records[3] for r in selected)


# Private Flower/flwr-datasets modules or attributes, and where they may appear.
FORBIDDEN = [
    r"flwr\.common\.constant",
    r"flwr\.supercore",
    r"strategy_utils",
    r"flwr\.serverapp\.strategy\.multikrum",
    r"__dict__\[",
    r"_construct_messages",
    r"_determine_partition_id_to_indices",
    r"TaskIdentity",
]


def test_no_private_flower_api_outside_the_adapter():
    offenders = []
    for pkg in ("fedapp", "strategies", "tasks", "bench", "tests"):
        for path in sorted((PROJECT_ROOT / pkg).rglob("*.py")):
            if path.name in ("flower_compat.py", Path(__file__).name):
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if any(re.search(p, line) for p in FORBIDDEN):
                    offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{i}: {line.strip()}")
    assert not offenders, "use fedapp.flower_compat instead:\n" + "\n".join(offenders)
