"""The institution is the authority over its own protections (the trust boundary).

The server is not trusted by an institution. Whatever a message says, a ClientApp takes from
it only what the server may choose (the task and strategy among the node's own registered
components, hyperparameters, the round's model), and every protection comes from the node:

- **Its policy** (`NodePolicy`): the keys of a SuperNode's own `--node-config` in deployment;
  in simulation the same keys per client from a file that only the client side reads
  (`$FEDAPP_CLIENT_POLICY`, see `client_policy`), so the same checks run in-process:

  | node-config key | meaning |
  |---|---|
  | `max-epsilon` | requires `privacy=sample_dp`, at most this epsilon for the institution's whole life (every run) |
  | `require-dp` | requires `privacy=sample_dp` (at the run's target, or `max-epsilon`) |
  | `target-epsilon` | lowers the epsilon when the run uses sample_dp (does not require it) |
  | `require-secure` | `ckks`: requires encrypted aggregation |
  | `accept-tasks`, `accept-strategies` | comma-separated names; any other is refused |
  | `val-fraction` | its validation share (the server's `task.client_val_fraction` is never read) |
  | `max-delta` | the largest DP delta it accepts (a larger one asked by the server is lowered) |
  | `ckks-metrics` | `false`: under secure=ckks, no metric computed on a received model is sent |
  | `max-model-norm` | under secure=ckks, a decrypted global model above this L2 norm is refused |
  | `institution` | the id its DP ledger is kept under (default `client-<partition id>`) |
  | `ledger-dir` (`dp-state-dir`) | where its DP ledger lives, across runs and restarts |
  | `state-dir` | where its other state lives (SCAFFOLD controls, residuals...) |
  | `conf-dir` | a folder of its own task YAMLs (`conf-dir/task/NAME.yaml`) |
  | `ckks-secret` | its CKKS secret context (fedapp.features.secure) |

  A request weaker than the policy is answered with an error reply that says why
  (`PolicyRefusal`; its text starts with `REFUSED`, and the server counts these per client in
  results.json `nodes`). Where the policy is stricter than the request and can be applied
  without the server's cooperation (a lower epsilon), the node applies it.
- **Nothing executable or path-like from the server** (`client_overrides`): of the run's Hydra
  overrides a client applies only the keys in `CLIENT_KEYS` (the rest are the server's business
  and are dropped, as are `hydra.*` options and paths: `PATH_KEYS`); an override with an
  interpolation (`${...}`), an importable name (`_target_`), a package (`@`) or a deletion
  (`~key`) is refused. Strategies are imported only when registered (`conf/strategy/*.yaml` of the node's
  own configuration, `registered_strategy`).
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedapp.core.config import ConfigError, conf_dir, parse_overrides

POLICY_ENV = "FEDAPP_CLIENT_POLICY"  # simulation: the clients' policy file (client side only)
CLIENT_SEARCHPATH_ENV = "FEDAPP_CLIENT_SEARCHPATH"  # simulation: the clients' own task YAMLs
REFUSED = "REFUSED by the institution's policy"
RUN_KEY = "fedapp.run-key"  # run_config key (client side): the server run chain a plan is for

# Config groups (a choice names one of the node's own conf/<group>/*.yaml)
GROUPS = (
    "task",
    "strategy",
    "partition",
    "privacy",
    "secure",
    "compression",
    "augment",
    "attack",
    "hetero",
)
# Run-config overrides a ClientApp applies: a group choice, or a key under one of these.
CLIENT_KEYS = (
    *GROUPS,
    "train",
    "sites",
    "seed",
    "rounds",
    "clients_per_round",
    "device",
    "simulation.client_num_cpus",
)
# Never from the server: paths, identities, and the validation share (the node's own).
PATH_KEYS = (
    "data_dir",
    "output_dir",
    "resume",
    "secure.key_dir",
    "task.local_path",
    "task.client_val_fraction",
)
_PATHLIKE = re.compile(r"(^|[._])(dir|path|file|files|root)$")
_KEY = re.compile(r"^(\+{0,2})([A-Za-z_][A-Za-z0-9_.\-]*)(@[A-Za-z0-9_.]+)?=(.*)$", re.S)
_HEX = re.compile(r"^[0-9a-f]{1,64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class PolicyRefusal(RuntimeError):
    """A message this node refuses: weaker than its policy, or not the server's to choose."""

    def __init__(self, why: str) -> None:
        super().__init__(f"{REFUSED}: {why}")


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on", "ckks")


