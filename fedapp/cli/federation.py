"""A real local federation: one SuperLink and N SuperNodes as separate processes on loopback.

`fedapp-federation --nodes 4 [hydra overrides...]`

1. Composes the config and writes each node's own data file (partition i of the configured
   partitioner, regrouped into N nodes) under `<output>/nodes/node-<i>/` - in a real
   consortium every institution already has this file and nothing else.
2. Makes the federation's credentials (`fedapp.features.tls`: a CA, the operator's app-signing key,
   the SuperLink's certificate, one ECDSA P-384 key pair per SuperNode) in a private
   temporary folder that is removed at the end, never in the results folder; or takes
   them from `--credentials DIR` (kept), or keeps them in `$FEDAPP_CREDENTIALS_DIR/<run
   name>` when that is set. Builds the app's FAB and signs it with the operator's key
   (`fedapp.features.appsign`), serves it on loopback to the SuperLink, starts `flower-superlink` on
   127.0.0.1 with TLS and `--enable-supernode-auth`, registers each node's public key
   (`flwr supernode register`) and starts N `flower-supernode` processes, each with its own
   folder of credentials (the CA certificate, its private key, `--trusted-entities`: it
   runs only the app signed by the operator's key) and
   `--node-config 'partition-id=i num-partitions=N data-path="..."'`. `--insecure` skips
   all of that (no TLS, anyone may join, any app runs), with a warning: local experiments
   only.
3. Submits the app (`flwr run @fedapp/fedapp==<version> --stream`: the signed FAB, by name;
   the folder itself with `--insecure`), checks the final status and stops every process.

Under `secure=ckks` it splits the key material as a deployment must, playing the institutions'
side: the SuperNodes get `--node-config ckks-secret=...` of a key made outside the output
folder (`secure.key_dir=DIR` from `fedapp-keys create DIR`, else the client side's key folder,
fedapp.features.secure.client_key_dir), the ServerApp's `secure.key_dir` is `<output>/server_keys` with
`public.ckks` only (which the clients' keys must match), so nobody on the server side can decrypt (and
server-side test metrics stay empty; the clients' federated evaluation remains).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from fedapp.checks import compose
from fedapp.cli.launch import (
    CONNECTION,
    RunOutcome,
    bin_path,
    end_run,
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
from fedapp.core.config import (
    PROJECT_ROOT,
    parse_overrides,
    resolve_data_dir,
    resolve_output_dir,
)
from fedapp.features.tls import Credentials, create_credentials


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
    the secret context's path for the SuperNodes). The key is the institutions': the folder
    `secure.key_dir` names (from `fedapp-keys create`), else the client side's key folder
    (made once); never made in, nor read from, `out`. The server's copy of the public context
    goes to `<out>/server_keys`."""
    from fedapp.features.secure import (
        PUBLIC,
        SECRET,
        SecureError,
        SecureSpec,
        _within,
        ensure_client_key,
    )

    spec = SecureSpec.from_config(cfg.get("secure"))
    if not spec.active:
        return overrides, None
    keys = Path(spec.key_dir).expanduser() if spec.key_dir else ensure_client_key(spec).parent
    if not (keys / SECRET).is_file() or not (keys / PUBLIC).is_file():
        raise SecureError(
            f"{keys} must hold {SECRET} and {PUBLIC} (make them with `fedapp-keys create DIR`)"
        )
    if _within(keys / SECRET, out):
        raise SecureError(
            f"{keys / SECRET} is inside the run's output folder {out}; the secret key lives on "
            "the institutions' side (fedapp-keys create DIR outside any results folder)"
        )
    server = out / "server_keys"
    server.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(keys / PUBLIC, server / PUBLIC)
    kept = [o for o in overrides if not o.lstrip("+").startswith("secure.key_dir=")]
    return [*kept, f"secure.key_dir={server}"], keys / SECRET


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
    trusted_entities: Path | None = None,
) -> subprocess.Popen:
    """One `flower-supernode` connected to the SuperLink on loopback `port`: over TLS checked
    against `ca_cert` (insecure without one), authenticated with `private_key` if given,
    running only apps signed by a key of `trusted_entities` if given."""
    home.mkdir(parents=True, exist_ok=True)
    cmd = [bin_path("flower-supernode"), "--superlink", f"127.0.0.1:{port}"]
    cmd += ["--root-certificates", str(ca_cert)] if ca_cert is not None else ["--insecure"]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if trusted_entities is not None:
        cmd += ["--trusted-entities", str(trusted_entities)]
    cmd += ["--port", str(free_port()), "--isolation", "subprocess"]
    if node_config:
        cmd += ["--node-config", node_config]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:  # appended: a restarted node keeps its earlier lines
        return subprocess.Popen(
            cmd,
            env={**env, "FLWR_HOME": str(home)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


# Flower's exit code (in the node's log; the process exits 1) when the SuperLink refuses a
# node, e.g. one that comes back while the SuperLink still counts it as active
REFUSED = "Exit Code: 305"


class NodeSupervisor(threading.Thread):
    """Restarts a SuperNode that exits while the run goes on, as an institution's service
    manager would (`Restart=on-failure`): after `delay_s`, and again every `delay_s` while the
    SuperLink refuses it. Flower refuses a node that comes back within its heartbeat window
    (exit 305, "node already active", for about 20-100 s after it died); retried, it rejoins
    as the same client (its partition id and key). At most `max_restarts` per node."""

    def __init__(
        self,
        starters: Sequence[Callable[[], subprocess.Popen]],
        procs: list[subprocess.Popen],
        logs: Sequence[Path] = (),
        *,
        delay_s: float = 10.0,
        max_restarts: int = 30,
        poll_s: float = 1.0,
        say: Callable[[str], None] = lambda line: print(line, flush=True),
    ) -> None:
        super().__init__(daemon=True, name="fedapp-node-supervisor")
        self.starters, self.procs, self.logs = list(starters), procs, list(logs)
        self.delay_s, self.max_restarts, self.poll_s = float(delay_s), int(max_restarts), poll_s
        self.say = say
        self.restarts = [0] * len(procs)
        self._since = [0] * len(procs)  # where in its log the node's current start began
        self.done = threading.Event()
        self._due: dict[int, float] = {}

    def run(self) -> None:
        while not self.done.wait(self.poll_s):
            now = time.monotonic()
            for i, proc in enumerate(self.procs):
                code = proc.poll()
                if code is None or self.restarts[i] >= self.max_restarts:
                    continue
                if i not in self._due:
                    why = (
                        "refused by the SuperLink (too early after its last connection)"
                        if self._refused(i)
                        else f"exit code {code}"
                    )
                    self.say(
                        f"[fedapp] SuperNode {i} stopped ({why}); starting it again in "
                        f"{self.delay_s:.0f}s"
                    )
                    self._due[i] = now + self.delay_s
                elif now >= self._due[i] and not self.done.is_set():
                    del self._due[i]
                    self.restarts[i] += 1
                    with contextlib.suppress(OSError, IndexError):
                        self._since[i] = self.logs[i].stat().st_size
                    self.procs[i] = self.starters[i]()

    def _refused(self, i: int) -> bool:
        if i >= len(self.logs):
            return False
        try:
            with open(self.logs[i], "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(self._since[i], f.tell() - 4096))
                return REFUSED in f.read().decode("utf-8", "replace")
        except OSError:
            return False

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)


def node_config_line(
    i: int, nodes: int, data: Path, secret: Path | None, auth_key: Path | None = None
) -> str:
    """Node i's config: its partition id, the federation's size, its own data file and, next
    to it, the folders where its client state and its DP ledger live (kept across SuperNode
    restarts, resumed runs and new runs), and the key that signs its partition claim (its
    SuperNode key, fedapp.features.identity)."""
    line = (
        f'partition-id={i} num-partitions={nodes} data-path="{data}" '
        f'state-dir="{data.parent / "state"}" ledger-dir="{data.parent / "ledger"}"'
    )
    line += f' auth-key="{auth_key}"' if auth_key else ""
    return line + (f' ckks-secret="{secret}"' if secret else "")


def write_node_keys(creds: Credentials, nodes: int) -> Path:
    """The operator's registry of the institutions' public keys by partition id (the keys
    it registers with the SuperLink), for `node_keys=` (fedapp.features.identity)."""
    path = creds.root / "node_keys.yaml"
    lines = [f'{i}: "{creds.node_public_key(f"node-{i}")}"' for i in range(nodes)]
    path.write_text("\n".join(lines) + "\n")
    return path


INSECURE_WARNING = (
    "[fedapp] WARNING: --insecure: no TLS and no SuperNode authentication. Model updates "
    "travel in clear text and any process that reaches the port can join the federation. "
    "For experiments on this machine only."
)


CREDENTIALS_ENV = "FEDAPP_CREDENTIALS_DIR"


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def federation_credentials(
    out: Path, nodes: int, credentials: Path | str | None, insecure: bool
) -> tuple[Credentials | None, Path | None]:
    """The federation's credentials and the folder to remove at the end (None: keep them).

    `credentials` (from `fedapp-certs DIR --nodes node-0 ...`) are used and kept; else
    new ones in `$FEDAPP_CREDENTIALS_DIR/<run name>` (kept) when that is set; else new ones
    in a private temporary folder (mode 0700, outside the results), removed when the
    federation stops. Never inside the results folder `out`: refused. None with `insecure`."""
    if insecure:
        print(INSECURE_WARNING, file=sys.stderr, flush=True)
        return None, None
    names = [f"node-{i}" for i in range(nodes)]
    if credentials is not None:
        root, remove = Path(credentials), None
    elif os.environ.get(CREDENTIALS_ENV):
        root, remove = Path(os.environ[CREDENTIALS_ENV]) / out.name, None
    else:
        root = Path(tempfile.mkdtemp(prefix="fedapp-credentials-"))  # 0700
        remove = root
        atexit.register(shutil.rmtree, root, True)  # also if setup fails before the run
    if _inside(root, out) or _inside(out, root):
        raise ValueError(
            f"credentials {root} and results {out}: a results folder must not hold keys "
            f"(use another folder, or unset {CREDENTIALS_ENV} for a temporary one)"
        )
    try:
        if credentials is not None:
            creds = Credentials(root)
            creds.check(names)
            return creds, None
        return create_credentials(root, nodes=names), remove
    except BaseException:
        if remove is not None:
            shutil.rmtree(remove, ignore_errors=True)
        raise


def signed_app(app_dir: Path, creds: Credentials, folder: Path):
    """Build `app_dir`'s FAB, sign it with the operator's key and serve it on loopback:
    (the index, to stop at the end; the app spec to `flwr run`)."""
    from fedapp.features.appsign import build_fab, serve_apps, sign_fab

    app = sign_fab(build_fab(app_dir), creds.signing_key, folder)
    return serve_apps(folder), app.spec


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
    node_config: str = "",
) -> RunOutcome:
    """`node_config`: extra node-config keys for every SuperNode (the institutions' own
    policy, e.g. "max-epsilon=3 require-secure=ckks"; fedapp.core.policy)."""
    ovr = parse_overrides(overrides)
    cfg = compose(ovr)
    if int(cfg.clients_per_round) > nodes:
        ovr = [*ovr, f"clients_per_round={nodes}"]
    if int(cfg.eval_clients_per_round) > nodes:
        ovr = [*ovr, f"eval_clients_per_round={nodes}"]
    cfg = compose(ovr)
    data_dir = resolve_data_dir(cfg)
    out = resolve_output_dir(cfg, {"output-dir": str(output_dir) if output_dir else ""})
    creds, remove_creds = federation_credentials(out, nodes, credentials, insecure)
    print(
        f"[fedapp] local federation: 1 SuperLink + {nodes} SuperNodes "
        f"({'insecure' if creds is None else 'TLS, registered SuperNodes only'}) -> {out}",
        flush=True,
    )
    node_files, test_file = export_operator_files(ovr, nodes, out)
    if test_file is not None:
        ovr, data_dir = [*ovr, f"task.test_file={test_file}"], test_file.parent
    ovr, secret = split_keys(cfg, ovr, out)
    if creds is not None:  # partition ids bound to the registered node keys
        ovr = [*ovr, f"node_keys={write_node_keys(creds, nodes)}"]
    cfg = compose(ovr)
    flwr_home, env, run_cfg = prepare_run(cfg, ovr, data_dir, out)
    supernodes: list[subprocess.Popen] = []
    supervisor = None
    index, app = None, str(app_dir)
    try:
        superlink_env = env
        if creds is not None:  # SuperNodes run only the app signed by the operator's key
            index, app = signed_app(app_dir, creds, flwr_home / "apps")
            superlink_env = {
                **env,
                "FLWR_SUPERGRID_API_URL": index.url,
                "NO_PROXY": ",".join(filter(None, ["127.0.0.1,localhost", env.get("NO_PROXY")])),
            }
        with superlink(
            flwr_home, out / "superlink.log", superlink_env, simulation=False, credentials=creds
        ) as port:
            starters = []
            for i, path in enumerate(node_files):
                node = f"node-{i}"
                if creds is not None:
                    register_node(env, creds.node_public_key(node))
                starters.append(
                    functools.partial(
                        start_supernode,
                        port,
                        flwr_home / f"supernode-{i}",
                        env,
                        out / "nodes" / node / "supernode.log",
                        " ".join(
                            filter(
                                None,
                                [
                                    node_config_line(
                                        i,
                                        nodes,
                                        path,
                                        secret,
                                        creds.node_key(node) if creds else None,
                                    ),
                                    node_config,
                                ],
                            )
                        ),
                        ca_cert=creds.node_ca_cert(node) if creds is not None else None,
                        private_key=creds.node_key(node) if creds is not None else None,
                        trusted_entities=(
                            creds.node_trusted_entities(node) if creds is not None else None
                        ),
                    )
                )
                supernodes.append(starters[-1]())
            time.sleep(1.0)
            for i, p in enumerate(supernodes):
                if p.poll() is not None:
                    raise RuntimeError(
                        f"SuperNode {i} exited with code {p.returncode}; see {out}/nodes/node-{i}/supernode.log"
                    )
            logs = [out / "nodes" / f"node-{i}" / "supernode.log" for i in range(len(starters))]
            supervisor = NodeSupervisor(starters, supernodes, logs)
            supervisor.start()
            rc, run_id = submit(app, run_cfg, env, None, timeout, out / "flwr_run.log", verbose)
            status = run_status(env, run_id)
    finally:
        if supervisor is not None:
            supervisor.stop()
        for p in supernodes:
            stop_process_group(p)
        if index is not None:
            index.shutdown()
        end_run(flwr_home, out)
        shutil.rmtree(flwr_home, ignore_errors=True)
        if remove_creds is not None:
            shutil.rmtree(remove_creds, ignore_errors=True)
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
        help="folder from `fedapp-certs DIR --nodes node-0 ...` (default: new ones in a "
        "temporary folder removed at the end, or in $FEDAPP_CREDENTIALS_DIR/<run name>)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS, no SuperNode authentication: local experiments only",
    )
    parser.add_argument(
        "--node-config",
        default="",
        help="extra node-config keys for every SuperNode: the institutions' own protections, "
        'e.g. "max-epsilon=3 require-secure=ckks" (see docs/reference/node-config.md)',
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
            node_config=args.node_config,
        )
        return 0 if outcome.ok else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
