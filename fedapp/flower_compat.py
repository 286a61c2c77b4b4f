"""The one place where fedapp touches Flower or flwr-datasets beyond their public APIs.

Flower 1.41 has no public way to do a few things fedapp needs; each is wrapped here, with a
test in `tests/fedapp/test_flower_compat.py` that fails loudly when an upgrade moves or
changes it. Nothing else in the code base may import a private Flower module or write a
Flower object's private attributes.

| what | why it is not public | used by |
|---|---|---|
| `set_message_id` | only the SuperLink assigns message ids (`Metadata` has no setter) | the in-process engine and the clock's synthetic error replies |
| `set_task_identity` | the identity a ServerApp/ClientApp process runs under (`flwr.supercore`) | the in-process engine; tests that build replies |
| `ErrorCode` | the codes of `Error` replies live in `flwr.common.constant` | the clock, the in-process engine |
| `aggregate_arrayrecords`, `aggregate_metricrecords` | Flower's FedAvg math, in `flwr.serverapp.strategy.strategy_utils` | strategies that reuse FedAvg's average |
| `select_multikrum` | Multi-Krum's selection, a module-level function of `flwr.serverapp.strategy.multikrum` | effective shares of Krum/Multi-Krum |
"""

from __future__ import annotations

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.constant import ErrorCode as _ErrorCode
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
    "set_message_id",
    "set_task_identity",
]

ErrorCode = _ErrorCode
aggregate_arrayrecords = _agg_arrays
aggregate_metricrecords = _agg_metrics
select_multikrum = _select_multikrum


def set_message_id(msg: Message, message_id: str) -> None:
    """Give `msg` the id a SuperLink would have given it (Flower writes the same field)."""
    msg.metadata.__dict__["_message_id"] = message_id


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
