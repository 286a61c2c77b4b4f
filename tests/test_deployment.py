"""Deployment behaviour with real processes on loopback: a SuperLink with TLS and SuperNode
authentication, SuperNodes that are refused, a SuperNode killed mid-run and restarted."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import time
from pathlib import Path

import pytest

from fedapp.checks import compose
from fedapp.cli.federation import (
    export_operator_files,
    node_config_line,
    register_node,
    start_supernode,
)
from fedapp.cli.launch import (
    bin_path,
    prepare_run,
    run_status,
    stop_process_group,
    submit,
    superlink,
)
from fedapp.core.config import PROJECT_ROOT, parse_overrides, resolve_data_dir
from fedapp.features.tls import create_credentials

pytestmark = pytest.mark.e2e

# A refused SuperNode exits (process status 1) naming Flower's exit code 305 and the reason.
REFUSED = "ref-exit-codes/305"

NO_NGINX = "nginx is not installed (Debian: apt-get install nginx): the runbook's reverse proxy"

CREDIT = (
    "task=credit partition=iid partition.num_partitions=3 clients_per_round=3 "
    "eval_clients_per_round=3 train.local_epochs=1"
)


def _wait_exit(proc, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except Exception:
        return None


def _federation(tmp_path: Path, overrides: str, nodes: int):
    ovr = parse_overrides(overrides)
    cfg = compose(ovr)
    out = tmp_path / "run"
    out.mkdir()
    files, _ = export_operator_files(ovr, nodes, out)
    flwr_home, env, run_cfg = prepare_run(cfg, ovr, resolve_data_dir(cfg), out)
    return out, files, flwr_home, env, run_cfg


def test_tls_federation_admits_registered_nodes_and_refuses_the_rest(tmp_path, data_dir):
    """Two registered SuperNodes train; a node with an unregistered key, one without a key and
    one that trusts another CA are refused by the SuperLink (exit 305) and the run goes on."""
    out, files, flwr_home, env, run_cfg = _federation(
        tmp_path, f"{CREDIT} partition.num_partitions=2 clients_per_round=2 rounds=2", 2
    )
    creds = create_credentials(tmp_path / "creds", nodes=["node-0", "node-1", "stranger"])
    other = create_credentials(tmp_path / "other-ca")
    procs = []
    try:
        with superlink(
            flwr_home, out / "superlink.log", env, simulation=False, credentials=creds
        ) as port:
            for i in range(2):
                register_node(env, creds.node_public_key(f"node-{i}"))
                procs.append(
                    start_supernode(
                        port,
                        flwr_home / f"sn-{i}",
                        env,
                        out / f"sn-{i}.log",
                        node_config_line(i, 2, files[i], None),
                        ca_cert=creds.ca_cert,
                        private_key=creds.node_key(f"node-{i}"),
                    )
                )
            bad = {  # what each sends, and the SuperLink's (or TLS's) reason to refuse it
                "unregistered key": (
                    dict(ca_cert=creds.ca_cert, private_key=creds.node_key("stranger")),
                    "[code: 2004] Failed to activate SuperNode",
                ),
                "no key": (
                    dict(ca_cert=creds.ca_cert),
                    "[code: 2001] SuperNode authentication is enabled",
                ),
                "another CA": (
                    dict(ca_cert=other.ca_cert, private_key=creds.node_key("node-0")),
                    "certificate verify failed",
                ),
            }
            refused = {}
            for j, (name, (kw, _)) in enumerate(bad.items()):
                p = start_supernode(
                    port,
                    flwr_home / f"bad-{j}",
                    env,
                    out / f"bad-{j}.log",
                    node_config_line(j, 2, files[j % 2], None),
                    **kw,
                )
                procs.append(p)
                refused[name] = (p, out / f"bad-{j}.log")
            for name, (p, log) in refused.items():
                assert _wait_exit(p, 60) not in (None, 0), f"{name}: not refused"
                text = log.read_text()
                assert REFUSED in text and bad[name][1] in text, f"{name}: {text[-800:]}"
            rc, run_id = submit(PROJECT_ROOT, run_cfg, env, None, 600, out / "flwr_run.log")
            assert run_status(env, run_id) == "completed", (out / "flwr_run.log").read_text()[
                -3000:
            ]
    finally:
        for p in procs:
            stop_process_group(p)
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["status"] == "completed" and res["meta"]["num_clients"] == 2
    assert sorted(res["nodes"]) == ["0", "1"]
    assert all(n["replies"] > 0 and n["failures"] == 0 for n in res["nodes"].values())


def test_a_killed_supernode_is_dropped_and_recognised_when_it_restarts(tmp_path, data_dir):
    """Kill one of three SuperNodes (SIGKILL) after round 1: the next round goes on with the
    other two and ends at the round timeout at the latest; the node restarts (a new Flower node
    id, the same institution's data and partition id), is recognised as the same client and
    trains again. (The same run as `bench/deployment.py`'s fault experiment.)"""
    from bench.deployment import killed_node_run

    # Each message starts a ClientApp process (Flower's subprocess isolation): ~20-40 s a round
    # for 3 clients on 2 cores; the timeout leaves room for that and still bounds the round.
    timeout = 150
    run = killed_node_run(
        tmp_path / "run", f"{CREDIT} rounds=4 round_timeout_s={timeout} min_replies=1"
    )
    res = run["results"]
    assert run["status"] == "completed" and res["meta"]["status"] in ("completed", "degraded")
    client = res["nodes"]["1"]
    assert client["rejoins"] >= 1 and len(client["node_ids"]) == 2 and client["connected"]
    assert client["failures"] >= 1 and client["rejoined_s"] is not None
    rounds = res["rounds"][1:]
    assert all(r["aggregated"] for r in rounds)
    trained = lambda r: {  # noqa: E731
        c["partition_id"] for c in r["clients"] if c["phase"] == "train" and c["status"] == "ok"
    }
    assert 1 in trained(rounds[-1])  # sampled and trained again after its restart
    # no round waited longer than its timeout (+ its evaluation, bounded the same way)
    assert all(r["wall_s"] < 2 * timeout + 30 for r in rounds), [r["wall_s"] for r in rounds]
    assert run["restarted"] > run["killed"]


def _flwr_run(env: dict[str, str], app: str, run_cfg: Path) -> str:
    """`flwr run APP` without streaming; its run id."""
    import subprocess

    done = subprocess.run(
        [bin_path("flwr"), "run", app, "fedapp", "--run-config", str(run_cfg), "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)["run-id"]


def _wait_for(log: Path, text: str, proc, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text() if log.exists() else ""
        if text in content:
            return content
        assert proc.poll() is None, f"SuperNode exited: {content[-2000:]}"
        time.sleep(0.5)
    pytest.fail(f"{text!r} not in {log} after {timeout:.0f}s: {content[-2000:]}")


def test_supernodes_refuse_an_unsigned_or_wrongly_signed_app(tmp_path, data_dir):
    """A SuperNode started with the operator's `--trusted-entities`, on a SuperLink that
    fetches apps by name from `fedapp-certs serve-apps`'s index: the app sent as a folder
    (`flwr run <folder>`: Flower attaches no signature) and the app signed by another key
    (served by the index under the right name) are both refused: the SuperNode logs the
    refusal, answers with an error reply and never takes the message in (no ClientApp
    starts; its state folder stays empty). The signed case is the runbook test below."""
    import subprocess

    from fedapp.features.appsign import build_fab, serve_apps, sign_fab

    out, files, flwr_home, env, run_cfg = _federation(
        tmp_path, f"{CREDIT} partition.num_partitions=2 rounds=1 round_timeout_s=60", 1
    )
    creds = create_credentials(tmp_path / "creds", nodes=["node-0"])
    other = create_credentials(tmp_path / "other-operator")
    app = sign_fab(build_fab(PROJECT_ROOT), other.signing_key, tmp_path / "apps")
    index = serve_apps(tmp_path / "apps")
    log = out / "sn-0.log"
    node = None
    try:
        with superlink(
            flwr_home,
            out / "superlink.log",
            {**env, "FLWR_SUPERGRID_API_URL": index.url, "NO_PROXY": "127.0.0.1,localhost"},
            simulation=False,
            credentials=creds,
        ) as port:
            register_node(env, creds.node_public_key("node-0"))
            node = start_supernode(
                port,
                flwr_home / "sn-0",
                env,
                log,
                node_config_line(0, 1, files[0], None),
                ca_cert=creds.node_ca_cert("node-0"),
                private_key=creds.node_key("node-0"),
                trusted_entities=creds.node_trusted_entities("node-0"),
            )
            cases = [
                (str(PROJECT_ROOT), "App verification is not supported by the connected SuperLink"),
                (app.spec, "FAB verification failed"),
            ]
            for spec, refusal in cases:
                run_id = _flwr_run(env, spec, run_cfg)
                text = _wait_for(log, refusal, node)
                subprocess.run(
                    [bin_path("flwr"), "stop", run_id, "fedapp"],
                    env=env,
                    capture_output=True,
                    timeout=60,
                )
                assert f"[RUN {run_id}" in text
    finally:
        if node is not None:
            stop_process_group(node)
        index.shutdown()
    text = log.read_text()
    assert "Received successfully" not in text, text[-3000:]  # no message was taken in
    state = files[0].parent / "state"
    assert not state.exists() or not any(state.rglob("*")), list(state.rglob("*"))


def _runbook() -> list[str]:
    text = (PROJECT_ROOT / "docs" / "how-to" / "deploy.md").read_text()
    block = text.split("<!-- runbook -->")[1].split("<!-- /runbook -->")[0]
    lines = block.strip().strip("`").removeprefix("bash").strip().splitlines()
    return [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


# The runbook's long-running commands (each in its own terminal in a real deployment).
BACKGROUND = ("flower-superlink", "flower-supernode", "nginx", "fedapp-certs serve-apps")


def _command(line: str) -> str:
    """The command of a runbook line, without leading `VAR=value` assignments."""
    words = shlex.split(line)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words.pop(0)
    return " ".join(words[:2]) if words[0] == "fedapp-certs" else words[0]


def _wait_port(port: int, proc, log: Path, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"nothing listens on {port} after {timeout:.0f}s: {log.read_text()[-2000:]}")


def _post(port: int, path: str, ca: Path, method: str = "POST") -> tuple[int, str]:
    """One HTTPS request with `path` sent verbatim (no client-side normalisation)."""
    import http.client
    import ssl

    conn = http.client.HTTPSConnection(
        "localhost", port, context=ssl.create_default_context(cafile=str(ca)), timeout=15
    )
    try:
        conn.request(
            method,
            path,
            body=b"" if method == "POST" else None,
            headers={"content-type": "application/protobuf"},
        )
        response = conn.getresponse()
        return response.status, response.read().decode("latin-1")
    finally:
        conn.close()


# Through the proxy: the Control and Runtime APIs, the rest of the SuperLink's routes, and
# the path tricks that would reach them if the proxy forwarded the raw path.
NOT_FORWARDED = [
    ("POST", "/v1/control/list-runs"),
    ("POST", "/v1/control/start-run"),
    ("POST", "/v1/runtime/acquire-task"),
    ("GET", "/health"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("POST", "/v1/fleet/../control/list-runs"),
    ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
    ("POST", "/v1/fleet/..%2fcontrol/list-runs"),
    ("POST", "/v1/fleet/register-node%2f..%2f..%2fcontrol%2flist-runs"),
    ("POST", "//v1/control/list-runs"),
]


def _check_the_proxy(env: dict[str, str], tmp_path: Path, background, stranger: Path) -> None:
    """While the federation is up: the SuperLink listens on loopback only; through the proxy
    nothing but the Fleet API answers (the same requests reach the Control API directly),
    and an outsider cannot register a node key through it; the SuperNodes did talk to the
    SuperLink through the proxy."""
    import psutil

    ca, port, fleet = Path(env["CREDS"]) / "ca.crt", int(env["PORT"]), int(env["FLEET_PORT"])
    superlink = next(p for p in background if "flower-superlink" in " ".join(p.args))
    listening = [
        c.laddr.ip
        for proc in [psutil.Process(superlink.pid), *psutil.Process(superlink.pid).children(True)]
        for c in proc.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening and set(listening) <= {"127.0.0.1", "::1"}, listening
    status, _ = _post(port, "/v1/control/list-runs", ca)
    assert status == 200  # directly, on loopback, anyone may call the Control API
    for method, path in NOT_FORWARDED:
        status, body = _post(fleet, path, ca, method)
        assert status == 404 and "nginx" in body, f"{method} {path} through the proxy: {status}"
    assert _post(fleet, "/v1/fleet/pull-messages", ca, "GET")[0] == 403  # POST only
    # the attack itself: an outsider's `flwr supernode register` through the proxy
    outsider = tmp_path / "outsider-home"
    outsider.mkdir()
    (outsider / "config.toml").write_text(
        f'[superlink]\ndefault = "proxy"\n\n[superlink.proxy]\naddress = "127.0.0.1:{fleet}"\n'
        f'root-certificates = "{ca}"\n'
    )
    import subprocess

    for cmd in (["supernode", "register", str(stranger), "proxy"], ["list", "proxy"]):
        done = subprocess.run(
            [bin_path("flwr"), *cmd],
            env={**env, "FLWR_HOME": str(outsider)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode != 0 or "404" in done.stdout + done.stderr, (cmd, done.stdout)
        assert "registered" not in done.stdout, done.stdout
    log = (Path(env["OPERATOR"]) / "proxy" / "access.log").read_text()
    assert re.search(r'"POST /v1/fleet/pull-messages HTTP/1.1" 200', log), log[-2000:]
    assert re.search(r'"POST /v1/fleet/push-messages HTTP/1.1" 200', log), log[-2000:]


@pytest.mark.skipif(shutil.which("nginx") is None, reason=NO_NGINX)
def test_the_readme_runbook_runs_on_loopback(tmp_path, data_dir):
    """The README's multi-host runbook, command by command, on one machine: SUPERLINK is
    127.0.0.1, the folders are temporary, and (two SuperNodes sharing one machine) each
    SuperNode gets a free port for its local API. Long-running commands run in the
    background, as they would in their own terminals. The SuperLink is on loopback, nginx in
    front of it forwards only the Fleet API (checked while everything is up), the SuperNodes
    connect through nginx and run the app signed by the operator's key."""
    import subprocess

    from fedapp.cli.launch import flower_env, free_port, wait_healthy
    from tasks import get_task

    full_cfg = compose("task=credit partition=iid partition.num_partitions=2")
    task = get_task(full_cfg, data_dir)
    folders = {k: tmp_path / k.lower() for k in ("CREDS", "OPERATOR", "BANK_A", "BANK_B")}
    for name, folder in folders.items():
        if name != "CREDS":
            folder.mkdir()
    task.export_partitions([0], folders["BANK_A"] / "data.csv")
    task.export_partitions([1], folders["BANK_B"] / "data.csv")
    task.export_central_test(folders["OPERATOR"] / "test.csv")
    ports = {k: str(free_port()) for k in ("PORT", "FLEET_PORT", "APPS_PORT")}
    env = flower_env(tmp_path / "operator-home", data_dir=None)
    env.update({k: str(v) for k, v in folders.items()})
    env.update(ports, SUPERLINK="127.0.0.1", PROXY_BIND="127.0.0.1", APP=str(PROJECT_ROOT))
    (tmp_path / "operator-home").mkdir()
    background: list[subprocess.Popen] = []
    outputs = []
    try:
        for n, line in enumerate(_runbook()):
            cmd, run_env, command = line, dict(env), _command(line)
            log_path = tmp_path / f"step-{n}.log"
            if command.startswith(BACKGROUND):
                if command == "flower-supernode":
                    cmd += f" --port {free_port()}"
                    run_env["FLWR_HOME"] = str(tmp_path / f"node-home-{n}")
                with open(log_path, "wb") as log:
                    background.append(
                        subprocess.Popen(
                            ["bash", "-c", cmd],
                            env=run_env,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
                if command == "flower-superlink":
                    wait_healthy(
                        int(env["PORT"]),
                        background[-1],
                        ca_cert=folders["CREDS"] / "ca.crt",
                        log_file=log_path,
                    )
                elif command == "nginx":
                    _wait_port(int(env["FLEET_PORT"]), background[-1], log_path)
                elif command == "fedapp-certs serve-apps":
                    _wait_port(int(env["APPS_PORT"]), background[-1], log_path)
                continue
            done = subprocess.run(
                ["bash", "-c", cmd], env=run_env, capture_output=True, text=True, timeout=900
            )
            assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            outputs.append(done.stdout)
        stranger = create_credentials(tmp_path / "stranger", nodes=["x"]).node_public_key("x")
        _check_the_proxy(env, tmp_path, background, stranger)
    finally:
        for p in background:
            stop_process_group(p)
    runs = json.loads(outputs[-1])["runs"]
    assert runs[-1]["status"].endswith("completed"), runs
    res = json.loads((folders["OPERATOR"] / "run" / "results.json").read_text())
    assert res["meta"]["status"] == "completed" and sorted(res["nodes"]) == ["0", "1"]
    assert res["rounds"][-1]["test_roc_auc"] > 0.65
    logs = "".join(p.read_text() for p in tmp_path.glob("step-*.log"))
    # the SuperNodes checked the operator's signature (a refusal is logged) and trained
    assert "FAB verification failed" not in logs and "could not be verified" not in logs
    # no credential in the results
    for path in (folders["OPERATOR"] / "run").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".yaml", ".toml", ".csv", ".log"):
            assert "PRIVATE KEY" not in path.read_text(errors="replace"), path


def test_a_hostile_server_cannot_switch_off_the_institutions_protections(tmp_path, data_dir):
    """The real-process part of the adversarial-server suite (tests/test_hostile_server.py):
    a TLS federation of registered SuperNodes, each bound to its key (node_keys), whose own
    node config requires DP at epsilon <= 2. The operator first starts the run with
    privacy=none: every node refuses (no statistics are released, the run stops at start-up
    with the nodes' reason); then asks for epsilon 8: each node trains at its own cap."""
    from fedapp.cli.federation import run_federation

    base = "task=credit partition=iid partition.num_partitions=2 rounds=1 train.max_steps=5"
    policy = "max-epsilon=2"
    weak = run_federation(
        2, f"{base} privacy=none", tmp_path / "weak", node_config=policy, timeout=600
    )
    assert not weak.ok
    logs = "".join(
        p.read_text(errors="replace") for p in (tmp_path / "weak").rglob("*.log") if p.is_file()
    )
    assert "refused by their institution's policy" in logs
    assert "requires privacy=sample_dp with epsilon <= 2" in logs
    strong = run_federation(
        2,
        f"{base} privacy=sample_dp privacy.target_epsilon=8",
        tmp_path / "strong",
        node_config=policy,
        timeout=600,
    )
    res = json.loads((strong.output_dir / "results.json").read_text())
    assert strong.ok and res["meta"]["status"] == "completed"
    assert set(res["meta"]["privacy"]["target_epsilons"].values()) == {2.0}
    assert 0 < res["final"]["dp_epsilon"] <= 2.0
    assert res["meta"]["nodes_refused"] == {}  # both proved their partition with their key
    # each institution's ledger is in its own folder, not in the results
    ledgers = sorted(p.name for p in (tmp_path / "strong").rglob("*.dp-ledger.json"))
    assert ledgers == ["client-0.dp-ledger.json", "client-1.dp-ledger.json"]
    assert all("nodes" in p.parts for p in (tmp_path / "strong").rglob("*.dp-ledger.json"))
