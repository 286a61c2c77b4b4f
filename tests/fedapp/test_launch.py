"""Launcher plumbing: run-config files and stopping every process a run started."""

from __future__ import annotations

import subprocess
import time
import tomllib

import psutil
import pytest
import torch

from fedapp.checks import compose
from fedapp.cli.launch import (
    federation_resources,
    stop_process_group,
    write_run_config,
)
from fedapp.core.config import ConfigError


def test_run_config_survives_quotes_and_spaces(tmp_path):
    values = {
        "overrides": "task.local_path='/data/my dir/x.npz' rounds=3",
        "output-dir": 'C:\\out "x"',
    }
    path = write_run_config(tmp_path / "rc.toml", values)
    assert tomllib.loads(path.read_text()) == values


def test_stop_process_group_stops_the_whole_tree_even_other_sessions():
    # the child puts a grandchild in a session of its own, as SuperExec does with flwr-simulation
    proc = subprocess.Popen(
        ["bash", "-c", "sleep 300 & setsid sleep 301 & wait"], start_new_session=True
    )
    deadline = time.monotonic() + 10
    while (
        len(psutil.Process(proc.pid).children(recursive=True)) < 2 and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert len(tree) == 2
    stop_process_group(proc, grace_s=5)
    assert proc.poll() is not None
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_the_console_shows_progress_and_errors_and_the_log_keeps_the_rest():
    from fedapp.cli.launch import console_line

    progress = "\x1b[92mINFO \x1b[0m:      [fedapp] round 3/30  test_acc=0.6\n"
    assert console_line(progress) == "[fedapp] round 3/30  test_acc=0.6\n"
    assert console_line("\x1b[91mERROR \x1b[0m:     ServerApp raised\n").startswith("ERROR")
    for noise in (
        "\x1b[93mWARNING \x1b[0m:   The default number of simulated SuperNodes changed\n",
        "(ClientAppActor pid=1) FutureWarning: ray ...\n",
        "Flattening the indices: 100%|##########| 10/10\n",
    ):
        assert console_line(noise) is None
        assert console_line(noise, verbose=True) == noise


# --- GPUs for ClientApps (issue 19) ----------------------------------------------------------
def test_no_gpu_resources_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fed = federation_resources(compose([]), 5)
    assert fed == "num-supernodes=5 client-resources-num-cpus=1"


def test_gpus_are_shared_by_every_cpu_slot_when_cuda_is_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fed = federation_resources(compose([]), 5, cuda_devices=1, cpu_count=16)
    assert fed.endswith("client-resources-num-gpus=0.0625")  # 16 slots on one GPU
    two = compose(["simulation.client_num_cpus=2"])
    assert federation_resources(two, 5, cuda_devices=2, cpu_count=16).endswith("gpus=0.25")
    # device=cpu keeps ClientApps off the GPU; an explicit share is used as given
    assert "gpus" not in federation_resources(compose(["device=cpu"]), 5, cuda_devices=1)
    fixed = compose(["simulation.client_num_gpus=0.5"])
    assert federation_resources(fixed, 5, cuda_devices=1, cpu_count=16).endswith("gpus=0.5")


def test_naming_a_gpu_this_machine_lacks_stops_before_any_process(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="set device=auto or device=cpu"):
        federation_resources(compose(["device=cuda"]), 5)


@pytest.mark.parametrize(
    "override,match",
    [
        ("device=gpu", "device=gpu is not one of"),
        ("simulation.client_num_gpus=-1", "client_num_gpus"),
    ],
)
def test_bad_device_settings_are_refused_when_composed(override, match):
    with pytest.raises(ConfigError, match=match):
        compose([override])


def test_processes_a_killed_superlink_left_behind_are_stopped(tmp_path):
    """A ServerApp or SuperNode orphaned by a killed SuperLink is no longer in any process
    tree we hold; the launcher finds it by its private FLWR_HOME (a folder in it for a
    SuperNode) and stops it, and nothing else."""
    import os

    from fedapp.cli.launch import stop_marked

    home = tmp_path / "flwr-home"
    env = lambda h: {**os.environ, "FLWR_HOME": str(h)}  # noqa: E731
    ours = [
        subprocess.Popen(["sleep", "300"], env=env(home), start_new_session=True),
        subprocess.Popen(["sleep", "301"], env=env(home / "supernode-0"), start_new_session=True),
    ]
    other = subprocess.Popen(["sleep", "302"], env=env(tmp_path / "flwr-home-2"))
    time.sleep(0.2)
    try:
        assert sorted(stop_marked(home, grace_s=5)) == sorted(p.pid for p in ours)
        assert all(p.wait(timeout=5) is not None for p in ours)
        assert other.poll() is None
    finally:
        other.kill()


def test_log_files_lose_flowers_colour_codes(tmp_path):
    from fedapp.cli.launch import strip_colour_codes

    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "supernode.log").write_text("\x1b[92mINFO \x1b[0m:      joined\n")
    (tmp_path / "superlink.stdout").write_text("\x1b[93mWARNING \x1b[0m:   x\n")
    strip_colour_codes(tmp_path)
    assert (tmp_path / "n" / "supernode.log").read_text() == "INFO :      joined\n"
    assert (tmp_path / "superlink.stdout").read_text() == "WARNING :   x\n"


def test_a_supernode_refused_too_early_is_started_again_until_it_stays(tmp_path):
    """The first start is refused (exit 305, as Flower refuses a node back within its
    heartbeat window), the second crashes, the third stays: two restarts, each said."""
    import sys

    from fedapp.cli.federation import NodeSupervisor

    runs = iter(["Exit Code: 305\nSuperNode is already active", "Traceback...", None])
    said = []
    log = tmp_path / "supernode.log"

    def start():  # what Flower does: the reason in the log, exit code 1
        text = next(runs)
        script = (
            "import time; time.sleep(60)"
            if text is None
            else f"import sys; open({str(log)!r}, 'a').write({text!r}); sys.exit(1)"
        )
        return subprocess.Popen([sys.executable, "-c", script])

    procs = [start()]
    sup = NodeSupervisor([start], procs, [log], delay_s=0.2, poll_s=0.05, say=said.append)
    sup.start()
    deadline = time.monotonic() + 20
    while sup.restarts[0] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    sup.stop()
    try:
        assert sup.restarts == [2] and procs[0].poll() is None
        assert "refused by the SuperLink" in said[0] and "exit code 1" in said[1]
    finally:
        procs[0].kill()
