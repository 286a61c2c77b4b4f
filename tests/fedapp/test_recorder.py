"""The results contract: results.json, rounds.csv, clients.csv and plots."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import torch
from flwr.app import ArrayRecord
from torch import nn

from fedapp.checks import compose
from fedapp.recorder import ROUND_KEYS, Recorder, json_safe
from strategies import build_strategy
from strategies.records import ClientRecord, RoundRecord


class TinyTask:
    def __init__(self):
        self.accs = iter([0.1, 0.5, 0.4])

    def dataset_labels(self, dataset):
        return np.asarray(dataset)

    def make_model(self):
        return nn.Linear(2, 2)

    def majority_accuracy(self, prep, test_labels):
        assert list(test_labels) == [0, 1, 1]  # the test set the recorder was given
        return 0.25

    def evaluate(self, model, dataset, prep=None):
        metrics = dict.fromkeys(
            ("balanced_accuracy", "roc_auc", "pr_auc", "precision", "recall", "f1"), 0.5
        )
        return {
            "loss": 1.0,
            "accuracy": next(self.accs),
            **metrics,
            "num_examples": 10.0,
            "confusion": [3, 1, 2, 4],
        }


def test_results_contract(tmp_path):
    cfg = compose("rounds=2 clients_per_round=2")
    strat = build_strategy(cfg, num_nodes=2)
    strat.bind({9: 0, 10: 1}, seed=0, attackers=[1])
    rec = Recorder(tmp_path, cfg, TinyTask(), strat, {"run_id": 1}, test_set=[0, 1, 1])
    arrays = ArrayRecord(nn.Linear(2, 2).state_dict())
    rec.evaluate_fn(0, arrays)
    for r in (1, 2):
        strat.rounds[r] = RoundRecord(
            expected=[0, 1],
            num_replies=2,
            aggregated=True,
            bytes_up=100,
            bytes_down=200,
            train_metrics={"train_loss": 0.5},
            eval_metrics={"eval_accuracy": 0.3, "eval_loss": float("nan")},
            clients=[
                ClientRecord("train", 0, 9, "ok", {"num-examples": 5}, weight=0.75),
                ClientRecord("train", 1, 10, "ok", {"num-examples": 5}, weight=0.25),
            ],
        )
        rec.evaluate_fn(r, arrays)
    results = rec.finish(arrays)
    data = json.loads((tmp_path / "results.json").read_text())  # strict JSON: NaN became null
    assert set(data) >= {"config", "rounds", "final", "meta"}
    assert [r["round"] for r in data["rounds"]] == [0, 1, 2]
    assert set(ROUND_KEYS) <= set(data["rounds"][1])
    assert data["rounds"][1]["client_loss"] is None
    assert data["rounds"][1]["majority_accuracy"] == 0.25
    assert data["rounds"][1]["test_confusion"] == [3, 1, 2, 4]
    assert data["final"]["best_round"] == 1 and data["final"]["best_test_accuracy"] == 0.5
    assert data["final"]["total_bytes_up"] == 200 and data["final"]["rounds_completed"] == 2
    assert data["config"]["rounds"] == 2 and results["meta"]["status"] == "completed"
    rows = list(csv.DictReader((tmp_path / "rounds.csv").open()))
    assert len(rows) == 3 and list(rows[0])[: len(ROUND_KEYS)] == list(ROUND_KEYS)
    assert data["rounds"][1]["num_sampled"] == 2
    assert data["rounds"][1]["attacker_weight"] == 0.25  # client 1's share
    assert data["rounds"][1]["clients"][0] == {
        "phase": "train",
        "partition_id": 0,
        "node_id": 9,
        "status": "ok",
        "num-examples": 5,
        "weight": 0.75,
    }
    assert len(list(csv.DictReader((tmp_path / "clients.csv").open()))) == 4
    for name in ("accuracy.png", "loss.png", "best_model.pt", "final_model.pt", "config.yaml"):
        assert (tmp_path / name).stat().st_size > 0
    best = torch.load(tmp_path / "best_model.pt")
    assert set(best) == {"weight", "bias"}


def test_json_safe():
    assert json_safe({"a": [float("inf"), np.float32(1.5)], "b": math.nan}) == {
        "a": [None, 1.5],
        "b": None,
    }


def _nodes_table_run(tmp_path, num_clients: int):
    cfg = compose("rounds=1 clients_per_round=1")
    strat = build_strategy(cfg, num_nodes=1)
    strat.bind({9: 0}, seed=0)
    tmp_path.mkdir()
    rec = Recorder(
        tmp_path, cfg, TinyTask(), strat, {"num_clients": num_clients}, test_set=[0, 1, 1]
    )
    calls = []
    rec.nodes_fn = lambda: calls.append(1) or {"0": {"replies": len(calls)}}
    arrays = ArrayRecord(nn.Linear(2, 2).state_dict())
    rec.evaluate_fn(0, arrays)
    strat.rounds[1] = RoundRecord(
        expected=[0],
        num_replies=1,
        aggregated=True,
        clients=[ClientRecord("train", 0, 9, "ok", {"num-examples": 5}, weight=1.0)],
    )
    rec.evaluate_fn(1, arrays)
    during = json.loads((tmp_path / "results.json").read_text())
    rec.finish(arrays)
    after = json.loads((tmp_path / "results.json").read_text())
    return during, after, calls


def test_large_federations_write_the_nodes_table_once_at_the_end(tmp_path):
    # per-round cost must not grow with the federation (issue 19): above 1,000 clients the
    # per-client table is neither built nor written after every round, only when the run ends
    during, after, calls = _nodes_table_run(tmp_path / "big", 1001)
    assert "nodes" not in during and after["nodes"] == {"0": {"replies": 1}} and len(calls) == 1
    during, after, calls = _nodes_table_run(tmp_path / "small", 1000)
    assert during["nodes"] == {"0": {"replies": 2}} and len(calls) == 3
    assert after["rounds"][1]["server_eval_s"] >= 0.0  # the server-side evaluation's seconds
