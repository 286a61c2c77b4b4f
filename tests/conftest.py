"""Shared fixtures: the real local data folder and small helpers to build Flower messages."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from hypothesis import settings

from fedapp.core.config import PROJECT_ROOT
from fedapp.core.flower_compat import set_task_identity

# Property tests draw the same examples on every run (CI must not flake on a new draw);
# HYPOTHESIS_PROFILE=explore searches afresh each time, for local bug hunting.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Flower calls gc.collect() whenever it unpacks a record without keeping it (e.g. in Bulyan's
# aggregation, once per reply); in a test process every collection walks the millions of
# objects torch, Flower and Hydra create at import. Those live for the whole session, so they
# are moved out of the collector's sight once (gc.freeze; later objects are collected as usual).
import gc  # noqa: E402

import torch  # noqa: E402, F401  (imported here so that its objects are frozen too)

gc.collect()
gc.freeze()


# The same at the start of each test module, for what the session accumulates (task and
# config caches, the board's server, ...): without it, Bulyan's test alone spent 64 of its
# 66 s in the collector late in the suite. Collected first, so nothing that is already garbage
# is frozen; frozen objects that die later are freed by reference counting as usual, except
# those in reference cycles, which stay (a little memory per module, no change to any test).
_frozen_for: list = [None]


def pytest_runtest_setup(item) -> None:
    if item.module is not _frozen_for[0]:
        _frozen_for[0] = item.module
        gc.collect()
        gc.freeze()


DATA_DIR = Path(os.environ.get("FEDAPP_DATA_DIR") or PROJECT_ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "femnist").is_dir():
        pytest.fail(f"real data not found at {DATA_DIR}; set FEDAPP_DATA_DIR")
    return DATA_DIR


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    # One cache per test session, never the user's ~/.cache.
    monkeypatch.setenv("FEDAPP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _task_identity():
    # Flower messages need a run/task identity, which a ServerApp process would have.
    _identity()


def _identity() -> None:
    set_task_identity(run_id=1, task_id=1, node_id=0)


class FakeGrid:
    """Enough of flwr's Grid for configure_train/evaluate: a fixed set of connected nodes."""

    def __init__(self, node_ids):
        self.node_ids = list(node_ids)

    def get_node_ids(self):
        return list(self.node_ids)


def instruction(node_id: int, message_type: str = MessageType.TRAIN) -> Message:
    _identity()
    return Message(RecordDict(), dst_node_id=node_id, message_type=message_type)


def reply(
    node_id: int,
    arrays: list[np.ndarray] | None,
    metrics: dict,
    message_type: str = MessageType.TRAIN,
) -> Message:
    """A reply from `node_id` as the server would receive it."""
    msg = instruction(node_id, message_type)
    set_task_identity(node_id=node_id)
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    return Message(content, reply_to=msg)


def error_reply(node_id: int, reason: str = "boom") -> Message:
    from flwr.app import Error

    msg = instruction(node_id)
    set_task_identity(node_id=node_id)
    return Message(Error(code=2, reason=reason), reply_to=msg)


def independent_epsilon(history, delta: float) -> float:
    """Epsilon of a history of (noise multiplier, sample rate, steps) by an accountant that is
    not the code's own: Google's dp_accounting (RDP of Poisson-subsampled Gaussians), with the
    same RDP orders as fedapp.features.privacy (so the two agree to ~1e-3; the orders are a choice of
    bound, not of mechanism)."""
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    from fedapp.features.privacy import DEFAULT_ORDERS, LARGE_ORDERS

    full = all(float(q) == 1.0 for _, q, _ in history)
    acc = RdpAccountant(orders=LARGE_ORDERS if full else DEFAULT_ORDERS)
    for sigma, q, steps in history:
        event = GaussianDpEvent(float(sigma))
        if float(q) < 1.0:
            event = PoissonSampledDpEvent(float(q), event)
        acc.compose(SelfComposedDpEvent(event, int(steps)))
    return float(acc.get_epsilon(delta))


# A minimal Flower app (pyproject only), for FAB building and signing tests.
TINY_APP = b"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "1.2.3"
dependencies = []

[tool.flwr.app]
publisher = "tester"

[tool.flwr.app.components]
serverapp = "tiny.server:app"
clientapp = "tiny.client:app"

[tool.flwr.app.config]
x = 1
"""