def _names(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(str(v).strip() for v in items if str(v).strip())


@dataclass(frozen=True)
class NodePolicy:
    """What a node requires (from its own configuration; see the module docstring)."""

    own: bool = False  # the node has its own configuration (deployment, or a simulation policy)
    deployed: bool = False  # it holds its own data file (`data-path`)
    require_dp: bool = False
    max_epsilon: float | None = None
    require_secure: bool = False
    accept_tasks: tuple[str, ...] = ()
    accept_strategies: tuple[str, ...] = ()
    val_fraction: float | None = None
    institution: str = ""
    max_delta: float | None = None
    ckks_metrics: bool = True  # under secure=ckks, send metrics computed on a received model

    @classmethod
    def from_node_config(
        cls, node_config: Mapping[str, Any], own: bool | None = None
    ) -> NodePolicy:
        deployed = bool(node_config.get("data-path"))
        keys = set(node_config) - {"partition-id", "num-partitions"}
        max_eps = node_config.get("max-epsilon")
        val = node_config.get("val-fraction")
        policy = cls(
            own=bool(keys) if own is None else own,
            deployed=deployed,
            require_dp=_truthy(node_config.get("require-dp", False)) or max_eps is not None,
            max_epsilon=None if max_eps is None else float(max_eps),
            require_secure=_truthy(node_config.get("require-secure", False)),
            accept_tasks=_names(node_config.get("accept-tasks")),
            accept_strategies=_names(node_config.get("accept-strategies")),
            val_fraction=None if val is None else float(val),
            institution=str(node_config.get("institution", "") or ""),
            max_delta=None
            if node_config.get("max-delta") is None
            else float(node_config["max-delta"]),
            ckks_metrics=_truthy(node_config.get("ckks-metrics", True)),
        )
        policy.validate()
        return policy

    def validate(self) -> None:
        if self.max_epsilon is not None and not (
            self.max_epsilon > 0 and math.isfinite(self.max_epsilon)
        ):
            raise ConfigError(f"node config max-epsilon={self.max_epsilon} must be > 0")
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            raise ConfigError(f"node config val-fraction={self.val_fraction} must be in [0, 1)")
        if self.max_delta is not None and not 0 < self.max_delta < 1:
            raise ConfigError(f"node config max-delta={self.max_delta} must be in (0, 1)")
        if self.institution and not _NAME.match(self.institution):
            raise ConfigError(
                f"node config institution={self.institution!r}: use letters, digits, '_', '-', '.'"
            )

    def enforce(self, cfg: DictConfig) -> None:
        """Refuse a run configuration weaker than this policy (PolicyRefusal)."""
        privacy = str(OmegaConf.select(cfg, "privacy.name", default="none") or "none")
        secure = str(OmegaConf.select(cfg, "secure.name", default="none") or "none")
        if self.require_dp and privacy != "sample_dp":
            limit = f" with epsilon <= {self.max_epsilon:g}" if self.max_epsilon else ""
            raise PolicyRefusal(
                f"this institution requires privacy=sample_dp{limit}; the server asked "
                f"privacy={privacy}"
            )
        if self.require_secure and secure != "ckks":
            raise PolicyRefusal(
                f"this institution requires secure=ckks; the server asked secure={secure}"
            )
        task, strategy = str(cfg.task.name), str(cfg.strategy.name)
        own = _registered().get(strategy)
        target = str(OmegaConf.select(cfg, "strategy._target_", default=""))
        # what a client does is read from the class (its units, what it may send: e.g.
        # synthetic rows); what a policy accepts from the name: they must be the node's pair
        if own is None:
            raise PolicyRefusal(f"strategy={strategy} is not one of this node's conf/strategy/")
        if target != own:
            raise PolicyRefusal(
                f"strategy={strategy} names the class {target!r}; this node's "
                f"conf/strategy/{strategy}.yaml is {own!r}"
            )
        if self.accept_tasks and task not in self.accept_tasks:
            raise PolicyRefusal(
                f"task={task} is not one this institution accepts ({', '.join(self.accept_tasks)})"
            )
        if self.accept_strategies and strategy not in self.accept_strategies:
            raise PolicyRefusal(
                f"strategy={strategy} is not one this institution accepts "
                f"({', '.join(self.accept_strategies)})"
            )
        attack = str(OmegaConf.select(cfg, "attack.name", default="none") or "none")
        if self.own and attack != "none":
            raise PolicyRefusal(
                f"attack={attack}: the attack harness is a simulation tool; a node with its own "
                "configuration never runs it"
            )

    def model_metrics_allowed(self, cfg: DictConfig) -> bool:
        """Whether this node sends metrics computed on a model it received: not under
        secure=ckks when its `ckks-metrics` is false. A server holding the aggregation
        could send one client's update as the "aggregate" and read that client's data
        through the loss or accuracy of it (the CKKS oracle); the node then answers no
        `evaluate` and sends only its counts and timings with a training reply."""
        secure = str(OmegaConf.select(cfg, "secure.name", default="none") or "none")
        return self.ckks_metrics or secure != "ckks"

    def epsilon_cap(self, node_config: Mapping[str, Any]) -> float | None:
        """The strictest epsilon this node states (max-epsilon, target-epsilon), if any."""
        caps = [self.max_epsilon] if self.max_epsilon is not None else []
        if node_config.get("target-epsilon") is not None:
            caps.append(float(node_config["target-epsilon"]))
        return min(caps) if caps else None


# -- the simulation's per-client policies --------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _policy_file(path: str, mtime: float) -> dict[str, Any]:
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    if not isinstance(data, dict) or set(data) - {"default", "clients"}:
        raise ConfigError(
            f"{path}: a client policy file has `default:` (keys for every client) and "
            "`clients:` (per partition id or natural id), each of node-config keys"
        )
    for part in (data.get("default") or {}, *(data.get("clients") or {}).values()):
        if not isinstance(part, dict):
            raise ConfigError(f"{path}: every policy is a mapping of node-config keys")
        if any("${" in str(v) for v in part.values()):
            raise ConfigError(f"{path}: interpolations are not allowed in a policy")
    return data


_STRICTEST_MIN = ("max-epsilon", "target-epsilon", "max-delta", "max-model-norm")
_STRICTEST_ANY = ("require-dp", "require-secure")


def merge_policies(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Several policies that apply to one client, the strictest of each: the smallest bound,
    any requirement, the intersection of accepted names; other keys (folders, ids) from the
    most specific entry (the last)."""
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            k = str(k)
            if k not in out:
                out[k] = v
            elif k in _STRICTEST_MIN:
                out[k] = min(float(out[k]), float(v))
            elif k in _STRICTEST_ANY:
                out[k] = _truthy(out[k]) or _truthy(v)
            elif k in ("accept-tasks", "accept-strategies"):
                out[k] = ",".join(n for n in _names(out[k]) if n in _names(v))
            elif k == "ckks-metrics":
                out[k] = _truthy(out[k]) and _truthy(v)
            else:
                out[k] = v
    return out


def client_policy(partition_id: int, names: Callable[[], Sequence[str]]) -> dict[str, Any]:
    """Simulation: the node-config keys of client `partition_id` from `$FEDAPP_CLIENT_POLICY`
    (`default` and the entries for its partition id and its natural ids, `names()`, the
    strictest of each: `merge_policies`); {} without a file. `names()` is called only when
    the file names clients by natural id."""
    path = os.environ.get(POLICY_ENV)
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"${POLICY_ENV}={path} is not a file")
    data = _policy_file(str(p.resolve()), p.stat().st_mtime)
    parts = [data.get("default") or {}]
    clients = {str(k): v for k, v in (data.get("clients") or {}).items()}
    keys = [str(partition_id)]
    natural = sorted(k for k in clients if not k.isdigit())
    if natural:
        own = [str(n) for n in names()]
        if not own:
            # a partition that mixes the institutions' rows (iid, dirichlet...): no
            # institution's entry, and no one ledger per institution, would cover them
            raise PolicyRefusal(
                f"the client policy names institutions by natural id ({', '.join(natural)}), "
                f"and partition {partition_id} of this run is not one institution's rows: "
                "run with the natural partition (partition=natural)"
            )
        keys += own
    parts += [clients[k] for k in keys if k in clients]
    return merge_policies(parts)


def policy_ids(path: str | None = None) -> list[str]:
    """The client ids a policy file names (for a start-up check by the launchers)."""
    path = path or os.environ.get(POLICY_ENV)
    if not path:
        return []
    p = Path(path)
    return [
        str(k) for k in (_policy_file(str(p.resolve()), p.stat().st_mtime).get("clients") or {})
    ]


# -- what a client takes from the server's overrides --------------------------------------------------
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_OPTION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")
# a key naming a component's identity is set by its group choice only (`strategy=trust`),
# so that `accept-strategies` and `accept-tasks` check what actually runs
_IDENTITY = ("name", "kind", "_target_")
_DICT_KEYS = ("privacy.levels",)  # the only mapping a client takes: id -> epsilon


def _allowed(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in CLIENT_KEYS)


def _scalars(value: Any, where: str) -> None:
    """Refuse anything but scalars and lists of scalars (no mappings: a mapping carries keys
    past every check here), and any interpolation, however it was escaped in the text."""
    items = value if isinstance(value, list) else [value]
    for v in items:
        if isinstance(v, (dict, list)):
            raise PolicyRefusal(f"override {where}: a client takes scalar values only")
        if not (v is None or isinstance(v, (str, int, float, bool))):
            raise PolicyRefusal(f"override {where}: a client takes no sweep or function value")
        if isinstance(v, str) and "$" in v and "{" in v:
            raise PolicyRefusal(
                f"override {where}: a client resolves no interpolation from the server"
            )


def client_overrides(overrides: str | Sequence[str] | None) -> list[str]:
    """The overrides a ClientApp applies (see the module docstring); PolicyRefusal for one it
    must never take from a server. Each override is parsed by Hydra's own grammar (escapes
    and quoting as Hydra will read them), then: a deletion, a package, a sweep, a mapping
    (except `privacy.levels`, id -> number), an interpolation or an importable name is
    refused; a group choice must be a plain option name; a key naming a component's identity
    (`*.name`, `*.kind`) is refused (the group choice sets it); `hydra.*`, paths and keys
    outside `CLIENT_KEYS` are never applied."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for item in parse_overrides(overrides):
        try:
            o = parser.parse_override(item)
        except Exception as err:  # Hydra's grammar errors
            raise PolicyRefusal(f"override {item[:80]!r} is not one a client accepts") from err
        key = str(o.key_or_group)
        if o.is_delete():
            raise PolicyRefusal(f"override {item!r}: a client takes no deletion from the server")
        if o.package is not None:
            raise PolicyRefusal(
                f"override {key}: a client imports only its own registered components"
            )
        if o.is_sweep_override():
            raise PolicyRefusal(f"override {key}: a client takes no sweep or function value")
        if not _IDENT.match(key):
            raise PolicyRefusal(f"override {key[:80]!r}: not a plain config key")
        if key == "hydra" or key.startswith("hydra."):
            continue  # never applied: the node's own search path (`client_searchpath`) counts
        segments = key.split(".")
        if "_target_" in segments:
            raise PolicyRefusal(
                f"override {key}: a client imports only its own registered components"
            )
        value = o.value()
        if key in _DICT_KEYS and isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise PolicyRefusal(f"override {key}: id -> number only")
                _scalars(str(k), key)
        else:
            _scalars(value, key)
        if key in GROUPS:
            if not isinstance(value, str) or not _OPTION.match(value):
                raise PolicyRefusal(
                    f"override {key}={str(value)[:60]}: a group choice is one of the node's own "
                    f"conf/{key}/*.yaml names"
                )
        elif segments[-1] in _IDENTITY and _allowed(key):
            raise PolicyRefusal(
                f"override {key}: a component's identity is set by its group choice only"
            )
        if key in PATH_KEYS or any(_PATHLIKE.search(seg) for seg in segments):
            continue  # the node's own (never the server's), or the server's own folders
        if segments[:2] == ["task", "privacy"]:
            continue  # a task's DP recipe is the node's own YAML (fedapp.core.config.apply_dp_recipe)
        if _allowed(key):
            out.append(item)
    return out


def client_searchpath(node_config: Mapping[str, Any]) -> list[str]:
    """The node's own folders of task YAMLs: `conf-dir` in its node config, else (simulation)
    `$FEDAPP_CLIENT_SEARCHPATH` (colon-separated; the launchers set it from the user's own
    `hydra.searchpath`, on the machine where the simulated clients run)."""
    own = node_config.get("conf-dir")
    folders = (
        [str(own)]
        if own
        else _names((os.environ.get(CLIENT_SEARCHPATH_ENV) or "").replace(":", ","))
    )
    return [f"file://{Path(f).expanduser().resolve()}" for f in folders]


def searchpath_override(folders: Sequence[str]) -> list[str]:
    return [f"hydra.searchpath=[{','.join(folders)}]"] if folders else []


def registered_strategy(target: str) -> str:
    """`target` if it is the `_target_` of one of the node's own strategy configs."""
    if target not in _registered().values():
        raise PolicyRefusal(
            f"strategy class {target!r} is not registered on this node (conf/strategy/*.yaml)"
        )
    return target


@functools.lru_cache(maxsize=1)
def _registered() -> dict[str, str]:
    """The node's own strategies: name -> `_target_` (conf/strategy/*.yaml)."""
    out = {}
    for path in sorted((conf_dir() / "strategy").glob("*.yaml")):
        raw = OmegaConf.load(path)
        if raw.get("_target_"):
            out[str(raw.get("name", path.stem))] = str(raw["_target_"])
    return out


def check_lineage(value: Any) -> str:
    """A state lineage is what it is: a short hex string (it goes into file names)."""
    text = str(value)
    if text and not _HEX.match(text):
        raise PolicyRefusal(f"lineage {text[:40]!r} is not a hex string")
    return text


def searchpath_from_overrides(overrides: Sequence[str]) -> list[str]:
    """The local folders of `hydra.searchpath=[file://A,file://B]` overrides (launchers)."""
    out = []
    for item in overrides:
        if item.startswith("hydra.searchpath="):
            for part in item.split("=", 1)[1].strip("[]").split(","):
                part = part.strip().strip("'\"")
                if part.startswith("file://"):
                    out.append(part[len("file://") :])
    return out
