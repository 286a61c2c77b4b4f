"""Compose the one Hydra configuration that drives every way of running fedapp.

`flwr run` carries a single run-config key, `overrides`, with Hydra overrides; the ServerApp
and ClientApp both call :func:`compose` on it, so simulation, deployment and sweeps see the
same resolved config.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shlex
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

# The repository root when fedapp runs from a checkout (editable install) or from a Flower FAB.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR_ENV = "FEDAPP_DATA_DIR"
OUTPUT_ROOT_ENV = "FEDAPP_OUTPUT_ROOT"
CONF_DIR_ENV = "FEDAPP_CONF_DIR"

_compose_lock = threading.Lock()  # Hydra's global state is not thread-safe


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message says what to change."""


def expected_attackers(*, _root_: DictConfig) -> int:
    """`${fedapp.expected_attackers:}`: attackers per round the attack harness is expected to
    put in a round, ceil(attack.fraction x clients_per_round) (0 without attack). For the
    robust aggregators' `num_malicious_nodes: auto` (oracle knowledge)."""
    attack = _root_.get("attack")
    if attack is None or attack.get("name", "none") == "none":
        return 0
    return math.ceil(float(attack.get("fraction", 0.0)) * int(_root_.clients_per_round))


OmegaConf.register_new_resolver("fedapp.expected_attackers", expected_attackers, replace=True)


def conf_dir() -> Path:
    """Return the directory holding `config.yaml` and the config groups."""
    candidates = [os.environ.get(CONF_DIR_ENV), PROJECT_ROOT / "conf", Path.cwd() / "conf"]
    for cand in candidates:
        if cand and (Path(cand) / "config.yaml").is_file():
            return Path(cand).resolve()
    raise ConfigError(
        f"Cannot find the Hydra configs (conf/config.yaml) next to {PROJECT_ROOT} or in the "
        f"current directory. Run from the repository root or set {CONF_DIR_ENV}."
    )


