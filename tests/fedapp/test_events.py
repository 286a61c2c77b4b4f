"""The event store (fedapp/features/events.py): written by the recorder as a run goes, imported from
run folders, never able to stop a run, safe to read while a run writes."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from fedapp.cli.inline import run_inline
from fedapp.features import events as ev

RUN = "task=credit partition=iid partition.num_partitions=4 rounds=3 clients_per_round=4 eval_clients_per_round=2"


def _counts(url: str, run_dir: Path) -> dict[str, int]:
    eng = ev.engine_for(url)
    with eng.connect() as conn:
        rid = conn.execute(
            select(ev.runs.c.id).where(ev.runs.c.output_dir == str(run_dir.resolve()))
        ).scalar()
        assert rid is not None, f"{run_dir} not in {url}"
        return {
            t.name: ev.count(conn, t, t.c.run_id == rid)
            for t in (ev.rounds, ev.client_rounds, ev.model_versions, ev.audit_events)
        } | {"run_id": rid}


def _strip_times(res: dict) -> list[dict]:
    timing = {"wall_s", "elapsed_s", "sim_time_s", "aggregate_s", "server_eval_s"}
    out = []
    for r in res["rounds"]:
        row = {k: v for k, v in r.items() if k not in timing and k != "clients"}
        row["clients"] = [
            {k: v for k, v in c.items() if not k.endswith("_time_s")} for c in r["clients"]
        ]
        out.append(row)
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same run with the event store and without it (events_db=off)."""
    root = tmp_path_factory.mktemp("events")
    url = ev.sqlite_url(root / "store.db")
    on = run_inline(f"{RUN} events_db={url}", root / "on")
    off = run_inline(f"{RUN} events_db=off", root / "off")
    return url, on, off


def test_a_run_writes_every_round_client_and_version_as_it_goes(two_runs, data_dir):
    url, on, _ = two_runs
    res = json.loads((on / "results.json").read_text())
    n = _counts(url, on)
    assert n["rounds"] == len(res["rounds"]) == 4  # round 0 and three rounds
    assert n["client_rounds"] == sum(len(r["clients"]) for r in res["rounds"])
    with ev.engine_for(url).connect() as conn:
        run = conn.execute(select(ev.runs).where(ev.runs.c.id == n["run_id"])).one()
        assert run.status == "completed" and run.rounds_done == 3 and run.rounds_total == 3
        assert run.task == "credit" and run.strategy == "fedavg" and run.privacy == "none"
        assert run.config_hash == ev.config_hash(res["config"]) and run.code_version
        assert run.launched_by and run.launched_on and run.source == "live"
        final = conn.execute(
            select(ev.model_versions).where(
                ev.model_versions.c.run_id == n["run_id"], ev.model_versions.c.kind == "final"
            )
        ).one()
        assert final.sha256 == ev.sha256_file(on / "final_model.pt") and final.round == 3
        assert final.parent_id is not None  # the best model before it
        client = conn.execute(
            select(ev.client_rounds).where(
                ev.client_rounds.c.run_id == n["run_id"],
                ev.client_rounds.c.round == 1,
                ev.client_rounds.c.phase == "train",
            )
        ).all()
        assert len(client) == 4 and all(c.status == "ok" and c.weight > 0 for c in client)


def test_the_store_leaves_the_results_as_they_were(two_runs, data_dir):
    _, on, off = two_runs
    a, b = (json.loads((d / "results.json").read_text()) for d in (on, off))
    assert _strip_times(a) == _strip_times(b)
    assert ev.sha256_file(on / "final_model.pt") == ev.sha256_file(off / "final_model.pt")
    assert (on / "rounds.csv").read_text().count("\n") == (off / "rounds.csv").read_text().count(
        "\n"
    )
    assert not (off.parent / "fedapp.db").exists()  # events_db=off writes nothing


def test_importing_a_folder_gives_the_rows_a_live_run_wrote(two_runs, tmp_path, data_dir):
    url, on, off = two_runs
    fresh = ev.sqlite_url(tmp_path / "imported.db")
    assert ev.import_dir(fresh, off.parent) == (2, 0)
    assert ev.import_dir(fresh, off.parent) == (0, 2)  # up to date: nothing twice
    live, imported = _counts(url, on), _counts(fresh, off)
    for key in ("rounds", "client_rounds"):
        assert live[key] == imported[key]
    with ev.engine_for(fresh).connect() as conn:
        kinds = set(
            conn.execute(
                select(ev.model_versions.c.kind).where(
                    ev.model_versions.c.run_id == imported["run_id"]
                )
            ).scalars()
        )
        assert kinds == {"best", "final"}


def test_a_store_that_cannot_be_opened_or_written_never_stops_the_run(
    tmp_path, data_dir, monkeypatch, caplog
):
    caplog.set_level(logging.WARNING, logger="fedapp.events")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = run_inline(f"{RUN} rounds=1 events_db=sqlite:///{blocker}/sub/x.db", tmp_path / "a")
    assert json.loads((out / "results.json").read_text())["meta"]["status"] == "completed"
    assert "event store not opened" in caplog.text

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ev.EventStore, "_record", broken)
    out = run_inline(f"{RUN} rounds=1", tmp_path / "b")
    assert json.loads((out / "results.json").read_text())["meta"]["status"] == "completed"
    assert "write failed (disk full); the run goes on" in caplog.text


