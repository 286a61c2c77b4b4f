"""fedapp-centralized: the upper bound the federated runs are compared to, on their test rows."""

from __future__ import annotations

import json

from fedapp.checks import compose
from fedapp.cli.centralized import train_centralized
from tasks import get_task


def test_centralized_reports_on_the_federated_runs_test_rows(tmp_path, data_dir):
    overrides = ["task=medical", "centralized.epochs=1", "server_val_fraction=0.2", "seed=3"]
    res = train_centralized(overrides, tmp_path / "run")
    task = get_task(compose(overrides), data_dir)
    val, test = task.central_test_split(0.2, 3)
    full = len(task.load_central_test())
    assert res["meta"]["test_examples"] == len(test) == full - len(val) < full
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["epochs"][-1]["test_num_examples"] == len(test)
    assert written["final"]["test_accuracy"] == res["final"]["test_accuracy"]
