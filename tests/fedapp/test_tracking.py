"""tracking=tensorboard (fedapp/features/tracking.py): per-round metrics, parameters and the final
model in TensorBoard's event files; a broken tracker never stops a run."""

from __future__ import annotations

import json
import logging

import pytest
from omegaconf import OmegaConf

from fedapp.cli.inline import run_inline
from fedapp.core.config import ConfigError
from fedapp.features.events import sha256_file
from fedapp.features.tracking import call, open_trackers

RUN = "task=credit partition=iid partition.num_partitions=4 rounds=2 clients_per_round=4 eval_clients_per_round=0"


def test_tensorboard_gets_every_round_the_params_and_the_final_model(tmp_path, data_dir):
    pytest.importorskip(
        "tensorboard", reason='the tensorboard extra: pip install -e ".[tensorboard]"'
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run_inline(f"{RUN} tracking=tensorboard", tmp_path / "run")
    res = json.loads((out / "results.json").read_text())
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    test_acc = acc.Scalars("round/test_accuracy")
    assert [e.step for e in test_acc] == [0, 1, 2]
    assert [e.value for e in test_acc] == pytest.approx([r["test_accuracy"] for r in res["rounds"]])
    assert acc.Scalars("final/best_test_accuracy")[0].value == pytest.approx(
        res["final"]["best_test_accuracy"]
    )
    texts = {
        t: acc.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in acc.Tags()["tensors"]
    }
    params = next(v for k, v in texts.items() if k.startswith("params"))
    assert '| task.name | "credit" |' in params and "| rounds | 2 |" in params
    final = next(v for k, v in texts.items() if k.startswith("final_model"))
    assert sha256_file(out / "final_model.pt") in final and "status: completed" in final


def test_an_unknown_tracker_is_a_setup_error_and_a_failing_one_a_warning(caplog):
    with pytest.raises(ConfigError, match="tracking=wandb: unknown tracker"):
        open_trackers(OmegaConf.create({"tracking": {"name": "wandb"}}), None, {})
    assert open_trackers(OmegaConf.create({"tracking": {"name": "none"}}), None, {}) == []

    class Broken:
        def round(self, row):
            raise OSError("disk full")

    caplog.set_level(logging.WARNING, logger="fedapp.tracking")
    call([Broken()], "round", {"round": 1})
    assert "Broken: round failed (disk full); the run goes on" in caplog.text


def test_mlflow_gets_every_round_the_params_the_final_model_and_the_status(tmp_path, data_dir):
    pytest.importorskip("mlflow", reason='the mlflow extra: pip install -e ".[mlflow]"')
    import mlflow

    out = run_inline(f"{RUN} tracking=mlflow", tmp_path / "run")
    res = json.loads((out / "results.json").read_text())
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{(out / 'mlflow.db').resolve()}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedapp").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["fedapp.status"] == "completed"
    history = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [0, 1, 2]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [r["test_accuracy"] for r in res["rounds"]]
    )
    assert run.data.metrics["final.best_test_accuracy"] == pytest.approx(
        res["final"]["best_test_accuracy"]
    )
    assert run.data.params["task.name"] == '"credit"' and run.data.params["rounds"] == "2"
    assert run.data.tags["fedapp.final_model_sha256"] == sha256_file(out / "final_model.pt")
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"final_model.pt", "results.json"} <= names


def test_a_failed_run_ends_its_mlflow_run_as_failed(tmp_path):
    pytest.importorskip("mlflow", reason='the mlflow extra: pip install -e ".[mlflow]"')
    from fedapp.features.tracking import MLflowTracker

    tracker = MLflowTracker({"experiment": "x"}, tmp_path, {"rounds": 1})
    tracker.round({"round": 1, "test_accuracy": float("nan"), "test_loss": 2.0})
    tracker.finish({"meta": {"status": "failed"}, "final": {"round": 1}}, None)
    run = tracker.client.get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.metrics == {"test_loss": 2.0}


def test_a_tracker_never_gets_a_secret_of_the_config():
    from fedapp.features.tracking import _flat, _shown

    shown = _flat(
        _shown(
            {
                "events_db": "postgresql://u:SECRET@db/x",
                "tracking": {"tracking_uri": "https://u:SECRET@m"},
                "secure": {"api_token": "SECRET"},
                "data_dir": "s3://k:SECRET@bucket/data",
                "rounds": 2,
            }
        )
    )
    assert "SECRET" not in repr(shown) and shown["rounds"] == 2
    assert shown["data_dir"] == "s3://***@bucket/data" and "events_db" not in shown
