"""Deployment behaviour with real processes on loopback: a SuperLink with TLS and SuperNode
authentication, SuperNodes that are refused, a SuperNode killed mid-run and restarted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedapp.config import PROJECT_ROOT, compose, parse_overrides, resolve_data_dir
from fedapp.federation import (
    export_operator_files,
    node_config_line,
    register_node,
    start_supernode,
)
from fedapp.launch import prepare_run, run_status, stop_process_group, submit, superlink
from fedapp.tls import create_credentials

pytestmark = pytest.mark.e2e

# A refused SuperNode exits (process status 1) naming Flower's exit code 305 and the reason.
REFUSED = "ref-exit-codes/305"

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


def _runbook() -> list[str]:
    text = (PROJECT_ROOT / "README.md").read_text()
    block = text.split("<!-- runbook -->")[1].split("<!-- /runbook -->")[0]
    lines = block.strip().strip("`").removeprefix("bash").strip().splitlines()
    return [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def test_the_readme_runbook_runs_on_loopback(tmp_path, data_dir):
    """The README's multi-host runbook, command by command, on one machine: SUPERLINK is
    127.0.0.1, the folders are temporary, and (two SuperNodes sharing one machine) each
    SuperNode gets a free port for its local API. Long-running commands run in the
    background, as they would in their own terminals."""
    import subprocess

    from fedapp.launch import flower_env, free_port, wait_healthy

    full_cfg = compose("task=credit partition=iid partition.num_partitions=2")
    from tasks import get_task

    task = get_task(full_cfg, data_dir)
    folders = {k: tmp_path / k.lower() for k in ("CREDS", "OPERATOR", "BANK_A", "BANK_B")}
    for folder in folders.values():
        folder.mkdir()
    task.export_partitions([0], folders["BANK_A"] / "data.csv")
    task.export_partitions([1], folders["BANK_B"] / "data.csv")
    task.export_central_test(folders["OPERATOR"] / "test.csv")
    port = free_port()
    env = flower_env(tmp_path / "operator-home", data_dir=None)
    env.update({k: str(v) for k, v in folders.items()})
    env.update(SUPERLINK="127.0.0.1", PORT=str(port), APP=str(PROJECT_ROOT))
    (tmp_path / "operator-home").mkdir()
    background: list[subprocess.Popen] = []
    outputs = []
    try:
        for n, line in enumerate(_runbook()):
            cmd, run_env = line, dict(env)
            if line.startswith(("flower-superlink", "flower-supernode")):
                if line.startswith("flower-supernode"):
                    cmd += f" --port {free_port()}"
                    run_env["FLWR_HOME"] = str(tmp_path / f"node-home-{n}")
                with open(tmp_path / f"step-{n}.log", "wb") as log:
                    background.append(
                        subprocess.Popen(
                            ["bash", "-c", f"exec {cmd}"],
                            env=run_env,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
                if line.startswith("flower-superlink"):
                    ca = folders["CREDS"] / "ca.crt"
                    wait_healthy(
                        port, background[-1], ca_cert=ca, log_file=tmp_path / f"step-{n}.log"
                    )
                continue
            done = subprocess.run(
                ["bash", "-c", cmd], env=run_env, capture_output=True, text=True, timeout=900
            )
            assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
            outputs.append(done.stdout)
    finally:
        for p in background:
            stop_process_group(p)
    runs = json.loads(outputs[-1])["runs"]
    assert runs[-1]["status"].endswith("completed"), runs
    res = json.loads((folders["OPERATOR"] / "run" / "results.json").read_text())
    assert res["meta"]["status"] == "completed" and sorted(res["nodes"]) == ["0", "1"]
    assert res["rounds"][-1]["test_roc_auc"] > 0.65
