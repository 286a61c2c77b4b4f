"""Checkpoint after every round; resume a run that stopped: `resume=<run dir>` (with
`rounds=` the new total, if it should run longer).

Flower 1.41 has no resume (`Strategy.start` has no start round, `flwr run` no resume flag),
so the ServerApp writes, after every round, atomically, `<run dir>/checkpoint.pt`:

- the global model and the round number;
- the strategy's full state (every attribute: trust scores, contribution ledger, SCAFFOLD's
  server control, momentum, the central-DP accountant's releases, the per-round records...);
- the run's seeded random states (Python, NumPy, PyTorch: client sampling, screening, the
  initial model...), the clock (simulated time, bytes), the recorder (rounds so far, best
  model), the clients' status, the federated preprocessing parameters (a resumed run does
  not ask the clients again: same numbers, no privacy spent);
- the lineage of client state (`fedapp.features.clients.ClientStateStore`): clients keep their own
  state (SCAFFOLD's control, MOON's previous model, compression residuals, DP ledgers) in
  files, one version per round, and a resumed run reads the versions as of the checkpoint.

Objects of the running server that the strategy refers to but that are rebuilt on resume
(the task, the grid, the encryption context, the server's validation loss) are not written:
they are replaced by name (pickle's persistent ids) and bound to the new run's objects.

No DP noise generator state is written. DP noise comes from generators seeded with fresh
operating-system entropy that live only while they draw (`tasks.dp_sgd.noise_generator`;
`fedapp.features.privacy.secret_numpy_noise` around Flower's central-DP wrappers, which draw from
NumPy's global generator, and which puts the seeded global state back afterwards): no
object the checkpoint holds is one, and the seeded states it holds are not moved by noise
draws. Whoever holds a checkpoint (or knows the seed) cannot recompute the noise of any
round: two resumes from one checkpoint of a central-DP run release models that differ by
fresh noise of the calibrated size, and that checkpoint holds no generator object
(`tests/fedapp/test_checkpoint.py`).

The checkpoint is a pickle: load only checkpoints your own runs wrote.

Event-driven strategies (tiered, FedAsync, TiFL) have messages in flight across rounds: the
clock's flights are part of the checkpoint. On the virtual clock their replies are collected
before it is written, so the resumed run gets them when the uninterrupted one did; on the
wall clock a reply that had not reached the dead server is lost, and that message fails.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from fedapp.core.config import ConfigError, to_dict
from fedapp.core.files import write_atomic

CHECKPOINT = "checkpoint.pt"
MARKER = "checkpoint.json"  # {"round": k}: written after the checkpoint itself
VERSION = 1
# what a resume may change: the rounds, and where things are (the launchers write the node
# key registry of each run beside its credentials)
# events_db, tracking: where a run is recorded, not the experiment
NOT_COMPARED = ("rounds", "resume", "output_dir", "node_keys", "events_db", "tracking")


# Modules that moved when the layers became folders (Architecture II, issue 32): a checkpoint
# written before names its objects' classes by the old paths, and still resumes.
MOVED_PACKAGES = {
    **{
        f"fedapp.{m}": f"fedapp.core.{m}"
        for m in ("config", "files", "flower_compat", "node", "plugins", "policy", "seeds", "units")
    },
    **{
        f"fedapp.{m}": f"fedapp.features.{m}"
        for m in (
            "appsign",
            "attacks",
            "audit",
            "clients",
            "compression",
            "datasets",
            "events",
            "hetero",
            "identity",
            "privacy",
            "secure",
            "sites",
            "synthetic",
            "tls",
            "tracking",
        )
    },
    **{
        f"fedapp.{m}": f"fedapp.cli.{m}"
        for m in (
            "board",
            "centralized",
            "certs",
            "federation",
            "inline",
            "launch",
            "schema",
            "tune",
        )
    },
}


def moved_module(module: str) -> str:
    """Where a module a checkpoint names lives now (itself, unless it moved)."""
    parts = module.split(".")
    for k in range(len(parts), 1, -1):
        new = MOVED_PACKAGES.get(".".join(parts[:k]))
        if new is not None:
            return ".".join([new, *parts[k:]])
    return module


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read."""


