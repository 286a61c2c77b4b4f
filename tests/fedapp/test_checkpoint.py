"""fedapp.checkpoint's pure parts: what is written, what is refused."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord

from fedapp.checkpoint import CheckpointError, check_compatible, dumps, loads
from fedapp.config import ConfigError, compose, to_dict


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


def test_a_resumed_run_writes_into_the_folder_it_resumes(tmp_path):
    from fedapp.config import resolve_output_dir

    run = tmp_path / "run"
    assert resolve_output_dir(compose(f"resume={run}"), {}) == run
    assert resolve_output_dir(compose(f"resume={run}"), {"output-dir": str(run)}) == run
    with pytest.raises(ConfigError, match="continues in that run's folder"):
        resolve_output_dir(compose(f"resume={run}"), {"output-dir": str(tmp_path / "other")})
