"""Run one Flower simulation end to end: `fedapp-run [hydra overrides...]`.

Starts a private SuperLink (own FLWR_HOME, free port, no runtime dependency installation, no
telemetry), submits the app with `flwr run --stream`, sizes the federation to the configured
partitioning, checks the run's final status and stops every process it started. This is what
the quick start, `fedapp-sweep` and the tests use; plain `flwr run .` works too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from fedapp.checks import compose
from fedapp.core.config import (
    PROJECT_ROOT,
    ConfigError,
    parse_overrides,
    resolve_data_dir,
    resolve_output_dir,
    run_config_values,
    with_keys,
)
from fedapp.features.tls import Credentials

CONNECTION = "fedapp"


@dataclass
class RunOutcome:
    status: str  # Flower's final status of the run: "completed", "failed", "stopped", ...
    output_dir: Path
    returncode: int
    run_id: str | None

    @property
    def run_status(self) -> str:
        """fedapp's own status (results.json meta.status): completed, degraded or failed;
        "unknown" when the run wrote no results."""
        path = self.output_dir / "results.json"
        if not path.exists():
            return "unknown"
        return str((json.loads(path.read_text()).get("meta") or {}).get("status", "unknown"))

    @property
    def ok(self) -> bool:
        """Flower completed the run and it learned something (completed or degraded)."""
        return (
            self.status == "completed"
            and self.returncode == 0
            and self.run_status in ("completed", "degraded")
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flower_env(
    flwr_home: Path, data_dir: Path | None = None, offline: bool = True
) -> dict[str, str]:
    """Environment for Flower processes: private FLWR_HOME, offline, no telemetry."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_DEDUP_LOGS": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if offline:
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
    if data_dir is not None:
        env["FEDAPP_DATA_DIR"] = str(data_dir)
    # Make the Flower binaries of this interpreter's environment win on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def bin_path(name: str) -> str:
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


def wait_healthy(
    port: int,
    proc: subprocess.Popen,
    timeout: float = 60.0,
    log_file: Path | None = None,
    ca_cert: Path | None = None,
) -> None:
    """Wait for the SuperLink's /health endpoint (HTTPS checked against `ca_cert` when given)."""
    deadline = time.monotonic() + timeout
    if ca_cert is not None:
        url, context = (
            f"https://localhost:{port}/health",
            ssl.create_default_context(cafile=str(ca_cert)),
        )
    else:
        url, context = f"http://127.0.0.1:{port}/health", None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SuperLink exited with code {proc.returncode}; see {log_file}")
        try:
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"SuperLink did not become healthy within {timeout:.0f}s; see {log_file}")


