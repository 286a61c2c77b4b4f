"""The attack harness end to end, through the in-process engine (same ServerApp, strategies and
ClientApp as a Flower simulation; equality with one is tested in test_e2e.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedapp.cli.inline import run_inline

MEDICAL = "task=medical rounds=2 clients_per_round=4 eval_clients_per_round=4 checkpoint=false"


def _run(tmp_path, extra: str) -> dict:
    out = run_inline(f"{MEDICAL} {extra}", tmp_path / extra.replace(" ", "_").replace("=", "-"))
    return json.loads((out / "results.json").read_text())


def _train(round_: dict) -> dict[int, dict]:
    return {c["partition_id"]: c for c in round_["clients"] if c["phase"] == "train"}


@pytest.mark.parametrize("mode", ["exception", "nan"])
def test_crashing_clients_are_reported_and_the_run_goes_on(tmp_path, data_dir, mode):
    res = _run(tmp_path, f"attack=crash attack.fraction=0.5 attack.mode={mode}")
    attackers = res["meta"]["attackers"]
    assert len(attackers) == 2
    for r in res["rounds"][1:]:
        assert r["num_replies"] == 2 and r["num_failures"] == 2 and r["aggregated"]
        assert r["attacker_weight"] == 0.0
        for p in attackers:
            status = _train(r)[p]["status"]
            assert ("InjectedCrash" in status) if mode == "exception" else ("non-finite" in status)
    assert res["final"]["rounds_completed"] == 2


CREDIT = (
    "task=credit partition=iid partition.num_partitions=8 rounds=3 clients_per_round=8 "
    "eval_clients_per_round=0 checkpoint=false attack=scaled attack.fraction=0.25 attack.scale=-10"
)


def test_fedavg_gives_attackers_their_share_and_trust_takes_it_away(tmp_path, data_dir):
    fedavg = json.loads(
        (run_inline(f"{CREDIT} strategy=fedavg", tmp_path / "a") / "results.json").read_text()
    )
    attackers = fedavg["meta"]["attackers"]
    assert len(attackers) == 2
    r1 = _train(fedavg["rounds"][1])
    share = sum(r1[p]["num-examples"] for p in attackers) / sum(
        c["num-examples"] for c in r1.values()
    )
    assert fedavg["rounds"][1]["attacker_weight"] == pytest.approx(share)
    trust = json.loads(
        (run_inline(f"{CREDIT} strategy=trust", tmp_path / "b") / "results.json").read_text()
    )
    for r in trust["rounds"][1:]:
        assert r["attacker_weight"] < 0.01
        assert all(_train(r)[p]["trust_cosine"] < 0 for p in attackers)
    assert trust["rounds"][-1]["test_roc_auc"] > fedavg["rounds"][-1]["test_roc_auc"] + 0.05
    # same seed, same config: the same run, number for number
    again = json.loads(
        (run_inline(f"{CREDIT} strategy=trust", tmp_path / "c") / "results.json").read_text()
    )

    def strip(r):
        volatile = (
            "wall_s",
            "elapsed_s",
            "sim_time_s",
            "aggregate_s",
            "server_eval_s",
            "clients",
        )  # wall-clock numbers
        return {k: v for k, v in r.items() if k not in volatile}

    assert [strip(r) for r in again["rounds"]] == [strip(r) for r in trust["rounds"]]

    def clients(res):
        return [
            [
                {k: v for k, v in c.items() if k not in ("train_time_s", "eval_time_s")}
                for c in r["clients"]
            ]
            for r in res["rounds"]
        ]

    assert clients(again) == clients(trust)


def test_free_riders_and_gaussian_updates_report_plausible_losses(tmp_path, data_dir):
    for attack in ("free_rider attack.mode=unchanged", "gaussian attack.std=0.5"):
        res = _run(tmp_path, f"strategy=fedmedian attack={attack} attack.fraction=0.25")
        (attacker,) = res["meta"]["attackers"]
        entry = _train(res["rounds"][1])[attacker]
        assert entry["status"] == "ok" and entry["train_loss"] > 0 and entry["train_steps"] > 0
        assert "weight" in entry  # robust aggregators report effective shares under attack


def test_crashers_train_honestly_in_rounds_they_do_not_crash(tmp_path, data_dir):
    res = _run(
        tmp_path,
        "rounds=4 attack=crash attack.fraction=0.5 attack.mode=exception attack.probability=0.5",
    )
    attackers = res["meta"]["attackers"]
    statuses = [_train(r)[p]["status"] for r in res["rounds"][1:] for p in attackers]
    assert "ok" in statuses and any("InjectedCrash" in s for s in statuses)
    for r in res["rounds"][1:]:
        for p in attackers:
            entry = _train(r)[p]
            if entry["status"] == "ok":  # it trained: real time spent, not a made-up reply
                assert entry["train_time_s"] > 0


def test_two_runs_in_one_process_see_the_same_test_set(tmp_path, data_dir):
    """The task object is cached and shared between runs in a process; carving the server's
    validation rows must not shrink the test set for the next run."""
    sizes = []
    for i in range(2):
        out = run_inline(f"{MEDICAL} rounds=1 server_val_fraction=0.1", tmp_path / f"run{i}")
        res = json.loads((out / "results.json").read_text())
        sizes.append((res["meta"]["server_val_rows"], sum(res["rounds"][-1]["test_confusion"])))
    assert sizes[0] == sizes[1] == (18, 184 - 18)


def test_a_raising_client_leaves_its_node_state_as_it_was():
    """As in Flower: the Context.state of a node whose ClientApp raised is not updated."""
    from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict

    from fedapp.cli.inline import InlineGrid

    def client(msg, context):
        context.state.array_records["x"] = ArrayRecord([])
        if msg.content.config_records["config"]["fail"]:
            raise RuntimeError("boom")
        return Message(RecordDict(), reply_to=msg)

    from flwr.app import ConfigRecord

    context = Context(1, 5, {}, RecordDict(), {})
    grid = InlineGrid(client, {5: context})

    def send(fail: bool):
        msg = Message(
            RecordDict({"config": ConfigRecord({"fail": fail})}),
            dst_node_id=5,
            message_type=MessageType.TRAIN,
        )
        return list(grid.send_and_receive([msg]))[0]

    assert send(True).has_error() and "x" not in context.state.array_records
    assert not send(False).has_error() and "x" in context.state.array_records


def _inline_main(out: Path, overrides: str) -> tuple[int, dict]:
    """fedapp-inline's exit code and results.json for a medical run with `overrides`."""
    from fedapp.cli.inline import main

    code = main([*f"{MEDICAL} {overrides}".split(), "--output-dir", str(out)])
    return code, json.loads((out / "results.json").read_text())


