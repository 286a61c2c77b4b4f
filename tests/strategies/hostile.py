"""Builders of honest and hostile client replies, shared by the hostile-reply tests and the fuzz
suite (tests/strategies/test_hostile_replies.py, test_reply_fuzz.py).

A reply is described as a plain spec, {"arrays": {name: ndarray | Array}, "metrics": {key:
value}, "records": {name: record}}, that a mutation edits field by field (`MUTATIONS`) and
`message` turns into the Flower Message the server would receive."""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedapp.checks import compose
from fedapp.core.flower_compat import set_task_identity
from fedapp.features.compression import CompressionSpec, encode
from strategies import build_strategy
from strategies.claims import ClaimPolicy
from tests.conftest import FakeGrid, instruction

SHAPES = {"w": (3,), "b": (2,)}
HONEST_N = 100  # every honest client's rows (its statistics count and its claim)
HONEST_VAL = 20  # its validation rows
NODES = 4  # clients per round: three honest and one hostile (the last)


def model(value: float = 0.0) -> dict[str, np.ndarray]:
    return {k: np.full(s, value, dtype=np.float32) for k, s in SHAPES.items()}


def record(arrays: dict[str, Any]) -> ArrayRecord:
    return ArrayRecord(
        {k: v if isinstance(v, Array) else Array(np.asarray(v)) for k, v in arrays.items()}
    )


@lru_cache(maxsize=32)
def _config(name: str, nodes: int):
    return compose(f"strategy={name} clients_per_round={nodes} eval_clients_per_round={nodes}")


def strategy(name: str = "fedavg", codec: str = "none", stats: bool = True, nodes: int = NODES):
    """(strategy, grid, node ids, global model) bound to `nodes` clients, all in the round;
    with `stats` every client counted HONEST_N rows in its statistics before round 1."""
    s = build_strategy(_config(name, nodes), num_nodes=nodes)
    node_ids = [3000 + 5 * p for p in range(nodes)]
    s.bind({n: p for p, n in enumerate(node_ids)}, seed=0, min_replies=1)
    s.compression = CompressionSpec.from_config({"name": codec, "ratio": 0.5, "block": 2})
    s.bind_claims(ClaimPolicy(), {p: HONEST_N for p in range(nodes)} if stats else {})
    grid = FakeGrid(node_ids)
    g = record(model(0.0))
    return s, grid, node_ids, g


def message(
    node: int, spec: dict[str, Any], kind: str = MessageType.TRAIN, arrays_name: str = "arrays"
) -> Message:
    """The reply of `node` as the server receives it (its arrays in the ArrayRecord named
    `arrays_name`: "rows" for synthetic rows)."""
    msg = instruction(node, kind)
    set_task_identity(node_id=node)
    content = RecordDict()
    if spec.get("arrays") is not None:
        content[arrays_name] = record(spec["arrays"])
    if spec.get("metrics") is not None:
        content["metrics"] = MetricRecord(spec["metrics"])
    for name, rec in (spec.get("records") or {}).items():
        content[name] = rec
    out = Message(content, reply_to=msg)
    set_task_identity(node_id=0)
    return out


def train_metrics(n: float = HONEST_N) -> dict[str, Any]:
    return {
        "num-examples": n,
        "train_loss": 0.5,
        "train_steps": 10.0,
        "train_time_s": 0.1,
        "label-counts": [60, 40],
    }


def train_spec(value: float, codec: str = "none", n: float = HONEST_N) -> dict[str, Any]:
    """An honest training reply: the global model (zeros) plus `value` everywhere, encoded as
    `codec` sends it (the update, packed)."""
    trained = model(value)
    if codec == "none":
        arrays: dict[str, Any] = trained
    else:
        spec = CompressionSpec.from_config({"name": codec, "ratio": 0.5, "block": 2})
        arrays, _ = encode(trained, spec, {})  # the global model is zero: update = model
    return {"arrays": dict(arrays), "metrics": train_metrics(n)}


def eval_spec(accuracy: float = 0.5, n: int = HONEST_VAL) -> dict[str, Any]:
    right = int(round(accuracy * n))
    return {
        "arrays": None,
        "metrics": {
            "num-examples": n,
            "eval_loss": 0.7,
            "eval_accuracy": accuracy,
            "eval_time_s": 0.01,
            "eval-confusion": [
                right // 2,
                n // 2 - right // 2,
                n // 2 - (right - right // 2),
                right - right // 2,
            ],
        },
    }


# -- mutations ------------------------------------------------------------------------------------
def _garbage(a: np.ndarray) -> Array:
    return Array(
        dtype=str(a.dtype), shape=tuple(a.shape), stype="numpy.ndarray", data=b"\x93NUMPY junk"
    )


def _header_lie(a: np.ndarray) -> Array:
    """The header says `a`'s shape and dtype; the bytes hold two values more."""
    a = np.asarray(a)
    real = Array(np.concatenate([a.ravel(), np.zeros(2, a.dtype)]))
    return Array(dtype=real.dtype, shape=tuple(a.shape), stype=real.stype, data=real.data)


def _set(a: np.ndarray, v) -> np.ndarray:
    out = np.array(a, copy=True)
    if out.size:
        out.flat[0] = v
    return out


