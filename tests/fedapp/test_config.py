"""Hydra composition: defaults, overrides, validation, data and output locations."""

from __future__ import annotations

import pytest

from fedapp.config import (
    ConfigError,
    compose,
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
