"""The tiered scheduler's profiling probe does not hold the federation up: a node that never
answers (offline: the clock reports it only `detect_s` = 30 s later) costs at most
`profile_timeout_s` before round 1, and is measured by its first training instead."""

from __future__ import annotations

import json

from fedapp.cli.inline import run_inline
from strategies.tiered import TieredScheduling

CREDIT = (
    "task=credit partition=iid partition.num_partitions=12 clients_per_round=6 "
    "eval_clients_per_round=0 checkpoint=false train.local_epochs=1 strategy=tiered "
    "hetero=compute hetero.classes.slow.p_unavailable=1.0 rounds=2 seed=1"
)


def test_the_default_probe_timeout_is_shorter_than_noticing_an_offline_node():
    assert TieredScheduling().profile_timeout_s < 30.0


def test_an_offline_node_does_not_delay_round_one_by_its_detection_time(tmp_path, data_dir):
    res = json.loads((run_inline(CREDIT, tmp_path / "run") / "results.json").read_text())
    first = res["rounds"][1]
    assert first["aggregated"] and first["num_replies"] >= 1
    # the probe stops waiting after profile_timeout_s (3 s); the offline slow nodes would be
    # noticed only after detect_s = 30 s (the old 600 s timeout waited for that)
    assert first["sim_time_s"] < 30.0
