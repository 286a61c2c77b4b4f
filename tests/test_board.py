"""fedapp-board's API and its safety: read-only without the operator token, loopback unless
TLS and a token, no secret served, Host headers checked on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from fedapp.cli.board.app import MAX_LIMIT, create_app
from fedapp.cli.board.cli import BoardError, check_bind, main, read_token
from fedapp.features import events as ev
from tests.fedapp.test_events import _results

TOKEN = "a-long-operator-token-0123456789"


@pytest.fixture
def store(tmp_path):
    url = ev.sqlite_url(tmp_path / "b.db")
    run = tmp_path / "run"
    run.mkdir()
    (run / "best_model.pt").write_bytes(b"weights-1")
    s = ev.EventStore(url, run)
    secure = {"name": "ckks", "context_file": "/keys/ckks.ctx", "api_token": "xyz"}
    for r in range(0, 4):
        res = _results(r, 5)
        res["config"]["secure"] = secure
        s.record(res, best={"round": r, "test_accuracy": 0.1 * r})
    (run / "final_model.pt").write_bytes(b"weights-final")
    res = _results(4, 5)
    res["meta"]["status"] = "completed"
    res["final"] = {"best_round": 3}
    s.record(res, best={"round": 3, "test_accuracy": 0.3}, final=True)
    return url, run


def test_the_api_lists_runs_rounds_clients_ledgers_audit_and_versions(store):
    url, run = store
    c = TestClient(create_app(url))
    runs = c.get("/api/runs").json()
    assert runs["total"] == 1 and runs["items"][0]["status"] == "completed"
    rid = runs["items"][0]["id"]
    assert c.get("/api/runs?status=running").json()["total"] == 0
    assert c.get("/api/runs?strategy=trust&privacy=sample_dp").json()["total"] == 1
    one = c.get(f"/api/runs/{rid}").json()
    assert (
        one["rounds_done"] == 4 and one["counts"]["rejected"] == 1 and one["counts"]["clients"] == 5
    )
    rounds = c.get(f"/api/runs/{rid}/rounds?offset=1&limit=2").json()
    assert rounds["total"] == 5 and [r["round"] for r in rounds["items"]] == [1, 2]
    assert c.get(f"/api/runs/{rid}/rounds?limit=100000").json()["limit"] == MAX_LIMIT
    latest = c.get(f"/api/runs/{rid}/clients").json()
    assert latest["round"] == 4 and latest["total"] == 5
    assert (
        c.get(f"/api/runs/{rid}/clients?status=rejected")
        .json()["items"][0]["reason"]
        .startswith("update norm")
    )
    ledger = c.get(f"/api/runs/{rid}/ledger?limit=2").json()
    assert ledger["total"] == 5 and len(ledger["items"]) == 2
    assert ledger["items"][0]["target_epsilon"] == 2.0 and len(ledger["items"][0]["series"]) == 4
    audit = c.get("/api/audit?kind=update_rejected").json()
    assert audit["total"] == 1 and audit["items"][0]["partition_id"] == 1
    assert c.get("/api/audit?q=clipping").json()["total"] == 1
    versions = c.get(f"/api/runs/{rid}/versions").json()["items"]
    assert {v["kind"] for v in versions} == {"best", "final"}
    assert c.get("/api/runs/999").status_code == 404
    for page in (
        "/",
        f"/runs/{rid}",
        "/versions",
        "/audit",
        "/static/board.js",
        "/static/board.css",
    ):
        assert c.get(page).status_code == 200, page


def test_release_needs_the_operator_token(store):
    url, _ = store
    versions = TestClient(create_app(url)).get("/api/versions").json()["items"]
    final = next(v for v in versions if v["kind"] == "final")
    read_only = TestClient(create_app(url))
    r = read_only.post(f"/api/versions/{final['id']}/release", json={"by": "mallory"})
    assert r.status_code == 403 and "read-only" in r.json()["error"]
    board = TestClient(create_app(url, token=TOKEN))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        r = board.post(
            f"/api/versions/{final['id']}/release", json={"by": "mallory"}, headers=headers
        )
        assert r.status_code == 401, headers
    assert not board.get("/api/whoami").json()["operator"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert board.get("/api/whoami", headers=auth).json()["operator"]
    r = board.post(f"/api/versions/{final['id']}/release", json={"by": "alice"}, headers=auth)
    assert r.status_code == 200
    v = next(x for x in board.get("/api/versions").json()["items"] if x["id"] == final["id"])
    assert v["released_by"] == "alice" and v["released_unix"] > 0
    audit = board.get("/api/audit?kind=version_released").json()["items"]
    assert audit[0]["actor"] == "alice" and "mallory" not in str(board.get("/api/audit").json())
    assert board.post("/api/versions/9999/release", headers=auth).status_code == 404
    assert board.get(f"/api/versions/{final['id']}/release").status_code == 405


def test_no_secret_is_served(store):
    url, run = store
    (run / "node_keys.yaml").write_text("0: ssh-ed25519 AAAA")
    (run / "ckks.ctx").write_bytes(b"secret context")
    c = TestClient(create_app(url, token=TOKEN))
    rid = c.get("/api/runs").json()["items"][0]["id"]
    secure = c.get(f"/api/runs/{rid}").json()["config"]["secure"]
    assert secure["context_file"] == "(hidden)" and secure["api_token"] == "(hidden)"
    assert TOKEN not in c.get("/api/whoami").text
    for path in (
        "/static/../events.py",
        "/static/%2e%2e/app.py",
        "/static/..%2fcli.py",
        "/api/runs/1/../../node_keys.yaml",
    ):
        r = c.get(path)
        assert r.status_code == 404 and b"import" not in r.content, path
    versions = c.get("/api/versions").json()["items"]
    final = next(v for v in versions if v["kind"] == "final")
    r = c.get(f"/api/versions/{final['id']}/download")
    assert r.status_code == 200 and r.content == b"weights-final"
    # the best model's file changed since that version: its bytes are not passed off as it
    (run / "best_model.pt").write_bytes(b"weights-2")
    best = next(v for v in versions if v["kind"] == "best")
    assert c.get(f"/api/versions/{best['id']}/download").status_code == 410
    assert c.get("/api/versions/9999/download").status_code == 404


def test_on_loopback_a_foreign_host_header_is_refused(store):
    """The Host headers fedapp-board accepts on a loopback bind (cli.loopback_hosts), IPv6
    and 127.0.0.x binds included; a foreign name (DNS rebinding) is refused."""
    from fedapp.cli.board.cli import loopback_hosts

    url, _ = store
    for bind, good in (
        ("127.0.0.1", ["127.0.0.1:8050", "localhost:8050", "localhost", "[::1]:8050"]),
        ("::1", ["[::1]:8050", "[::1]"]),
        ("127.0.0.2", ["127.0.0.2:8050"]),
    ):
        c = TestClient(create_app(url, allowed_hosts=loopback_hosts(bind)))
        for host in good:
            assert c.get("/api/runs", headers={"Host": host}).status_code == 200, (bind, host)
        for host in ("evil.example", "evil.example:8050", "[::2]:8050", "127.0.0.1.evil.example"):
            assert c.get("/api/runs", headers={"Host": host}).status_code == 400, (bind, host)


def test_a_non_loopback_bind_needs_tls_and_a_token(tmp_path, monkeypatch):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    check_bind("127.0.0.1", None, None, None)  # loopback: fine without either
    check_bind("::1", None, None, None)
    with pytest.raises(
        BoardError, match="not a loopback address: serving the board beyond this machine needs TLS"
    ):
        check_bind("0.0.0.0", None, None, TOKEN)
    with pytest.raises(BoardError, match="set an operator token"):
        check_bind("10.0.0.5", str(cert), str(key), None)
    check_bind("10.0.0.5", str(cert), str(key), TOKEN)
    with pytest.raises(BoardError, match="go together"):
        check_bind("127.0.0.1", str(cert), None, None)
    monkeypatch.setenv("FEDAPP_BOARD_TOKEN", "short")
    with pytest.raises(BoardError, match="at least 16"):
        read_token(None)
    # the command itself exits with the reason, before binding anything
    monkeypatch.delenv("FEDAPP_BOARD_TOKEN")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedapp.cli.board.cli",
            "--host",
            "0.0.0.0",
            "--db",
            ev.sqlite_url(tmp_path / "x.db"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "needs TLS" in proc.stderr
    with pytest.raises(BoardError, match="not a folder"):
        main(["import", str(tmp_path / "nowhere")])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_board_serves_https_with_the_deployment_s_certificates(store, tmp_path):
    """fedapp-certs' SuperLink certificate (issued for 127.0.0.1) serves the board over TLS;
    a client trusting the deployment's CA reads it, the token releases, plain HTTP does not."""
    from fedapp.features.tls import create_credentials

    url, _ = store
    creds = create_credentials(tmp_path / "creds", hosts=["127.0.0.1"])
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedapp.cli.board.cli",
            "--db",
            url,
            "--root",
            str(tmp_path / "none"),
            "--port",
            str(port),
            "--certfile",
            str(creds.superlink_cert),
            "--keyfile",
            str(creds.superlink_key),
            "--token-file",
            str(token_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"https://127.0.0.1:{port}"
        for _ in range(200):
            try:
                r = httpx.get(f"{base}/api/runs", verify=str(creds.ca_cert), timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.fail("the board did not start")
        assert r.status_code == 200 and r.json()["total"] == 1
        vid = httpx.get(f"{base}/api/versions", verify=str(creds.ca_cert)).json()["items"][0]["id"]
        ok = httpx.post(
            f"{base}/api/versions/{vid}/release",
            json={"by": "ops"},
            headers={"Authorization": f"Bearer {TOKEN}"},
            verify=str(creds.ca_cert),
        )
        assert ok.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/api/runs", timeout=2)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_runs_under_the_root_not_yet_in_the_database_are_shown(tmp_path):
    """A run folder given an explicit output dir below the root, written without the store."""
    root = tmp_path / "outputs"
    run = root / "team-a" / "my-run"
    run.mkdir(parents=True)
    import json

    res = _results(2, 3)
    res["meta"]["status"] = "completed"
    (run / "results.json").write_text(json.dumps(res))
    url = ev.sqlite_url(tmp_path / "board.db")
    c = TestClient(create_app(url, root=root))
    items = c.get("/api/runs").json()["items"]
    assert [i["name"] for i in items] == ["my-run"] and items[0]["source"] == "import"
    assert c.get(f"/api/runs/{items[0]['id']}/rounds").json()["total"] == 3
    assert Path(items[0]["output_dir"]) == run.resolve()


def test_a_sweep_s_jobs_are_one_group_and_other_runs_none(tmp_path):
    """Hydra multirun folders (multirun.yaml beside the jobs): every job names its sweep, so
    the runs page shows them side by side; a run outside a sweep names none."""
    import json

    root = tmp_path / "outputs"
    sweep = root / "multirun" / "2026-12-03" / "07-00-00"
    jobs = [sweep / "0", sweep / "1"]
    alone = root / "single-run"
    for i, run in enumerate([*jobs, alone]):
        run.mkdir(parents=True)
        res = _results(2, 3)
        res["meta"]["status"] = "completed"
        res["config"]["seed"] = i
        (run / "results.json").write_text(json.dumps(res))
    (sweep / "multirun.yaml").write_text("hydra: {mode: MULTIRUN}\n")
    c = TestClient(create_app(ev.sqlite_url(tmp_path / "board.db"), root=root))
    items = {i["name"]: i for i in c.get("/api/runs").json()["items"]}
    assert set(items) == {"0", "1", "single-run"}
    assert items["0"]["sweep"] == items["1"]["sweep"] == str(sweep.resolve())
    assert items["single-run"]["sweep"] is None


def test_tokens_on_the_command_line_and_passwords_in_urls_are_never_stored_or_served(
    tmp_path, monkeypatch
):
    """Flower starts a ServerApp process with its AppIo token on the command line; a config
    may hold a database URL with a password. Neither reaches the store or a reader."""
    monkeypatch.setattr(
        "sys.argv",
        [
            "flwr-simulation",
            "--runtime-api-address",
            "127.0.0.1:9094",
            "--token",
            "SECRET-APPIO-TOKEN",
            "--api-key=SECRET-KEY",
            "tracking.tracking_uri=https://u:SECRET-TOK@mlflow.example",
        ],
    )
    url = ev.sqlite_url(tmp_path / "b.db")
    run = tmp_path / "run"
    run.mkdir()
    res = _results(1, 2)
    res["config"]["events_db"] = "postgresql://fedapp:SECRET-PW@db/fedapp"
    ev.EventStore(url, run).record(res, best=None)
    stored = (tmp_path / "b.db").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("b.db-*")
    )
    assert b"SECRET" not in stored
    c = TestClient(create_app(url))
    listed = c.get("/api/runs").text
    one = c.get(f"/api/runs/{c.get('/api/runs').json()['items'][0]['id']}").text
    assert "SECRET" not in listed + one and "--token (hidden)" in listed
    assert "postgresql://***@db/fedapp" in one
    assert ev.safe_command(["x", "--token", "T0"]) == "x --token (hidden)"


def test_hostile_requests_and_files_get_an_answer_never_a_500(tmp_path):
    import json

    root = tmp_path / "outputs"
    for name, text in (("list", "[1]"), ("null", "null"), ("meta", '{"meta": 3}')):
        (root / name).mkdir(parents=True)
        (root / name / "results.json").write_text(text)
    good = root / "good"
    good.mkdir()
    res = _results(1, 2)
    res["meta"]["status"] = "completed"
    (good / "results.json").write_text(json.dumps(res))
    c = TestClient(create_app(ev.sqlite_url(tmp_path / "b.db"), root=root, token=TOKEN))
    assert [i["name"] for i in c.get("/api/runs").json()["items"]] == ["good"]
    assert c.get("/").status_code == 200
    huge = "99999999999999999999"
    for path in (
        f"/api/runs?offset={huge}",
        f"/api/runs/{huge}",
        f"/api/runs/1/rounds?offset={huge}",
    ):
        assert c.get(path).status_code in (400, 404, 422), path
    auth = {"Authorization": f"Bearer {TOKEN}"}
    vid = 1
    r = c.post(f"/api/versions/{vid}/release", content="[1, 2]", headers=auth)
    assert r.status_code in (200, 404)
