"""A task's DP recipe (the `privacy:` block of conf/task/<task>.yaml, fedapp.core.config.apply_dp_recipe):
applied under privacy=sample_dp only, never to a run without it, and the command line wins."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedapp.core.config import ConfigError, apply_dp_recipe, compose

CONF = Path(__file__).resolve().parents[2] / "conf"
TABULAR = ("credit", "medical", "bankruptcy")


def _recipe(task: str):
    return OmegaConf.load(CONF / "task" / f"{task}.yaml").privacy


@pytest.mark.parametrize("task", TABULAR)
def test_without_sample_dp_the_recipe_changes_nothing(task):
    cfg = compose([f"task={task}"])
    shipped = OmegaConf.load(CONF / "task" / "_tabular_train.yaml").train
    assert cfg.train.batch_size == shipped.batch_size == 32
    assert cfg.train.lr == shipped.lr and cfg.train.local_epochs == shipped.local_epochs
    assert cfg.privacy.name == "none"
    # central DP is another mode: the sample-level recipe does not apply to it either
    central = compose([f"task={task}", "privacy=central_dp"])
    assert central.train.batch_size == 32 and central.privacy.clipping_norm == 1.0


@pytest.mark.parametrize("task", TABULAR)
def test_under_sample_dp_the_tasks_recipe_applies(task):
    recipe = _recipe(task)
    cfg = compose([f"task={task}", "privacy=sample_dp"])
    for key, value in recipe.train.items():
        assert cfg.train[key] == value, key
    for key, value in recipe.get("task", {}).items():
        assert cfg.task[key] == value, key
    for key, value in recipe.items():
        if key not in ("train", "task"):
            assert cfg.privacy[key] == value, key
    assert cfg.train.batch_size != 32  # the recipe is not the non-DP default


def test_the_command_line_wins_over_the_recipe():
    cfg = compose(
        ["task=bankruptcy", "privacy=sample_dp", "train.batch_size=64", "privacy.max_grad_norm=3.0"]
    )
    assert cfg.train.batch_size == 64 and cfg.privacy.max_grad_norm == 3.0
    assert cfg.train.lr == _recipe("bankruptcy").train.lr  # what it does not name still applies


def test_the_default_job_has_no_recipe():
    cfg = compose([])
    assert cfg.task.name == "femnist" and "privacy" not in cfg.task
    assert cfg == compose(["privacy=none"])


def test_a_recipe_naming_an_unknown_setting_is_refused():
    cfg = OmegaConf.create(
        {
            "privacy": {"name": "sample_dp", "max_grad_norm": 1.0},
            "train": {"batch_size": 32},
            "task": {"name": "t", "privacy": {"train": {"batch_sise": 64}}},
        }
    )
    with pytest.raises(ConfigError, match="train.batch_sise"):
        apply_dp_recipe(cfg, [])
    cfg.task.privacy = {"max_grad_norm": 0.5, "train": {"batch_size": 512}}
    apply_dp_recipe(cfg, [])
    assert cfg.privacy.max_grad_norm == 0.5 and cfg.train.batch_size == 512
    cfg.task.privacy = {"train": 5}
    with pytest.raises(ConfigError, match="mapping"):
        apply_dp_recipe(cfg, [])


def test_a_server_cannot_set_the_node_s_validation_share_through_the_recipe():
    """`task.privacy.task.client_val_fraction` from a server would move a node's rows into
    validation (outside the DP guarantee): the client drops every override under
    task.privacy (the recipe is the node's own YAML), and a recipe never sets it anyway."""
    from fedapp.core.config import ConfigError
    from fedapp.core.policy import client_overrides

    hostile = [
        "task=credit",
        "privacy=sample_dp",
        "+task.privacy.task.client_val_fraction=0.9",
        "task.privacy.train.lr=100",
    ]
    kept = client_overrides(hostile)
    assert kept == ["task=credit", "privacy=sample_dp"]
    assert compose(kept).task.client_val_fraction == compose("task=credit").task.client_val_fraction
    with pytest.raises(ConfigError, match="never a node's validation share"):
        compose(hostile)  # the server's own composition refuses it too
