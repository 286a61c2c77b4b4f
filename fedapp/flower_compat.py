"""The one place where fedapp touches Flower or flwr-datasets beyond their public APIs.

Flower 1.41 has no public way to do a few things fedapp needs; each is wrapped here, with a
test in `tests/fedapp/test_flower_compat.py` that fails loudly when an upgrade moves or
changes it. Nothing else in the code base may import a private Flower module or write a
Flower object's private attributes.

| what | why it is not public | used by |
|---|---|---|
| `set_message_id` | only the SuperLink assigns message ids (`Metadata` has no setter) | the in-process engine and the clock's synthetic error replies |
| `set_src_node_id` | only the SuperLink stamps a reply's sender (`Metadata` has no setter) | `ClientGrid`: a reply from a shared SuperNode is stamped with the client it answers for |
| `recorddict_to_bytes`, `recorddict_from_bytes` | Flower's own RecordDict wire format (`flwr.common.serde`, protobuf) | a virtual client's state file (no pickle) |
| `set_task_identity` | the identity a ServerApp/ClientApp process runs under (`flwr.supercore`) | the in-process engine; tests that build replies |
| `ErrorCode` | the codes of `Error` replies live in `flwr.common.constant` | the clock, the in-process engine |
| `aggregate_arrayrecords`, `aggregate_metricrecords` | Flower's FedAvg math, in `flwr.serverapp.strategy.strategy_utils` | strategies that reuse FedAvg's average |
| `select_multikrum` | Multi-Krum's selection, a module-level function of `flwr.serverapp.strategy.multikrum` | effective shares of Krum/Multi-Krum |
"""

from __future__ import annotations

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.constant import ErrorCode as _ErrorCode
from flwr.common.serde import recorddict_from_proto as _rd_from_proto
from flwr.common.serde import recorddict_to_proto as _rd_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as _ProtoRecordDict
from flwr.serverapp.strategy.multikrum import select_multikrum as _select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords as _agg_arrays
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords as _agg_metrics
from flwr.supercore.task_identity import TaskIdentity

__all__ = [
    "SUPERLINK_NODE_ID",
    "ErrorCode",
    "aggregate_arrayrecords",
    "aggregate_metricrecords",
    "select_multikrum",
    "recorddict_from_bytes",
    "recorddict_to_bytes",
    "set_message_id",
    "set_src_node_id",
    "set_task_identity",
]

ErrorCode = _ErrorCode
aggregate_arrayrecords = _agg_arrays
aggregate_metricrecords = _agg_metrics
select_multikrum = _select_multikrum


def set_message_id(msg: Message, message_id: str) -> None:
    """Give `msg` the id a SuperLink would have given it (Flower writes the same field)."""
    msg.metadata.__dict__["_message_id"] = message_id


def set_src_node_id(msg: Message, node_id: int) -> None:
    """Stamp `msg` as sent by `node_id` (the field the SuperLink fills in on a reply)."""
    msg.metadata.__dict__["_src_node_id"] = int(node_id)


def recorddict_to_bytes(records: RecordDict) -> bytes:
    """A RecordDict in Flower's protobuf wire format (arrays included)."""
    return _rd_to_proto(records).SerializeToString()


def recorddict_from_bytes(data: bytes) -> RecordDict:
    proto = _ProtoRecordDict()
    proto.ParseFromString(data)
    return _rd_from_proto(proto)


def set_task_identity(
    run_id: int | None = None, task_id: int | None = None, node_id: int | None = None
) -> None:
    """Set the run, task and node this process speaks for (what Flower's runtime sets before
    it calls a ServerApp or ClientApp). Fields left None are not changed."""
    if run_id is not None:
        TaskIdentity.run_id = run_id
    if task_id is not None:
        TaskIdentity.task_id = task_id
    if node_id is not None:
        TaskIdentity.node_id = node_id
