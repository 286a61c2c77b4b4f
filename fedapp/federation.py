"""A real local federation: one SuperLink and N SuperNodes as separate processes on loopback.

`fedapp-federation --nodes 4 [hydra overrides...]`

1. Composes the config and writes each node's own data file (partition i of the configured
   partitioner, regrouped into N nodes) under `<output>/nodes/node-<i>/` - in a real
   consortium every institution already has this file and nothing else.
2. Starts `flower-superlink` (deployment mode, insecure on 127.0.0.1: TLS and node
   authentication come later) and N `flower-supernode` processes, each with
   `--node-config 'partition-id=i num-partitions=N data-path="..."'`.
3. Submits the app with `flwr run --stream`, checks the final status and stops every process.

Under `secure=ckks` it splits the key material as a deployment must: the SuperNodes get
`--node-config ckks-secret=<output>/keys/secret.ckks`, the ServerApp's `secure.key_dir` is
`<output>/server_keys` with `public.ckks` only, so nobody on the server side can decrypt (and
server-side test metrics stay empty; the clients' federated evaluation remains).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fedapp.config import (
    PROJECT_ROOT,
    compose,
    parse_overrides,
    resolve_data_dir,
    resolve_output_dir,
)
from fedapp.launch import (
    RunOutcome,
    bin_path,
    exit_cleanly_on_sigterm,
    free_port,
    prepare_run,
    report,
    run_status,
    stop_process_group,
    submit,
    superlink,
    user_errors,
)


def export_node_data(overrides: list[str], nodes: int, out_dir: Path) -> list[Path]:
    """Write one data file per node; node i gets partitions {j : j % nodes == i}."""
    from tasks import get_task

    cfg = compose(overrides)
    task = get_task(cfg, resolve_data_dir(cfg))
    n = task.num_partitions()
    if nodes > n:
        raise ValueError(
            f"--nodes {nodes} is more than the {n} partitions of partition={cfg.partition.name}"
        )
    paths = []
    for i in range(nodes):
        target = out_dir / "nodes" / f"node-{i}" / f"data{task.node_file_suffix}"
        task.export_partitions(list(range(i, n, nodes)), target)
        paths.append(target)
    return paths


def split_keys(cfg, overrides: list[str], out: Path) -> tuple[list[str], Path | None]:
    """secure=ckks: (overrides pointing the server at a folder with the public context only,
    the secret context's path for the SuperNodes). Keys are made in `<out>/keys` unless
    `secure.key_dir` names a folder from `fedapp-keys`."""
    from fedapp.secure import PUBLIC, SECRET, SecureError, SecureSpec, create_keys

    spec = SecureSpec.from_config(cfg.get("secure"))
    if not spec.active:
        return overrides, None
    keys = Path(spec.key_dir) if spec.key_dir else out / "keys"
    if not spec.key_dir:
        create_keys(keys, spec)
    if not (keys / SECRET).is_file() or not (keys / PUBLIC).is_file():
        raise SecureError(f"{keys} must hold {SECRET} and {PUBLIC} (make them with fedapp-keys)")
    server = out / "server_keys"
    server.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(keys / PUBLIC, server / PUBLIC)
    return [*overrides, f"secure.key_dir={server}"], keys / SECRET


def run_federation(
    nodes: int,
    overrides: str | Sequence[str] | None = None,
    output_dir: Path | str | None = None,
    *,
    app_dir: Path = PROJECT_ROOT,
    timeout: float | None = None,
    verbose: bool = False,
) -> RunOutcome:
    ovr = parse_overrides(overrides)
    cfg = compose(ovr)
    if int(cfg.clients_per_round) > nodes:
        ovr = [*ovr, f"clients_per_round={nodes}"]
    if int(cfg.eval_clients_per_round) > nodes:
        ovr = [*ovr, f"eval_clients_per_round={nodes}"]
    cfg = compose(ovr)
    data_dir = resolve_data_dir(cfg)
    out = resolve_output_dir(cfg, {"output-dir": str(output_dir) if output_dir else ""})
    print(f"[fedapp] local federation: 1 SuperLink + {nodes} SuperNodes -> {out}", flush=True)
    node_files = export_node_data(ovr, nodes, out)
    ovr, secret = split_keys(cfg, ovr, out)
    cfg = compose(ovr)
    flwr_home, env, run_cfg = prepare_run(cfg, ovr, data_dir, out)
    supernodes: list[subprocess.Popen] = []
    try:
        with superlink(flwr_home, out / "superlink.log", env, simulation=False) as port:
            for i, path in enumerate(node_files):
                node_home = flwr_home / f"supernode-{i}"
                node_home.mkdir()
                node_env = {**env, "FLWR_HOME": str(node_home)}
                cmd = [
                    bin_path("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--port",
                    str(free_port()),
                    "--isolation",
                    "subprocess",
                    "--node-config",
                    f'partition-id={i} num-partitions={nodes} data-path="{path}"'
                    + (f' ckks-secret="{secret}"' if secret else ""),
                ]
                log = open(out / "nodes" / f"node-{i}" / "supernode.log", "wb")  # noqa: SIM115
                supernodes.append(
                    subprocess.Popen(
                        cmd,
                        env=node_env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            time.sleep(1.0)
            for i, p in enumerate(supernodes):
                if p.poll() is not None:
                    raise RuntimeError(
                        f"SuperNode {i} exited with code {p.returncode}; see {out}/nodes/node-{i}/supernode.log"
                    )
            rc, run_id = submit(app_dir, run_cfg, env, None, timeout, out / "flwr_run.log", verbose)
            status = run_status(env, run_id)
    finally:
        for p in supernodes:
            stop_process_group(p)
        shutil.rmtree(flwr_home, ignore_errors=True)
    outcome = RunOutcome(status=status, output_dir=out, returncode=rc, run_id=run_id)
    report(outcome)
    return outcome


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedapp-federation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=4, help="number of SuperNodes (default 4)")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of setup errors")
    parser.add_argument(
        "--verbose", action="store_true", help="echo every Flower log line, not only fedapp's"
    )
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()
    with user_errors(args.debug):
        outcome = run_federation(
            args.nodes, args.overrides, args.output_dir, timeout=args.timeout, verbose=args.verbose
        )
        return 0 if outcome.ok else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