def test_a_federation_that_learns_nothing_fails_with_a_nonzero_exit(tmp_path, data_dir):
    code, res = _inline_main(tmp_path / "nan", "attack=crash attack.mode=nan attack.fraction=1.0")
    assert code == 1 and res["meta"]["status"] == "failed"
    assert "no round aggregated" in res["meta"]["status_detail"]["reason"]


def test_rounds_below_quorum_make_a_degraded_run(tmp_path, data_dir):
    code, res = _inline_main(
        tmp_path / "deg", "attack=crash attack.mode=exception attack.fraction=0.75 quorum=0.5"
    )
    assert code == 0 and res["meta"]["status"] == "degraded"
    assert res["meta"]["status_detail"]["rounds_below_quorum"] == [1, 2]


def test_run_status_rules():
    from fedapp.recorder import run_status

    def rnd(i, aggregated=True, success=True, loss=0.5):
        return {
            "round": i,
            "aggregated": aggregated,
            "aggregation_success": success,
            "test_loss": loss,
        }

    assert run_status([rnd(0), rnd(1), rnd(2)], 2, None, None) == ("completed", {})
    assert run_status([rnd(0), rnd(1), rnd(2, loss=float("nan"))], 2, None, None)[0] == "failed"
    assert run_status([rnd(0), rnd(1, False, False)], 1, None, None)[0] == "failed"
    assert run_status([rnd(0), rnd(1)], 1, "RuntimeError: x", None)[0] == "failed"
    status, detail = run_status([rnd(0), rnd(1), rnd(2, True, False)], 2, None, None)
    assert status == "degraded" and detail == {"rounds_below_quorum": [2]}
    assert run_status([rnd(0), rnd(1)], 3, None, None) == ("degraded", {"rounds_missing": 2})
    assert run_status([rnd(0), rnd(1)], 3, None, "budget")[0] == "completed"