def stop_process_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop `proc` and every process it started, SIGTERM first, then SIGKILL.

    The whole tree, not just the process group: the SuperLink's SuperExec starts
    `flwr-simulation` (and Ray's daemons) in sessions of their own, which would survive a
    killed SuperLink when a run is interrupted.
    """
    try:
        root = psutil.Process(proc.pid)
        tree = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        tree = []
    terminate_all(tree, grace_s)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1)


def terminate_all(procs: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM to each, SIGKILL to those still alive after `grace_s`."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # terminal colour codes (Flower's log levels)


def stop_marked(flwr_home: Path, grace_s: float = 10.0) -> list[int]:
    """Stop every process still running with this launcher's private FLWR_HOME (or a folder
    in it) in its environment: the ServerApp, SuperExec, simulation and SuperNode processes
    it started, including those a killed SuperLink left behind (reparented, so no longer in
    its process tree). Returns their pids."""
    found = marked_processes(flwr_home)
    terminate_all(found, grace_s)
    return [p.pid for p in found]


def marked_processes(flwr_home: Path | str) -> list[psutil.Process]:
    """The processes (not this one) whose FLWR_HOME is `flwr_home` or a folder in it."""
    home = str(Path(flwr_home))
    found = []
    for p in psutil.process_iter(["pid"]):
        if p.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            value = p.environ().get("FLWR_HOME", "")
            if value == home or value.startswith(home + os.sep):
                found.append(p)
    return found


def strip_colour_codes(folder: Path) -> None:
    """Flower colours its log levels whatever the output is; the log files of a run are
    rewritten without the codes (`*.log`, `*.stdout` in the folder and its subfolders)."""
    for path in [*Path(folder).rglob("*.log"), *Path(folder).rglob("*.stdout")]:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = path.read_text()
            if "\x1b[" in text:
                path.write_text(ANSI.sub("", text))


def end_run(flwr_home: Path, out: Path) -> None:
    """After a launcher's run, however it ended: no process of it left running, a
    results.json a dead server left `running` marked `interrupted`, logs without colours."""
    from fedapp.recorder import mark_interrupted

    left = stop_marked(flwr_home)
    if left:
        print(f"[fedapp] stopped {len(left)} Flower processes the run left behind", flush=True)
    if mark_interrupted(
        out, "the server ended before the run finished (killed, or its SuperLink went away)"
    ):
        print(f"[fedapp] INTERRUPTED: {out}/results.json says how to resume", flush=True)
    strip_colour_codes(out)


def write_connection(flwr_home: Path, name: str, port: int, ca_cert: Path | None = None) -> None:
    """The `flwr` CLI's connection to our SuperLink (TLS checked against `ca_cert` if given)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = (
        f"root-certificates = {json.dumps(str(Path(ca_cert).resolve()))}"
        if ca_cert is not None
        else "insecure = true"
    )
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\n'
        f'address = "127.0.0.1:{port}"\n{security}\n'
    )


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks stop the processes we started."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@contextmanager
def superlink(
    flwr_home: Path,
    log_file: Path,
    env: dict[str, str],
    simulation: bool = True,
    credentials: Credentials | None = None,
    port: int | None = None,
) -> Iterator[int]:
    """Start a SuperLink on loopback (a free port unless given); yield its HTTP port; stop it
    afterwards. With `credentials` it serves TLS with their SuperLink certificate and
    accepts registered SuperNodes only (`--enable-supernode-auth`); otherwise it is
    insecure, for local runs on this machine."""
    port = port or free_port()
    cmd = [
        bin_path("flower-superlink"),
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--database",
        str(flwr_home / "state.db"),
        "--disable-runtime-dependency-installation",
        "--log-file",
        str(log_file),
    ]
    if credentials is not None:
        cmd += [
            "--ssl-ca-certfile",
            str(credentials.ca_cert),
            "--ssl-certfile",
            str(credentials.superlink_cert),
            "--ssl-keyfile",
            str(credentials.superlink_key),
            "--enable-supernode-auth",
        ]
    else:
        cmd.append("--insecure")
    if simulation:
        cmd.append("--simulation")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file.with_suffix(".stdout"), "wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    ca = credentials.ca_cert if credentials is not None else None
    try:
        wait_healthy(port, proc, log_file=log_file, ca_cert=ca)
        write_connection(flwr_home, CONNECTION, port, ca)
        yield port
    finally:
        stop_process_group(proc)


def write_run_config(path: Path, values: dict[str, str]) -> Path:
    # JSON string escapes are valid TOML basic-string escapes.
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    return path


def console_line(line: str, verbose: bool = False) -> str | None:
    """What of one `flwr run --stream` line goes to the console: fedapp's progress lines
    (without Flower's colour codes and level prefix) and errors; every line with `verbose`;
    None for Flower's and Ray's other lines, which go to the log file only."""
    if verbose:
        return line
    text = ANSI.sub("", line)
    if "[fedapp]" in text:
        return text[text.index("[fedapp]") :]
    return text if "ERROR" in text or "Traceback" in text else None


