"""bench/synthetic.py's report: cells whose run folders are gone (a fresh checkout) keep their
numbers from the stored report, and a partial invocation reports the whole grid."""

from __future__ import annotations

import argparse
import json

import pytest

from bench import synthetic


def _cell(method, seeds, roc, bytes_):
    n = len(seeds)
    return {
        "task": "credit",
        "epsilon": "3",
        "method": method,
        "seeds": seeds,
        "roc_auc": roc,
        "pr_auc": [0.4] * n,
        "recall_at_prevalence": [0.4] * n,
        "bytes": bytes_,
        "rounds": [30] * n,
        "epsilon_spent": [3.0] * n,
        "mia_auc": [0.5] * n,
        "dcr_member_share": [None] * n,
        "dcr_member_median": [None] * n,
        "majority": [0.78] * n,
    }


def test_stored_cells_are_kept_and_paired_by_seed(tmp_path):
    stored = {
        "cells": [
            _cell("fedavg", [0, 1], [0.75, 0.70], [8_000_000, 8_000_000]),
            _cell("rare_class", [1], [0.65], [2_000_000]),  # seed 0 was never run
        ]
    }
    (tmp_path / "synthetic.json").write_text(json.dumps(stored))
    args = argparse.Namespace(
        tasks=["credit"],
        epsilons=["3"],
        seeds=[0, 1, 2],
        methods=["fedavg", "rare_class"],
        out=tmp_path,
    )
    summary = synthetic.summarize(args, synthetic.plan(args))  # no run folders at all
    fedavg, rare = summary["cells"]
    assert fedavg["seeds"] == [0, 1] and fedavg["roc_auc"] == [0.75, 0.70]
    assert rare["seeds"] == [1] and rare["roc_auc"] == [0.65]
    assert rare["roc_auc_gap"] == pytest.approx([0.05])  # against FedAvg's seed 1 only
    assert rare["bytes_ratio"] == pytest.approx([4.0])


def test_union_keeps_the_grid_first():
    assert synthetic.union(["a", "b"], ["b", "c"]) == ["a", "b", "c"]