class _Pickler(pickle.Pickler):
    def __init__(self, file, live: dict[str, Any]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._names = {id(obj): name for name, obj in live.items() if obj is not None}

    def persistent_id(self, obj: Any) -> str | None:
        return self._names.get(id(obj))

    def reducer_override(self, obj: Any) -> Any:
        # Arrays received over Flower's transport hold memoryviews (not picklable): as bytes.
        if isinstance(obj, memoryview):
            return bytes, (obj.tobytes(),)
        return NotImplemented


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, live: dict[str, Any]) -> None:
        super().__init__(file)
        self._live = live

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(moved_module(module), name)

    def persistent_load(self, pid: str) -> Any:
        if pid not in self._live:
            raise CheckpointError(f"the checkpoint refers to '{pid}', which this run lacks")
        return self._live[pid]


def dumps(value: Any, live: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    try:
        _Pickler(buf, live).dump(value)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot write the checkpoint: {exc}") from exc
    return buf.getvalue()


def loads(data: bytes, live: dict[str, Any]) -> Any:
    return _Unpickler(io.BytesIO(data), live).load()


def rng_state() -> dict[str, Any]:
    """The seeded global random states (never a DP noise generator's: see the module doc)."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def strategy_state(strategy, live: dict[str, Any]) -> bytes:
    """Every attribute of the strategy, its release mechanism (central DP's accountant) with
    it. The strategy object itself is live: a policy holding a bound method of its strategy
    is bound to the resumed run's strategy."""
    return dumps({"outer": vars(strategy), "inner": None}, live)


def restore_strategy(strategy, blob: bytes, live: dict[str, Any]) -> None:
    state = loads(blob, live)
    if state["inner"] is None:
        vars(strategy).update(state["outer"])
        return
    # written before central DP became the strategy's release mechanism: the strategy's
    # state was the wrapper's inner one, the releases the wrapper's own
    vars(strategy).update(state["inner"])
    if strategy.release is not None:
        strategy.release.releases = int(state["outer"].get("releases", 0))


def write(run_dir: Path, state: dict[str, Any]) -> None:
    """Write the checkpoint atomically (a crash mid-write leaves the previous one)."""
    data = dumps({"version": VERSION, **state}, live={})
    path = Path(run_dir) / CHECKPOINT
    write_atomic(path, data)
    marker = {"round": int(state["round"]), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_atomic(path.with_name(MARKER), json.dumps(marker))


def read(run_dir: Path | str) -> dict[str, Any]:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise ConfigError(
            f"resume={run_dir}: no {CHECKPOINT} there (runs write one after every round; "
            "was this run started before checkpoints existed, or with checkpoint=false?)"
        )
    state = loads(path.read_bytes(), live={})
    if state.get("version") != VERSION:
        raise ConfigError(f"{path}: checkpoint version {state.get('version')}, need {VERSION}")
    return state


def _changed(saved: Any, now: Any, default: Any) -> bool:
    """Whether `now` differs from `saved`, a setting absent from `saved` (added since the
    checkpoint was written, at any depth) counting as unchanged when it is at its default."""
    if isinstance(saved, dict) and isinstance(now, dict):
        default = default if isinstance(default, dict) else {}
        for k in set(saved) | set(now):
            if k not in saved:
                if k not in default or now[k] != default[k]:
                    return True
            elif k not in now or _changed(saved[k], now[k], default.get(k)):
                return True
        return False
    return saved != now


def check_compatible(saved: dict[str, Any], cfg: DictConfig, done: int) -> None:
    """A resume continues the same experiment: only `rounds` may change, and upwards."""
    now = to_dict(cfg)
    differ = sorted(
        k for k in set(saved) | set(now) if k not in NOT_COMPARED and saved.get(k) != now.get(k)
    )
    if differ:  # settings added since the checkpoint was written, at their defaults
        from fedapp.core.config import default_config
        from fedapp.core.policy import GROUPS

        # each group at the checkpointed run's choice (task=credit...), its values at default
        choices = [
            f"{g}={saved[g]['name']}"
            for g in GROUPS
            if isinstance(saved.get(g), dict) and saved[g].get("name") and g in now
        ]
        try:
            defaults = to_dict(default_config(choices))
        except Exception:  # noqa: BLE001 - a choice this version no longer has
            defaults = to_dict(default_config())
        pick = lambda d, k: {k: d[k]} if k in d else {}  # noqa: E731
        differ = [k for k in differ if _changed(pick(saved, k), pick(now, k), defaults)]
    if differ:
        raise ConfigError(
            f"resume: the config differs from the checkpointed run's in {differ}; a resume "
            "continues the same experiment (only rounds= may change)"
        )
    if int(cfg.rounds) <= done:
        raise ConfigError(
            f"resume: the run already has {done} rounds; set rounds= to more than that"
        )
