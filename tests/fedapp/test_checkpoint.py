"""fedapp.checkpoint's pure parts: what is written, what is refused."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedapp.checkpoint import CheckpointError, check_compatible, dumps, loads
from fedapp.checks import compose
from fedapp.core.config import ConfigError, to_dict


class Live:
    """Stands for an object of the running server (a grid, an encryption context)."""

    def __reduce__(self):
        raise TypeError("not picklable")


def test_live_objects_are_written_by_name_and_bound_to_the_new_runs():
    old, new = Live(), Live()
    state = {"grid": old, "ema": np.array([0.5, 0.25]), "rounds": {1: [old]}}
    back = loads(dumps(state, {"grid": old}), {"grid": new})
    assert back["grid"] is new and back["rounds"][1][0] is new
    np.testing.assert_array_equal(back["ema"], state["ema"])
    with pytest.raises(CheckpointError, match="cannot write"):
        dumps(state, {})  # an unnamed live object: a clear error, not a broken file
    with pytest.raises(CheckpointError, match="refers to 'grid'"):
        loads(dumps(state, {"grid": old}), {})


def test_arrays_that_arrived_over_the_wire_are_written():
    record = ArrayRecord([np.arange(6, dtype=np.float32).reshape(2, 3)])
    for array in record.values():
        array.data = memoryview(array.data)  # what Flower's transport hands over
    back = loads(dumps({"arrays": record}, {}), {})["arrays"]
    np.testing.assert_array_equal(back.to_numpy_ndarrays()[0], record.to_numpy_ndarrays()[0])


def test_only_rounds_may_change_on_resume():
    saved = to_dict(compose("task=credit rounds=3"))
    check_compatible(saved, compose("task=credit rounds=5 resume=/x"), done=3)
    with pytest.raises(ConfigError, match=r"\['strategy'\]"):
        check_compatible(saved, compose("task=credit rounds=5 strategy=fedprox"), done=3)
    with pytest.raises(ConfigError, match="more than that"):
        check_compatible(saved, compose("task=credit rounds=3"), done=3)


def test_a_checkpoint_from_before_a_new_setting_resumes_at_its_default():
    """A checkpoint written before a config block existed (e.g. `claims`) resumes when the
    block is at its default, and not when it was changed; a new node key registry is fine."""
    saved = to_dict(compose("task=credit rounds=3"))
    del saved["claims"]
    check_compatible(saved, compose("task=credit rounds=5 node_keys=/other/keys.yaml"), done=3)
    with pytest.raises(ConfigError, match=r"\['claims'\]"):
        check_compatible(saved, compose("task=credit rounds=5 claims.stats_slack=2"), done=3)


def test_a_resumed_run_writes_into_the_folder_it_resumes(tmp_path):
    from fedapp.core.config import resolve_output_dir

    run = tmp_path / "run"
    assert resolve_output_dir(compose(f"resume={run}"), {}) == run
    assert resolve_output_dir(compose(f"resume={run}"), {"output-dir": str(run)}) == run
    with pytest.raises(ConfigError, match="continues in that run's folder"):
        resolve_output_dir(compose(f"resume={run}"), {"output-dir": str(tmp_path / "other")})


def _generators(obj, seen=None) -> list[str]:
    """Every random generator object reachable from `obj` (containers and object attributes)."""
    import random

    import torch

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    kinds = (np.random.Generator, np.random.RandomState, np.random.BitGenerator)
    if isinstance(obj, (*kinds, torch.Generator, random.Random)):
        return [type(obj).__name__]
    if isinstance(obj, dict):
        items = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = list(vars(obj).values())
    else:
        return []
    return [g for item in items for g in _generators(item, seen)]


def test_a_central_dp_checkpoint_does_not_predict_the_noise(tmp_path, data_dir):
    """The checkpoint after round 1 of a central-DP run (in-process engine) is all a thief
    of the results folder, or the server, has: rerunning round 2 from it is the attack that
    recomputes the noise. Two such reruns release models that differ, by Gaussian noise of
    the calibrated size on every coordinate (sigma = z C / m, so the difference has
    standard deviation sigma * sqrt(2)), so the checkpoint does not determine the noise; and
    the checkpoint holds no random generator object, and the seeded NumPy state in it is the
    one the run started with (the noise draws do not move it)."""
    import pickle
    import shutil

    import torch

    from fedapp.cli.inline import run_inline
    from fedapp.server_app import seed_everything

    z, clip, m = 2.0, 1.0, 3
    base = (
        "task=credit partition=iid partition.num_partitions=3 clients_per_round=3 "
        "eval_clients_per_round=0 train.local_epochs=1 privacy=central_dp "
        f"privacy.noise_multiplier={z} privacy.clipping_norm={clip} privacy.target_epsilon=100"
    )
    first = run_inline(f"{base} rounds=1", tmp_path / "r1")
    saved = pickle.loads((first / "checkpoint.pt").read_bytes())
    assert _generators(saved) == []
    seed_everything(int(saved["config"]["seed"]))
    kept, seeded = saved["rng"]["numpy"], np.random.get_state()
    assert kept[0] == seeded[0] and kept[2:] == seeded[2:]
    np.testing.assert_array_equal(kept[1], seeded[1])
    finals = []
    for k in (1, 2):  # two thieves, each replaying round 2 from the same checkpoint
        copy = tmp_path / f"resume-{k}"
        shutil.copytree(first, copy)
        run_inline(f"{base} rounds=2 resume={copy}")
        finals.append(torch.load(copy / "final_model.pt"))
    a, b = finals
    diff = torch.cat([(a[n].double() - b[n].double()).flatten() for n in a])
    assert diff.abs().max() > 0, "the checkpoint determined round 2's noise"
    sigma = z * clip / m
    assert diff.std().item() == pytest.approx(sigma * np.sqrt(2), rel=0.15)


def test_a_checkpoint_from_before_a_nested_setting_resumes_at_its_default():
    """A setting added inside a group (e.g. `task.norm`, `sites.metric`) after the checkpoint
    was written: the resume goes on when it is at its default, and not when it was changed."""
    saved = to_dict(compose("task=credit rounds=3"))
    del saved["task"]["norm"]
    del saved["sites"]
    check_compatible(saved, compose("task=credit rounds=5"), done=3)
    with pytest.raises(ConfigError, match=r"\['task'\]"):
        check_compatible(saved, compose("task=credit rounds=5 task.norm=batch"), done=3)
    with pytest.raises(ConfigError, match=r"\['task'\]"):  # a changed old setting still counts
        check_compatible(saved, compose("task=credit rounds=5 task.dropout=0.3"), done=3)


def test_a_new_setting_is_judged_at_the_default_of_the_run_s_own_choice():
    """strategy=fedrep's head_epochs, added since the checkpoint: at fedrep's default the
    resume goes on (the root defaults' strategy, fedavg, has no such key), changed it stops."""
    saved = to_dict(compose("task=credit strategy=fedrep rounds=3"))
    del saved["strategy"]["head_epochs"]
    check_compatible(saved, compose("task=credit strategy=fedrep rounds=5"), done=3)
    with pytest.raises(ConfigError, match=r"\['strategy'\]"):
        check_compatible(
            saved, compose("task=credit strategy=fedrep rounds=5 strategy.head_epochs=3"), done=3
        )