ARRAY_OPS: dict[str, Callable[[np.ndarray], Any]] = {
    "float64": lambda a: np.asarray(a, np.float64),
    "float16": lambda a: np.asarray(a, np.float16),
    "int32": lambda a: np.asarray(a).astype(np.int32),
    "int64": lambda a: np.asarray(a).astype(np.int64),
    "uint8": lambda a: np.asarray(a).astype(np.uint8),
    "float32": lambda a: np.asarray(a, np.float32),
    "complex": lambda a: np.asarray(a).astype(np.complex64),
    "strings": lambda a: np.asarray(a).astype(str),
    "truncate": lambda a: np.asarray(a).ravel()[:-1],
    "extend": lambda a: np.concatenate([np.asarray(a).ravel(), np.asarray(a).ravel()[:1]]),
    "empty": lambda a: np.asarray(a).ravel()[:0],
    "2d": lambda a: np.asarray(a).reshape(1, -1),
    "scalar": lambda a: np.asarray(np.asarray(a).ravel()[:1].sum()),
    "nan": lambda a: (
        _set(a, np.nan) if np.asarray(a).dtype.kind == "f" else _set(a.astype(np.float32), np.nan)
    ),
    "inf": lambda a: (
        _set(a, np.inf) if np.asarray(a).dtype.kind == "f" else _set(a.astype(np.float32), np.inf)
    ),
    "huge": lambda a: _set(np.asarray(a, np.float64), 1e300),
    "max": lambda a: (
        _set(a, np.finfo(np.float32).max)
        if np.asarray(a).dtype.kind == "f"
        else _set(a, np.iinfo(np.asarray(a).dtype).max)
    ),
    "negative": lambda a: _set(a, -(2**31) if np.asarray(a).dtype.kind in "iu" else -1e30),
    "garbage": _garbage,
    "header": _header_lie,
    "random_bytes": lambda a: np.random.default_rng(0).integers(
        0, 256, size=max(1, np.asarray(a).size), dtype=np.uint8
    ),
}
METRIC_OPS: dict[str, Callable[[Any], Any]] = {
    "nan": lambda v: float("nan"),
    "inf": lambda v: float("inf"),
    "-inf": lambda v: float("-inf"),
    "1e300": lambda v: 1e300,
    "-1e300": lambda v: -1e300,
    "1e12": lambda v: 1e12,
    "2^62": lambda v: 2**62,
    "zero": lambda v: 0,
    "negative": lambda v: -1,
    "fraction": lambda v: 0.5,
    "list": lambda v: [1.0, 2.0],
    "empty_list": lambda v: [],
    "long_list": lambda v: [1] * 200_001,
    "scalar": lambda v: 5,
    "neg_list": lambda v: [-1] * (len(v) if isinstance(v, list) else 2),
    "frac_list": lambda v: [0.5] * (len(v) if isinstance(v, list) else 2),
    "huge_list": lambda v: [1e300] * (len(v) if isinstance(v, list) else 2),
    "nan_list": lambda v: [float("nan")] * (len(v) if isinstance(v, list) else 2),
    "list_plus": lambda v: (list(v) + [0]) if isinstance(v, list) else [0, 0, 0],
    "list_minus": lambda v: list(v)[:-1] if isinstance(v, list) else [],
    "list_x1e12": lambda v: [int(x * 1e10) for x in v] if isinstance(v, list) else [10**12],
    "square_9": lambda v: [1] * 9,
    "square_121": lambda v: [0] * 120 + [20],
}
RECORD_OPS = (
    "extra_array_record",
    "extra_metric_record",
    "metrics_as_config",
    "no_metrics",
    "no_arrays",
    "extra_metric_key",
    "drop_all_arrays",
)


def catalogue(spec: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Every (part, field, op) mutation of a reply spec: each array x ARRAY_OPS (+ drop and
    rename), each metric x METRIC_OPS (+ drop and rename), and RECORD_OPS."""
    out = []
    for key in spec.get("arrays") or {}:
        out += [("arrays", key, op) for op in (*ARRAY_OPS, "drop", "rename")]
    for key in spec.get("metrics") or {}:
        out += [("metrics", key, op) for op in (*METRIC_OPS, "drop", "rename")]
    out += [("record", "", op) for op in RECORD_OPS]
    return out


def _mutate_field(fields: dict[str, Any], key: str, op: str, change) -> None:
    """Drop or rename field `key`, or replace its value by `change(value)`."""
    if op == "drop":
        del fields[key]
    elif op == "rename":
        fields[key + "_x"] = fields.pop(key)
    else:
        fields[key] = change(fields[key])


def mutate(spec: dict[str, Any], part: str, key: str, op: str) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    if part == "arrays":
        _mutate_field(
            spec["arrays"],
            key,
            op,
            lambda v: ARRAY_OPS[op](v.numpy() if isinstance(v, Array) else v),
        )
    elif part == "metrics":
        _mutate_field(spec["metrics"], key, op, METRIC_OPS.get(op))
    else:
        records = spec.setdefault("records", {})
        if op == "extra_array_record":
            records["more"] = record({"z": np.ones(4, np.float32)})
        elif op == "extra_metric_record":
            records["more-metrics"] = MetricRecord({"num-examples": 10**12})
        elif op == "metrics_as_config":
            records["metrics-config"] = ConfigRecord(
                {k: v for k, v in (spec.get("metrics") or {}).items() if not isinstance(v, list)}
            )
            spec["metrics"] = None
        elif op == "no_metrics":
            spec["metrics"] = None
        elif op == "no_arrays":
            spec["arrays"] = None
        elif op == "extra_metric_key":
            (spec.get("metrics") or {})["evil"] = 1e14
        elif op == "drop_all_arrays":
            spec["arrays"] = {} if spec.get("arrays") is not None else None
    return spec
