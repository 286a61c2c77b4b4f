"""fedapp.checks: the one home of cross-feature checks, at the launchers and on every node."""

from __future__ import annotations

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common import ConfigRecord

from fedapp import checks
from fedapp.core.config import ConfigError
from fedapp.core.config import compose as settings_only


def _message(message_type: str) -> Message:
    return Message(
        RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type=message_type
    )


def _context(overrides: str) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 4},
        state=RecordDict(),
        run_config={"overrides": overrides},
    )


BAD = "task=medical strategy=fedbn"  # FedBN on a model without BatchNorm layers


def test_settings_alone_pass_and_the_combination_is_refused_a_layer_up():
    settings_only(BAD)  # the core layer checks each setting by itself
    with pytest.raises(ConfigError, match="task.norm=batch"):
        checks.compose(BAD)
    with pytest.raises(ConfigError, match="fp16"):
        checks.compose("task=medical privacy=sample_dp train.precision=fp16")
    checks.compose("task=medical strategy=fedbn task.norm=batch")


def test_a_node_refuses_a_combination_whatever_the_server_checked():
    """A server that skipped the checks: the node's mod refuses the working message before
    any handler runs, and lets discovery through (it names no client yet)."""
    called = []

    def handler(msg, ctx):
        called.append(msg.metadata.message_type)
        return msg

    for kind in ("train", "evaluate", "query.stats"):
        with pytest.raises(ConfigError, match="task.norm=batch"):
            checks.combination_mod(_message(kind), _context(BAD), handler)
    assert called == []
    checks.combination_mod(_message("query"), _context(BAD), handler)
    checks.combination_mod(_message("train"), _context("task=medical"), handler)
    assert called == ["query", "train"]


def test_every_feature_with_a_combination_rule_is_listed():
    assert [group for group, _ in checks.CHECKS] == ["privacy", "secure", "synthetic", "strategy"]
