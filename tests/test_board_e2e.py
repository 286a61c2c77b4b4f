"""A refused node in the board's audit trail, from a real-process federation: a TLS SuperLink,
two registered SuperNodes, and a third whose SuperNode key the SuperLink admits but which
claims partition 0 signed with a key that is not the one registered for it (node_keys). The
ServerApp refuses it; the board shows the refusal and its reason (API and browser)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from fedapp.cli.federation import node_config_line, register_node, start_supernode, write_node_keys
from fedapp.cli.launch import run_status, stop_process_group, submit, superlink
from fedapp.core.config import PROJECT_ROOT
from fedapp.features import events as ev
from fedapp.features.tls import create_credentials
from tests.test_board_browser import CHROMIUM, DRIVER, Served, browser, shot, wait
from tests.test_deployment import CREDIT, _federation

pytestmark = pytest.mark.e2e


def test_a_node_with_an_unregistered_partition_key_is_in_the_audit_trail(tmp_path, data_dir):
    db = tmp_path / "events.db"
    url = ev.sqlite_url(db)
    creds = create_credentials(tmp_path / "creds", nodes=["node-0", "node-1", "stranger"])
    keys = write_node_keys(creds, 2)  # partition 0 and 1: node-0's and node-1's keys
    out, files, flwr_home, env, run_cfg = _federation(
        tmp_path,
        f"{CREDIT} partition.num_partitions=2 clients_per_round=2 rounds=2 node_keys={keys} events_db={url}",
        2,
    )
    procs = []
    try:
        with superlink(
            flwr_home, out / "superlink.log", env, simulation=False, credentials=creds
        ) as port:
            for name, part in (("node-0", 0), ("node-1", 1), ("stranger", 0)):
                register_node(env, creds.node_public_key(name))
                procs.append(
                    start_supernode(
                        port,
                        flwr_home / f"sn-{name}",
                        env,
                        out / f"sn-{name}.log",
                        node_config_line(part, 2, files[part], None, auth_key=creds.node_key(name)),
                        ca_cert=creds.ca_cert,
                        private_key=creds.node_key(name),
                    )
                )
            rc, run_id = submit(PROJECT_ROOT, run_cfg, env, None, 600, out / "flwr_run.log")
            assert run_status(env, run_id) == "completed", (out / "flwr_run.log").read_text()[
                -3000:
            ]
    finally:
        for p in procs:
            stop_process_group(p)
    res = json.loads((out / "results.json").read_text())
    assert len(res["meta"]["nodes_refused"]) == 1, res["meta"]["nodes_refused"]
    why = next(iter(res["meta"]["nodes_refused"].values()))
    c = TestClient(create_app_for(url))
    audit = c.get("/api/audit?kind=node_refused").json()
    assert audit["total"] == 1 and audit["items"][0]["reason"] == why
    assert "registered for partition-id 0" in why
    keys_event = c.get("/api/audit?kind=keys_registered").json()["items"][0]["reason"]
    assert "2 partition ids" in keys_event and "ssh-" not in keys_event  # never the keys
    runs = c.get("/api/runs").json()["items"]
    assert runs[0]["status"] == "completed" and runs[0]["launched_by"]
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("headless Chromium is not installed: the API part passed")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = browser()
    try:
        with Served(create_app_for(url)) as base:
            driver.get(base + "/audit")
            wait(
                lambda: "node_refused" in driver.find_element(By.CSS_SELECTOR, "table.audit").text,
                30,
                "the refusal",
            )
            Select(driver.find_element(By.ID, "audit-kind")).select_by_value("node_refused")
            wait(
                lambda: (
                    "keys_registered"
                    not in driver.find_element(By.CSS_SELECTOR, "table.audit").text
                ),
                30,
                "the filter",
            )
            assert (
                "does not verify against the key registered for partition-id 0"
                in driver.find_element(By.CSS_SELECTOR, "table.audit").text
            )
            shot(driver, "audit-refused")
    finally:
        driver.quit()


def create_app_for(url: str):
    from fedapp.cli.board.app import create_app

    return create_app(url)