def submit(
    app_dir: Path,
    run_config: Path,
    env: dict[str, str],
    federation_config: str | None,
    timeout: float | None,
    log_path: Path,
    verbose: bool = False,
) -> tuple[int, str | None]:
    """`flwr run --stream`: fedapp's progress lines to the console (everything with
    `verbose`), every line to `log_path` as it comes."""
    cmd = [
        bin_path("flwr"),
        "run",
        str(app_dir),
        CONNECTION,
        "--run-config",
        str(run_config),
        "--stream",
    ]
    if federation_config:
        cmd += ["--federation-config", federation_config]
    run_id = None
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout if timeout else None
        for line in proc.stdout:
            shown = console_line(line, verbose)
            if shown is not None:
                sys.stdout.write(shown)
                sys.stdout.flush()
            logf.write(ANSI.sub("", line))
            logf.flush()  # live: `tail -f flwr_run.log` follows the run
            if run_id is None and (m := re.search(r"run (\d+)", line)):
                run_id = m.group(1)
            if deadline and time.monotonic() > deadline:
                proc.kill()
                break
        rc = proc.wait()
    return rc, run_id


def run_status(env: dict[str, str], run_id: str | None) -> str:
    """Final status of a run as the SuperLink reports it ("completed", "failed", ...)."""
    if run_id is None:
        return "unknown"
    out = subprocess.run(
        [bin_path("flwr"), "list", CONNECTION, "--run-id", run_id, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        runs = json.loads(out.stdout).get("runs", [])
        status = str(runs[0].get("status", "unknown"))
    except (json.JSONDecodeError, IndexError, AttributeError):
        return "unknown"
    return status.split(":")[-1]  # "finished:completed" -> "completed"


def client_env(overrides: list[str]) -> dict[str, str]:
    """The clients' side of the user's own `hydra.searchpath` (their task YAMLs): on this
    machine the user is every party, so the simulated clients get the same folders in their
    own environment (a client never takes a search path from the server's overrides)."""
    from fedapp.core.policy import CLIENT_SEARCHPATH_ENV, searchpath_from_overrides

    folders = searchpath_from_overrides(overrides)
    if not folders or os.environ.get(CLIENT_SEARCHPATH_ENV):
        return {}
    return {CLIENT_SEARCHPATH_ENV: ":".join(folders)}


def prepare_run(
    cfg, overrides: list[str], data_dir: Path, out: Path
) -> tuple[Path, dict[str, str], Path]:
    """Private FLWR_HOME, the Flower processes' environment, and the run-config file."""
    flwr_home = Path(tempfile.mkdtemp(prefix="fedapp-flwr-home-"))
    env = flower_env(flwr_home, data_dir, offline=cfg.task.get("source", "local") == "local")
    env.update(client_env(overrides))  # the simulated clients' own task folders
    run_cfg = write_run_config(out / "run_config.toml", run_config_values(overrides, out, data_dir))
    return flwr_home, env, run_cfg


def client_gpu_share(cfg, cuda_devices: int | None = None, cpu_count: int | None = None) -> float:
    """GPUs Ray reserves per ClientApp (`simulation.client_num_gpus`).

    auto: 0 with device=cpu or without CUDA; else the GPUs divided among the CPU slots of the
    pool (os.cpu_count() // client_num_cpus), so every slot holds a ClientApp and they share
    the GPUs. Ray's pool is min(CPUs / num_cpus, GPUs / num_gpus) wide: a larger share (say 1
    GPU each) would leave all but one core idle, and the small models here use little of a GPU.
    Raises ValueError when the config names a CUDA device this machine does not have."""
    setting = str(cfg.simulation.get("client_num_gpus", "auto"))
    if setting != "auto":
        return float(setting)
    from tasks.training import resolve_device  # device=cpu: no CUDA call

    if resolve_device(cfg.get("device", "auto")).type != "cuda":
        return 0.0
    import torch

    gpus = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    slots = max(
        (cpu_count or os.cpu_count() or 1) // max(int(cfg.simulation.client_num_cpus), 1), 1
    )
    return min(1.0, gpus / slots)


def federation_resources(cfg, nodes: int, **machine) -> str:
    """`flwr run --federation-config` for this simulation: SuperNodes, CPUs and GPUs per ClientApp."""
    fed = f"num-supernodes={nodes} client-resources-num-cpus={int(cfg.simulation.client_num_cpus)}"
    try:
        gpus = client_gpu_share(cfg, **machine)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return fed + (f" client-resources-num-gpus={gpus:.6g}" if gpus > 0 else "")


def run_simulation(
    overrides: str | Sequence[str] | None = None,
    output_dir: Path | str | None = None,
    *,
    app_dir: Path = PROJECT_ROOT,
    timeout: float | None = None,
    keep_flwr_home: bool = False,
    verbose: bool = False,
) -> RunOutcome:
    """Run one simulation of the composed config; return its final status and output folder."""
    ovr = parse_overrides(overrides)
    cfg = compose(ovr)  # fail fast on a bad config, before any process starts
    data_dir = resolve_data_dir(cfg)
    from tasks import get_task

    num_clients = get_task(cfg, data_dir).num_partitions()
    out = resolve_output_dir(cfg, {"output-dir": str(output_dir) if output_dir else ""})
    cfg, ovr = with_keys(cfg, ovr, out)
    print(
        f"[fedapp] {cfg.task.name} / {cfg.strategy.name}: {num_clients} clients, {cfg.rounds} rounds -> {out}",
        flush=True,
    )
    nodes = int(cfg.simulation.get("num_supernodes") or 0) or num_clients
    # Before any process starts: device=cuda on a machine without a GPU fails here.
    fed = federation_resources(cfg, nodes)
    flwr_home, env, run_cfg = prepare_run(cfg, ovr, data_dir, out)
    try:
        with superlink(flwr_home, out / "superlink.log", env):
            rc, run_id = submit(app_dir, run_cfg, env, fed, timeout, out / "flwr_run.log", verbose)
            status = run_status(env, run_id)
    finally:
        end_run(flwr_home, out)
        if not keep_flwr_home:
            shutil.rmtree(flwr_home, ignore_errors=True)
    outcome = RunOutcome(status=status, output_dir=out, returncode=rc, run_id=run_id)
    report(outcome)
    return outcome


def report(outcome: RunOutcome) -> None:
    """One line on how the run ended. Flower's `flwr run --stream` exits 0 even when the
    ServerApp fails; the SuperLink's final status and results.json are what is checked."""
    out = outcome.output_dir
    if outcome.ok:
        word = (
            "done"
            if outcome.run_status == "completed"
            else "done, DEGRADED (see meta.status_detail)"
        )
        print(f"[fedapp] {word}: results in {out}", flush=True)
    else:
        print(
            f"[fedapp] run {outcome.run_id} ended with Flower status '{outcome.status}', fedapp "
            f"status '{outcome.run_status}' (exit code {outcome.returncode}); logs: "
            f"{out}/flwr_run.log, {out}/superlink.log",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedapp-run",
        description="Run one fedapp simulation. Arguments are Hydra overrides, e.g. "
        "`fedapp-run strategy=fedprox rounds=10 partition=dirichlet partition.alpha=0.1`.",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (key=value)")
    parser.add_argument(
        "--output-dir", default=None, help="where results go (default: outputs/<time>-...)"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="stop streaming after this many seconds"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of setup errors")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="echo every Flower/Ray log line (default: fedapp's progress lines and errors; "
        "everything is always in <output-dir>/flwr_run.log)",
    )
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()
    with user_errors(args.debug):
        outcome = run_simulation(
            args.overrides, args.output_dir, timeout=args.timeout, verbose=args.verbose
        )
        return 0 if outcome.ok else 1
    return 2


@contextmanager
def user_errors(debug: bool = False) -> Iterator[None]:
    """Configuration and data errors end the command with their one-line message (exit 2):
    they say what to change; a traceback only with --debug."""
    from tasks import DataError

    try:
        yield
    except (ConfigError, DataError) as err:
        if debug:
            raise
        print(f"fedapp: {err}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
