"""A real local federation: one SuperLink and N SuperNodes as separate processes on loopback.

`fedapp-federation --nodes 4 [hydra overrides...]`

1. Composes the config and writes each node's own data file (partition i of the configured
   partitioner, regrouped into N nodes) under `<output>/nodes/node-<i>/` - in a real
   consortium every institution already has this file and nothing else.
2. Makes the federation's credentials (`fedapp.tls`: a CA, the SuperLink's certificate, one
   ECDSA P-384 key pair per SuperNode; or takes them from `--credentials`), starts
   `flower-superlink` on 127.0.0.1 with TLS and `--enable-supernode-auth`, registers each
   node's public key (`flwr supernode register`) and starts N `flower-supernode` processes,
   each with the CA certificate, its own private key and
   `--node-config 'partition-id=i num-partitions=N data-path="..."'`. `--insecure` skips
   all of that (no TLS, anyone may join), with a warning: local experiments only.
3. Submits the app with `flwr run --stream`, checks the final status and stops every process.

Under `secure=ckks` it splits the key material as a deployment must: the SuperNodes get
`--node-config ckks-secret=<output>/keys/secret.ckks`, the ServerApp's `secure.key_dir` is
`<output>/server_keys` with `public.ckks` only, so nobody on the server side can decrypt (and
server-side test metrics stay empty; the clients' federated evaluation remains).
"""

from __future__ import annotations

import argparse
import re
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
    CONNECTION,
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
from fedapp.tls import Credentials, create_credentials


def export_operator_files(
    overrides: list[str], nodes: int, out_dir: Path
) -> tuple[list[Path], Path | None]:
    """One data file per node, `<out>/nodes/node-i/data<suffix>` (node i gets partitions
    {j : j % nodes == i}), and the operator's test file `<out>/operator/test.csv`, so that
    the ServerApp runs with `task.test_file` and a data folder holding that file only, as
    the SuperNodes hold theirs: no process of the federation reads the pooled dataset. The
    test file is None for tasks without `test_file` (images)."""
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
    test = None
    if hasattr(task, "export_central_test"):
        test = task.export_central_test(out_dir / "operator" / "test.csv")
    return paths, test


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


def register_node(env: dict[str, str], public_key: Path) -> int:
    """`flwr supernode register`: the SuperLink will accept the SuperNode holding the
    private half of `public_key` (an OpenSSH ECDSA key). Returns its Flower node id."""
    proc = subprocess.run(
        [bin_path("flwr"), "supernode", "register", str(public_key), CONNECTION],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"SuperNode (\d+) registered", proc.stdout)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(
            f"registering {public_key} failed (exit {proc.returncode}): "
            f"{(proc.stdout + proc.stderr).strip()[-500:]}"
        )
    return int(found.group(1))


def start_supernode(
    port: int,
    home: Path,
    env: dict[str, str],
    log_path: Path,
    node_config: str,
    *,
    ca_cert: Path | None = None,
    private_key: Path | None = None,
) -> subprocess.Popen:
    """One `flower-supernode` connected to the SuperLink on loopback `port`: over TLS checked
    against `ca_cert` (insecure without one), authenticated with `private_key` if given."""
    home.mkdir(parents=True, exist_ok=True)
    cmd = [bin_path("flower-supernode"), "--superlink", f"127.0.0.1:{port}"]
    cmd += ["--root-certificates", str(ca_cert)] if ca_cert is not None else ["--insecure"]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    cmd += ["--port", str(free_port()), "--isolation", "subprocess"]
    if node_config:
        cmd += ["--node-config", node_config]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            cmd,
            env={**env, "FLWR_HOME": str(home)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def node_config_line(i: int, nodes: int, data: Path, secret: Path | None) -> str:
    """Node i's config: its partition id, the federation's size, its own data file and, next
    to it, the folder where its client state lives (kept across SuperNode restarts and
    resumed runs)."""
    line = (
        f'partition-id={i} num-partitions={nodes} data-path="{data}" '
        f'state-dir="{data.parent / "state"}"'
    )
    return line + (f' ckks-secret="{secret}"' if secret else "")


INSECURE_WARNING = (
    "[fedapp] WARNING: --insecure: no TLS and no SuperNode authentication. Model updates "
    "travel in clear text and any process that reaches the port can join the federation. "
    "For experiments on this machine only."
)


def federation_credentials(
    out: Path, nodes: int, credentials: Path | str | None, insecure: bool
) -> Credentials | None:
    """The federation's TLS and node keys: `credentials` (from `fedapp-certs`, with keys for
    node-0..node-N-1), or new ones under `<out>/credentials`; None with `insecure`."""
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
        return None
    names = [f"node-{i}" for i in range(nodes)]
    if credentials is not None:
        creds = Credentials(Path(credentials))
        creds.check(names)
        return creds
    return create_credentials(out / "credentials", nodes=names)


def run_federation(
    nodes: int,
    overrides: str | Sequence[str] | None = None,
    output_dir: Path | str | None = None,
    *,
    app_dir: Path = PROJECT_ROOT,
    timeout: float | None = None,
    verbose: bool = False,
    insecure: bool = False,
    credentials: Path | str | None = None,
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
    creds = federation_credentials(out, nodes, credentials, insecure)
    print(
        f"[fedapp] local federation: 1 SuperLink + {nodes} SuperNodes "
        f"({'insecure' if creds is None else 'TLS, registered SuperNodes only'}) -> {out}",
        flush=True,
    )
    node_files, test_file = export_operator_files(ovr, nodes, out)
    if test_file is not None:
        ovr, data_dir = [*ovr, f"task.test_file={test_file}"], test_file.parent
    ovr, secret = split_keys(cfg, ovr, out)
    cfg = compose(ovr)
    flwr_home, env, run_cfg = prepare_run(cfg, ovr, data_dir, out)
    supernodes: list[subprocess.Popen] = []
    try:
        with superlink(
            flwr_home, out / "superlink.log", env, simulation=False, credentials=creds
        ) as port:
            for i, path in enumerate(node_files):
                key = None
                if creds is not None:
                    key = creds.node_key(f"node-{i}")
                    register_node(env, creds.node_public_key(f"node-{i}"))
                supernodes.append(
                    start_supernode(
                        port,
                        flwr_home / f"supernode-{i}",
                        env,
                        out / "nodes" / f"node-{i}" / "supernode.log",
                        node_config_line(i, nodes, path, secret),
                        ca_cert=creds.ca_cert if creds is not None else None,
                        private_key=key,
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
    parser.add_argument(
        "--credentials",
        default=None,
        help="folder from `fedapp-certs DIR --nodes node-0 ...` (default: new ones in the output)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS, no SuperNode authentication: local experiments only",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of setup errors")
    parser.add_argument(
        "--verbose", action="store_true", help="echo every Flower log line, not only fedapp's"
    )
    args = parser.parse_args(argv)
    exit_cleanly_on_sigterm()
    with user_errors(args.debug):
        outcome = run_federation(
            args.nodes,
            args.overrides,
            args.output_dir,
            timeout=args.timeout,
            verbose=args.verbose,
            insecure=args.insecure,
            credentials=args.credentials,
        )
        return 0 if outcome.ok else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