def parse_overrides(overrides: str | Sequence[str] | None) -> list[str]:
    """Split an overrides string the way a shell would ("a=1 b='x y'" -> ["a=1", "b=x y"])."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        return shlex.split(overrides)
    return [str(o) for o in overrides]


def compose(overrides: str | Sequence[str] | None = None) -> DictConfig:
    """Compose `conf/config.yaml` with Hydra overrides and return the resolved config, each
    setting checked by itself. Whether features combine is checked a layer up: launchers and
    apps compose with `fedapp.checks.compose`, and every ClientApp message passes
    `fedapp.checks.combination_mod`."""
    ovr = parse_overrides(overrides)
    with _compose_lock:
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
                cfg = hydra_compose(config_name="config", overrides=ovr)
        except Exception as exc:  # Hydra's own errors are precise; say them on one line
            text = str(exc).split("Config search path")[0].strip()
            text = text.replace(":\n\t", ": ").replace("\n\t", ", ").replace("\n", " ")
            raise ConfigError(f"{text} (overrides: {' '.join(ovr) or 'none'})") from exc
        finally:
            GlobalHydra.instance().clear()
    cfg = strip_hydra(cfg)
    check_types(ovr, cfg)
    apply_dp_recipe(cfg, ovr)
    try:
        validate(cfg)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # a conversion check_types did not foresee
        raise ConfigError(
            f"a setting has the wrong type ({err}); overrides: {' '.join(ovr) or 'none'}"
        ) from err
    return cfg


@functools.lru_cache(maxsize=32)
def _defaults(choices: tuple[str, ...]) -> DictConfig:
    """The config of these group choices with every value at its default (not validated)."""
    with _compose_lock:
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
                return strip_hydra(hydra_compose(config_name="config", overrides=list(choices)))
        finally:
            GlobalHydra.instance().clear()


def default_config(choices: Sequence[str] = ()) -> DictConfig:
    """The config with these group choices (e.g. `task=credit`) and every value at its
    default; without choices, the root defaults (not validated; cached)."""
    return _defaults(tuple(choices))


def _kind_ok(default: Any, text: str) -> bool:
    if isinstance(default, bool):
        return text.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0")
    if isinstance(default, int):
        text = text.strip().lstrip("+-")
        return text.isdigit() or (_is_number(text) and float(text).is_integer())
    if isinstance(default, float):
        try:
            float(text)
        except ValueError:
            return False
        return True
    return True


def check_types(ovr: Sequence[str], cfg: DictConfig) -> None:
    """An override that gives a number or a boolean setting text that is not one
    (`train.lr=abc`) is a one-line ConfigError naming the key, its default and its type."""
    values = {}
    choices = []
    for o in ovr:
        key, sep, value = o.partition("=")
        if key.startswith("hydra."):  # e.g. the search path of the user's own task YAMLs
            choices.append(o)
            continue
        if not sep or key.startswith("~"):
            continue
        key = key.lstrip("+")
        if "." not in key and isinstance(OmegaConf.select(cfg, key), DictConfig):
            choices.append(o)  # a group choice
        elif isinstance(OmegaConf.select(cfg, key, default=None), (str, float)):
            values[key] = value
    if not values:
        return
    base = _defaults(tuple(choices))
    for key, value in values.items():
        default = OmegaConf.select(base, key, default=None)
        if default is not None and not _kind_ok(default, value):
            kind = type(default).__name__
            kind = {"bool": "true or false", "int": "a whole number", "float": "a number"}[kind]
            raise ConfigError(f"{key}={value}: {key} is {kind} (default {default})")


RECIPE_KEY = "privacy"  # a task's DP recipe: conf/task/<task>.yaml `privacy:` (bench/dp_tuning.py)
_ABSENT = object()
# what a recipe never sets (the node decides: fedapp.core.policy.PATH_KEYS)
_NOT_RECIPE = ("client_val_fraction", "local_path", "name", "_target_")
_RECIPE_PATHLIKE = re.compile(r"(^|[._])(dir|path|file|files|root)$")


def apply_dp_recipe(cfg: DictConfig, ovr: Sequence[str]) -> None:
    """Under `privacy=sample_dp`, the task's own DP recipe (its YAML's `privacy:` block, the
    settings bench/dp_tuning.py selected): `train:` keys go to `train`, `task:` keys to the
    task, every other key to `privacy`. A key the command line sets itself wins; without
    sample_dp the block does nothing, so the task's non-DP settings are untouched."""
    recipe = cfg.task.get(RECIPE_KEY) if "task" in cfg else None
    if not recipe or cfg.get("privacy") is None or cfg.privacy.get("name") != "sample_dp":
        return
    named = {o.partition("=")[0].lstrip("+~") for o in ovr}
    for key, value in recipe.items():
        if key in ("train", "task"):
            if not isinstance(value, DictConfig):
                raise ConfigError(f"task.{RECIPE_KEY}.{key} must be a mapping of {key} settings")
            items = [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            items = [(f"privacy.{key}", value)]
        for dotted, v in items:
            if dotted in named:
                continue
            if dotted.split(".", 1)[1] in _NOT_RECIPE or _RECIPE_PATHLIKE.search(dotted):
                raise ConfigError(
                    f"task.{RECIPE_KEY} sets {dotted}: a recipe sets training and privacy "
                    "settings, never a node's validation share or its paths"
                )
            if OmegaConf.select(cfg, dotted, default=_ABSENT) is _ABSENT:
                raise ConfigError(
                    f"task.{RECIPE_KEY} sets {dotted}, which is not a setting of this config"
                )
            OmegaConf.update(cfg, dotted, v, merge=False)


def strip_hydra(cfg: DictConfig) -> DictConfig:
    """Return a resolved copy of `cfg` without the `hydra` node (runtime-only settings)."""
    data = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(data, dict)
    data.pop("hydra", None)
    out = OmegaConf.create(data)
    OmegaConf.resolve(out)
    return out


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def validate(cfg: DictConfig) -> None:
    """Reject settings that would silently produce a meaningless run (each by itself; the
    features' combination rules are fedapp.checks')."""
    if int(cfg.rounds) < 1:
        raise ConfigError(f"rounds must be >= 1, got {cfg.rounds}")
    if int(cfg.clients_per_round) < 1:
        raise ConfigError(f"clients_per_round must be >= 1, got {cfg.clients_per_round}")
    if int(cfg.eval_clients_per_round) < 0:
        raise ConfigError("eval_clients_per_round must be >= 0")
    if int(cfg.min_replies) < 1:
        raise ConfigError("min_replies must be >= 1")
    if float(cfg.train.lr) <= 0:
        raise ConfigError(f"train.lr must be > 0, got {cfg.train.lr}")
    if int(cfg.train.local_epochs) < 1 and int(cfg.train.max_steps) < 1:
        raise ConfigError("set train.local_epochs >= 1 or train.max_steps >= 1")
    if int(cfg.train.batch_size) < 1:
        raise ConfigError(f"train.batch_size must be >= 1, got {cfg.train.batch_size}")
    if not math.isfinite(float(cfg.train.lr)):
        raise ConfigError(f"train.lr must be finite, got {cfg.train.lr}")
    if int(cfg.train.max_steps) < 0 or int(cfg.train.local_epochs) < 0:
        raise ConfigError("train.max_steps and train.local_epochs must be >= 0")
    if int(cfg.seed) < 0:
        raise ConfigError(f"seed must be >= 0, got {cfg.seed}")
    from tasks.training import PRECISIONS, device_name  # the parser resolve_device uses

    if str(cfg.train.get("precision", "fp32")) not in PRECISIONS:
        raise ConfigError(
            f"train.precision={cfg.train.precision}: use one of {', '.join(PRECISIONS)} "
            "(mixed precision of local training; fp32 = none)"
        )

    try:
        device_name(cfg.get("device", "auto"))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    gpus = str(cfg.simulation.get("client_num_gpus", "auto"))
    if gpus != "auto" and not (_is_number(gpus) and 0 <= float(gpus) <= 1024):
        raise ConfigError(
            f"simulation.client_num_gpus={gpus}: use auto or a number of GPUs >= 0 "
            "(0.25: four ClientApps share a GPU)"
        )
    _fraction(cfg, "quorum", 0.0, 1.0, low_open=False, high_open=False)
    _fraction(cfg, "server_val_fraction", 0.0, 1.0, low_open=False)
    if cfg.task.get("test_fraction") is not None:
        _fraction(cfg, "task.test_fraction", 0.0, 1.0)
    if cfg.task.get("client_val_fraction") is not None:
        _fraction(cfg, "task.client_val_fraction", 0.0, 1.0, low_open=False)
    part = cfg.partition
    if part.name != "natural":
        n = part.get("num_partitions")
        if n is None or int(n) < 1:
            raise ConfigError(
                f"partition.num_partitions must be >= 1 for partition={part.name}, got {n}"
            )
    if part.name == "dirichlet":
        alpha = float(part.get("alpha", 0))
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ConfigError(
                f"partition.alpha must be > 0 (smaller = more skewed), got {part.alpha}"
            )


def _fraction(
    cfg: DictConfig,
    key: str,
    low: float,
    high: float,
    low_open: bool = True,
    high_open: bool = True,
) -> None:
    value = float(OmegaConf.select(cfg, key) or 0.0)
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        lb, hb = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"{key} must be in {lb}{low:g}, {high:g}{hb}, got {value:g}")


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """Plain-dict copy of a config (for JSON)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    return data


def run_config_values(overrides: Sequence[str], output_dir: Path, data_dir: Path) -> dict[str, str]:
    """The Flower run-config keys (`[tool.flwr.app.config]`) of one job, for any engine."""
    return {
        "overrides": " ".join(shlex.quote(o) for o in overrides),
        "output-dir": str(output_dir),
        "data-dir": str(data_dir),
    }


def with_keys(cfg: DictConfig, overrides: list[str], out: Path) -> tuple[DictConfig, list[str]]:
    """The run's config and overrides, unchanged: under secure=ckks the launchers make no key.
    The secret key is the institutions' (a client's `ckks-secret`, or in simulation the client
    side's key folder, fedapp.features.secure.client_key_dir), never the operator's nor in `out`; the
    server gets the public context from the clients."""
    return cfg, overrides


def resolve_data_dir(cfg: DictConfig, run_config: Mapping[str, Any] | None = None) -> Path:
    """Where local datasets live: run-config `data-dir`, cfg.data_dir, $FEDAPP_DATA_DIR, ../shared/data."""
    candidates: list[tuple[str, str | Path | None]] = [
        ("run-config data-dir", (run_config or {}).get("data-dir") or None),
        ("data_dir", cfg.get("data_dir")),
        (f"${DATA_DIR_ENV}", os.environ.get(DATA_DIR_ENV)),
    ]
    for origin, value in candidates:
        if value:
            path = Path(str(value)).expanduser()
            if not path.is_dir():
                raise ConfigError(f"{origin} points to {path}, which is not a directory.")
            return path.resolve()
    for default in (PROJECT_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if default.is_dir():
            return default.resolve()
    raise ConfigError(
        "No data directory found. Set FEDAPP_DATA_DIR=/path/to/data (the folder holding femnist/, "
        "heart_disease_uci/, ...), or pass data_dir=/path as an override."
    )


def resolve_output_dir(cfg: DictConfig, run_config: Mapping[str, Any] | None = None) -> Path:
    """Absolute output directory of a run (created)."""
    explicit = (run_config or {}).get("output-dir") or cfg.get("output_dir")
    if cfg.get("resume"):  # a resumed run continues in the folder of the run it resumes
        resume = Path(str(cfg.resume)).expanduser().resolve()
        if explicit and Path(str(explicit)).expanduser().resolve() != resume:
            raise ConfigError(
                f"resume={cfg.resume} continues in that run's folder; drop the other output "
                f"folder ({explicit})"
            )
        explicit = str(resume)
    if explicit:
        out = Path(str(explicit)).expanduser()
    else:
        root = Path(os.environ.get(OUTPUT_ROOT_ENV) or Path.cwd() / "outputs")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out = root / f"{stamp}-{cfg.task.name}-{cfg.strategy.name}-s{cfg.seed}"
    out = out.resolve()
    try:
        if explicit:
            out.mkdir(parents=True, exist_ok=True)
        else:  # never another run's folder, even one started in the same second
            out = _new_folder(out)
        probe = out / f".fedapp-write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"cannot use {out} as the output folder ({err.strerror or err}); choose another "
            "with --output-dir (or output_dir=)"
        ) from err
    return out


def _new_folder(out: Path) -> Path:
    """`out`, or `out-2`, `out-3`... : the first that did not exist (made atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        cand = out if k == 1 else out.with_name(f"{out.name}-{k}")
        try:
            cand.mkdir()
        except FileExistsError:
            continue
        return cand
    raise ConfigError(f"too many runs named {out.name}* in {out.parent}")
