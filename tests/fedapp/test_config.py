"""Hydra composition: defaults, overrides, validation, data and output locations."""

from __future__ import annotations

import pytest

from fedapp.checks import compose
from fedapp.core.config import (
    ConfigError,
    parse_overrides,
    resolve_data_dir,
    resolve_output_dir,
)


def test_defaults_compose_to_the_main_job():
    cfg = compose()
    assert (cfg.task.name, cfg.strategy.name, cfg.partition.name) == (
        "femnist",
        "fedavg",
        "natural",
    )
    assert "hydra" not in cfg


def test_overrides_string_and_groups():
    cfg = compose(
        "strategy=fedprox strategy.proximal_mu=0.1 partition=dirichlet partition.alpha=0.3 rounds=5"
    )
    assert cfg.strategy.proximal_mu == 0.1 and cfg.partition.alpha == 0.3 and cfg.rounds == 5


def test_parse_overrides_is_shell_like():
    assert parse_overrides("a=1 b='x y'") == ["a=1", "b=x y"]
    assert parse_overrides(None) == []


@pytest.mark.parametrize("bad", ["strategy=nope", "rounds=0", "train.lr=-1", "no_such_key=1"])
def test_invalid_configs_raise_config_error(bad):
    with pytest.raises(ConfigError):
        compose(bad)


def test_data_dir_resolution(monkeypatch, tmp_path):
    cfg = compose()
    monkeypatch.setenv("FEDAPP_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(cfg) == tmp_path.resolve()
    assert resolve_data_dir(cfg, {"data-dir": str(tmp_path)}) == tmp_path.resolve()
    monkeypatch.setenv("FEDAPP_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not a directory"):
        resolve_data_dir(cfg)


def test_output_dir_default_is_named_after_the_run(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDAPP_OUTPUT_ROOT", str(tmp_path))
    out = resolve_output_dir(compose("strategy=fedprox seed=3"))
    assert out.parent == tmp_path and out.name.endswith("-femnist-fedprox-s3") and out.is_dir()
    explicit = resolve_output_dir(compose(), {"output-dir": str(tmp_path / "x")})
    assert explicit == (tmp_path / "x").resolve()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ("train.batch_size=0", "train.batch_size"),
        ("train.lr=inf", "train.lr"),
        ("seed=-5", "seed"),
        ("quorum=1.5", "quorum"),
        ("server_val_fraction=1.0", "server_val_fraction"),
        ("partition=dirichlet partition.alpha=0", "partition.alpha"),
        ("partition=iid partition.num_partitions=0", "partition.num_partitions"),
        ("task=credit task.test_fraction=1.5", "task.test_fraction"),
        ("task=credit task.client_val_fraction=-0.1", "task.client_val_fraction"),
    ],
)
def test_impossible_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose(overrides)


def test_a_config_typo_is_one_line_with_the_choices():
    with pytest.raises(ConfigError) as err:
        compose("strategy=fedavgg")
    text = str(err.value)
    assert "\n" not in text and "fedavgg" in text and "fedavg, fedavg_deadline" in text


def test_launchers_print_setup_errors_in_one_line(capsys):
    from fedapp.cli.launch import main

    assert main(["train.batch_size=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedapp: train.batch_size must be >= 1, got 0"]


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("train.lr=abc", "train.lr=abc: train.lr is a number (default"),
        ("rounds=1.5", "rounds=1.5: rounds is a whole number (default"),
        ("rounds=ten", "rounds=ten: rounds is a whole number"),
        ("checkpoint=maybe", "checkpoint=maybe: checkpoint is true or false"),
        (
            "strategy=fedprox strategy.proximal_mu=x",
            "strategy.proximal_mu=x: strategy.proximal_mu is a number",
        ),
    ],
)
def test_a_setting_of_the_wrong_type_is_one_line_naming_the_key(override, says):
    with pytest.raises(ConfigError) as err:
        compose(f"task=medical {override}")
    assert str(err.value).startswith(says) and "\n" not in str(err.value)
    compose("task=medical rounds=2.0 train.lr=1e-2 checkpoint=false")  # right types pass


def test_an_unusable_output_folder_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"cannot use .*afile/sub as the output folder \(Not a"):
        resolve_output_dir(compose(), {"output-dir": str(tmp_path / "afile" / "sub")})


def test_two_runs_started_in_the_same_second_get_two_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("FEDAPP_OUTPUT_ROOT", str(tmp_path))
    monkeypatch.setattr("time.strftime", lambda fmt: "20261202-120000")
    cfg = compose("seed=1")
    first, second = resolve_output_dir(cfg), resolve_output_dir(cfg)
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == first.name + "-2"


def test_a_second_run_into_a_folder_in_use_stops_at_once(tmp_path):
    from fedapp.server_app import run_lock

    with (
        run_lock(tmp_path),
        pytest.raises(ConfigError, match="output folder of a run in progress"),
        run_lock(tmp_path),
    ):
        pass
    with run_lock(tmp_path):  # released when the first run ended
        pass


def test_the_inline_launcher_says_a_type_error_in_one_line(capsys):
    from fedapp.cli.inline import main

    assert main(["task=medical", "train.lr=abc"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fedapp: train.lr=abc: train.lr is a number (default 0.05)"
    ]


def test_the_type_check_reads_the_users_own_task_yamls(tmp_path):
    """The defaults a type is checked against come from the same search path: a task of the
    user's own folder composes with a text override, and a wrong type still names the key."""
    from fedapp.core.config import conf_dir

    (tmp_path / "task").mkdir()
    text = (conf_dir() / "task" / "medical.yaml").read_text()
    (tmp_path / "task" / "mymed.yaml").write_text(text.replace("name: medical", "name: mymed"))
    own = [f"hydra.searchpath=[file://{tmp_path}]", "task=mymed"]
    assert compose([*own, "task.test_file=/x/test.csv"]).task.name == "mymed"
    with pytest.raises(ConfigError, match="train.lr=abc: train.lr is a number"):
        compose([*own, "train.lr=abc"])