def _results(rounds: int, clients: int = 3, **meta) -> dict:
    rows = []
    for r in range(rounds + 1):
        cl = []
        for p in range(clients if r else 0):
            status = "ok"
            if p == 1 and r == 1:
                status = "rejected: update norm 1e9 above the clipping bound"
            if p == 2 and r == 2:
                status = (
                    "error: PrivacyBudgetExhausted: another round would take privacy epsilon over 2"
                )
            if p == 2 and r == 1:
                status = "error: REFUSED by the institution's policy: requires secure=ckks"
            cl.append(
                {
                    "phase": "train",
                    "partition_id": p,
                    "node_id": 10 + p,
                    "status": status,
                    "num-examples": 5,
                    "weight": 1 / clients,
                    "dp_epsilon": 0.1 * r,
                    "dp_target_epsilon": 2.0,
                }
            )
        rows.append(
            {
                "round": r,
                "test_accuracy": 0.1 * r,
                "test_loss": 1.0,
                "wall_s": 0.5,
                "elapsed_s": 0.5 * r,
                "num_replies": clients,
                "num_failures": 0,
                "clients": cl,
            }
        )
    return {
        "meta": {"status": "running", "run_id": 7, "num_clients": clients, **meta},
        "config": {
            "task": {"name": "credit"},
            "strategy": {"name": "trust"},
            "privacy": {"name": "sample_dp"},
            "rounds": 10,
        },
        "rounds": rows,
        "final": None,
    }


def test_audit_events_name_what_was_refused_rejected_or_exhausted(tmp_path):
    url = ev.sqlite_url(tmp_path / "a.db")
    store = ev.EventStore(url, tmp_path / "run")
    store.record(
        _results(
            1,
            nodes_refused={
                "99": "its signature does not verify against the key registered for partition-id 0"
            },
        )
    )
    store.record(
        _results(
            2,
            nodes_refused={"99": "same", "98": "partition-id 5 has no registered key in node_keys"},
            resumed=[{"after_round": 1, "at": "now"}],
        )
    )
    assert not store.failed
    with ev.engine_for(url).connect() as conn:
        rows = conn.execute(
            select(
                ev.audit_events.c.kind,
                ev.audit_events.c.node_id,
                ev.audit_events.c.partition_id,
                ev.audit_events.c.reason,
            )
        ).all()
    kinds = [r.kind for r in rows]
    assert kinds.count("node_refused") == 2  # node 99 once, though reported twice
    assert {"update_rejected", "policy_refusal", "budget_exhausted", "resume"} <= set(kinds)
    rejected = next(r for r in rows if r.kind == "update_rejected")
    assert rejected.partition_id == 1 and "clipping bound" in rejected.reason
    # a client's own account of an error is stored as such (a server's check is not)
    refusal = next(r for r in rows if r.kind == "policy_refusal")
    assert refusal.reason.startswith("client reports: ") and not rejected.reason.startswith(
        "client"
    )
    with ev.engine_for(url).connect() as conn:
        assert ev.count(conn, ev.rounds) == 3  # rounds 0..2, each once


def test_the_board_reads_while_a_run_writes(tmp_path):
    """A writer thread records 60 rounds of 200 clients while readers query the API: every read
    succeeds and the round count never goes back."""
    from fastapi.testclient import TestClient

    from fedapp.cli.board.app import create_app

    url = ev.sqlite_url(tmp_path / "rw.db")
    store = ev.EventStore(url, tmp_path / "run")
    store.record(_results(0, 200))
    client = TestClient(create_app(url))
    done = threading.Event()
    errors: list[BaseException] = []

    def write():
        try:
            for r in range(1, 61):
                store.record(_results(r, 200))
        except BaseException as exc:  # pragma: no cover - shown by the assert below
            errors.append(exc)
        finally:
            done.set()

    seen = []
    t = threading.Thread(target=write)
    t.start()
    while not done.is_set():
        data = client.get("/api/runs").json()["items"][0]
        seen.append(data["rounds_done"])
        assert client.get(f"/api/runs/{data['id']}/clients?limit=50").status_code == 200
        time.sleep(0.01)
    t.join()
    assert not errors and not store.failed
    assert seen == sorted(seen) and len(set(seen)) > 2  # it saw the run advance
    assert client.get("/api/runs").json()["items"][0]["rounds_done"] == 60
    with ev.engine_for(url).connect() as conn:
        assert conn.execute(select(func.count()).select_from(ev.client_rounds)).scalar() == 60 * 200


def test_reopening_a_run_records_no_second_join_and_goes_on_counting(tmp_path):
    """A resumed run (or a re-import) opens its existing row: its nodes are not 'joined'
    again, and what happens after the reopening is recorded."""
    url = ev.sqlite_url(tmp_path / "e.db")
    run = tmp_path / "run"
    run.mkdir()
    res = _results(1, 2)
    res["nodes"] = {str(p): {"node_id": 10 + p, "failures": 0, "rejoins": 0} for p in range(2)}
    ev.EventStore(url, run).record(res, best=None)
    res = _results(2, 2)
    res["nodes"] = {str(p): {"node_id": 10 + p, "failures": 0, "rejoins": 0} for p in range(2)}
    again = ev.EventStore(url, run)  # the resumed process
    again.record(res, best=None)
    res["nodes"]["1"]["failures"] = 1
    again.record(res, best=None)
    with ev.engine_for(url).connect() as conn:
        kinds = conn.execute(select(ev.node_events.c.partition_id, ev.node_events.c.kind)).all()
    assert sorted(kinds) == [(0, "joined"), (1, "failed"), (1, "joined")]
