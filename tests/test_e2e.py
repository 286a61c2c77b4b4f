"""End-to-end: real Flower runs (SuperLink + simulation, local federation, Hydra sweep) at small size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedapp.cli.inline import run_inline
from fedapp.cli.launch import run_simulation

pytestmark = pytest.mark.e2e

SMALL = (
    "partition=iid partition.num_partitions=4 rounds=3 clients_per_round=4 eval_clients_per_round=4 "
    "train.max_steps=25 train.batch_size=32 train.lr=0.1"
)


def _results(outcome):
    assert outcome.ok, (
        f"run ended with status {outcome.status}; see {outcome.output_dir}/flwr_run.log"
    )
    return json.loads((outcome.output_dir / "results.json").read_text())


def _run(engine: str, overrides: str, out: Path) -> tuple[Path, dict]:
    """(output folder, results.json) of a run through Flower's simulation engine ("flower")
    or the in-process engine ("inline": the same ServerApp and ClientApp without Ray, which
    the next-but-one test shows gives the same models; used where the Flower path is already
    covered, to keep the suite's time down)."""
    if engine == "flower":
        outcome = run_simulation(overrides, out)
        return outcome.output_dir, _results(outcome)
    folder = run_inline(overrides, out)
    return folder, json.loads((folder / "results.json").read_text())


# FedProx runs end to end in the sweep test below (with FedAvg); its client term is unit-tested.
@pytest.mark.parametrize(("strategy", "engine"), [("fedavg", "flower"), ("qfedavg", "inline")])
def test_simulation_learns_and_writes_the_results_contract(strategy, engine, tmp_path, data_dir):
    output_dir, res = _run(engine, f"{SMALL} strategy={strategy}", tmp_path / strategy)
    rounds = res["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    for key in (
        "test_accuracy",
        "test_loss",
        "client_accuracy",
        "train_loss",
        "num_replies",
        "bytes_up",
        "bytes_down",
        "wall_s",
    ):
        assert key in rounds[-1], key
    assert rounds[-1]["num_replies"] == 4
    assert res["config"]["strategy"]["name"] == strategy
    assert res["final"]["rounds_completed"] == 3
    # 4 clients x 25 steps x 3 rounds on real FEMNIST: far above the ~1/62 of the untrained model
    assert rounds[-1]["test_accuracy"] > rounds[0]["test_accuracy"] + 0.1
    # the model goes down to 4 training and 4 evaluating clients; 4 updates come back up
    assert rounds[1]["bytes_down"] == 8 * res["meta"]["model_bytes"]
    assert rounds[1]["bytes_up"] == 4 * res["meta"]["model_bytes"]
    for name in (
        "rounds.csv",
        "clients.csv",
        "accuracy.png",
        "loss.png",
        "config.yaml",
        "best_model.pt",
        "final_model.pt",
    ):
        assert (output_dir / name).exists(), name


def test_inline_engine_reproduces_the_flower_simulation(tmp_path, data_dir):
    """fedapp.cli.inline (one process, no Ray) gives the same models as a real Flower simulation,
    here with the trust strategy and stale free riders, whose state lives in Context.state.
    This is also the same-seed-same-run test of the Flower path: the inline engine is
    deterministic (tests/test_inline.py), so a non-deterministic simulation would fail here."""
    import torch

    overrides = f"{SMALL} strategy=trust attack=free_rider attack.mode=stale attack.fraction=0.25"
    flower = _results(run_simulation(overrides, tmp_path / "flower"))
    inline_dir = run_inline(overrides, tmp_path / "inline")
    inline = json.loads((inline_dir / "results.json").read_text())
    attackers = flower["meta"]["attackers"]
    assert attackers == inline["meta"]["attackers"] and len(attackers) == 1
    for rf, ri in zip(flower["rounds"], inline["rounds"], strict=True):
        assert rf["test_accuracy"] == ri["test_accuracy"]
        assert rf["attacker_weight"] == ri["attacker_weight"]
        trust = lambda r: {c["partition_id"]: c.get("trust") for c in r["clients"]}  # noqa: E731
        assert trust(rf) == trust(ri)
    # the stale free riders' Context.state carried a previous global model into rounds 2 and 3
    for r in flower["rounds"][2:]:
        (rider,) = [
            c for c in r["clients"] if c["partition_id"] in attackers and c["phase"] == "train"
        ]
        assert rider["trust_cosine"] < 0  # it sent last round's model: a step backwards
        assert r["attacker_weight"] < 0.01
    a = torch.load(tmp_path / "flower" / "final_model.pt")
    b = torch.load(inline_dir / "final_model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_flwr_run_on_flowers_default_supernodes_gives_the_same_models(tmp_path, data_dir):
    """`flwr run .` as a Flower user types it, with no federation config: Flower's local
    simulation then has 2 SuperNodes for 6 clients. The server spreads the clients over them
    (virtual clients, each with its own state: SCAFFOLD's control variates here), and the
    run gives the same models as the in-process engine with one node per client."""
    import torch

    from fedapp.cli.launch import prepare_run, run_status, submit, superlink
    from fedapp.core.config import PROJECT_ROOT, compose, parse_overrides, resolve_data_dir

    overrides = (
        "task=credit partition=iid partition.num_partitions=6 rounds=3 clients_per_round=4 "
        "eval_clients_per_round=3 strategy=scaffold"
    )
    ovr = parse_overrides(overrides)
    cfg = compose(ovr)
    out = tmp_path / "flwr"
    out.mkdir()
    flwr_home, env, run_cfg = prepare_run(cfg, ovr, resolve_data_dir(cfg), out)
    with superlink(flwr_home, out / "superlink.log", env):
        rc, run_id = submit(PROJECT_ROOT, run_cfg, env, None, 900, out / "flwr_run.log")
        assert run_status(env, run_id) == "completed", (out / "flwr_run.log").read_text()[-3000:]
    flower = json.loads((out / "results.json").read_text())
    nodes = flower["nodes"]
    assert sorted(map(int, nodes)) == list(range(6))
    assert len({n["node_id"] for n in nodes.values()}) == 2  # Flower's default
    assert all(n["virtual"] and n["failures"] == 0 for n in nodes.values())
    assert len(list((out / "client_state").glob("client-*/r*.state"))) >= 6
    inline_dir = run_inline(overrides, tmp_path / "inline")
    inline = json.loads((inline_dir / "results.json").read_text())
    assert not any(n["virtual"] for n in inline["nodes"].values())
    for rf, ri in zip(flower["rounds"], inline["rounds"], strict=True):
        assert rf["test_loss"] == ri["test_loss"]
        assert sorted(c["partition_id"] for c in rf["clients"]) == sorted(
            c["partition_id"] for c in ri["clients"]
        )
    a = torch.load(out / "final_model.pt")
    b = torch.load(inline_dir / "final_model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_event_driven_strategy_runs_on_flowers_grid(tmp_path, data_dir):
    """The tiered scheduler pushes and pulls through Flower's simulation Grid (as FedAsync does,
    through the same ClockGrid calls); on the virtual clock its schedule (who trains when, with
    how many steps) and its models are the same as in the inline engine, however Ray
    interleaves the clients."""
    strategy = "tiered"

    overrides = (
        "task=credit partition=iid partition.num_partitions=6 rounds=3 clients_per_round=3 "
        f"eval_clients_per_round=0 train.local_epochs=1 hetero=both strategy={strategy}"
    )
    flower = _results(run_simulation(overrides, tmp_path / "flower"))
    inline = json.loads((run_inline(overrides, tmp_path / "inline") / "results.json").read_text())
    for rf, ri in zip(flower["rounds"], inline["rounds"], strict=True):
        assert rf["sim_time_s"] == pytest.approx(ri["sim_time_s"])
        assert rf["test_loss"] == pytest.approx(ri["test_loss"], rel=1e-6)
        assert rf["aggregation_success"] == ri["aggregation_success"]


def test_bad_override_fails_before_starting_flower(tmp_path):
    from fedapp.core.config import ConfigError

    with pytest.raises(ConfigError):
        run_simulation("strategy=does_not_exist", tmp_path / "x")


def test_local_federation_with_supernodes(tmp_path, data_dir):
    from fedapp.cli.federation import run_federation

    out = run_federation(
        3,
        "partition=iid partition.num_partitions=6 rounds=1 train.max_steps=30 train.lr=0.1",
        tmp_path / "fed",
    )
    res = _results(out)
    assert res["meta"]["num_clients"] == 3
    last = res["rounds"][-1]
    assert last["num_replies"] == 3 and last["client_accuracy"] is not None  # train and evaluate
    assert last["test_accuracy"] > res["rounds"][0]["test_accuracy"] + 0.02
    # each SuperNode trained on its own file only
    assert sorted(p.name for p in (out.output_dir / "nodes").iterdir()) == [
        "node-0",
        "node-1",
        "node-2",
    ]


def test_encrypted_local_federation_keeps_the_secret_key_off_the_server(tmp_path, data_dir):
    from fedapp.cli.federation import run_federation

    out = run_federation(
        3,
        "task=credit partition=iid partition.num_partitions=3 rounds=1 secure=ckks",
        tmp_path / "fed",
    )
    res = _results(out)
    assert res["meta"]["status"] == "completed"
    server_keys = out.output_dir / "server_keys"
    assert [p.name for p in server_keys.iterdir()] == ["public.ckks"]
    assert res["config"]["secure"]["key_dir"] == str(server_keys)
    assert res["meta"]["secure"]["evaluation"].startswith("no evaluator key")
    # the secret key is the institutions' (the client side's key folder), never in the output
    assert not list(out.output_dir.rglob("secret.ckks"))
    assert res["meta"]["secure"]["clients_refused"] == {}
    assert res["meta"]["secure"]["evaluator"].startswith("none: in deployment")
    last = res["rounds"][-1]
    assert last["test_loss"] is None  # the server cannot read the model
    assert last["num_replies"] == 3 and last["client_accuracy"] > 0.6  # the clients can


def test_sweep_runs_jobs_and_writes_a_summary(tmp_path, data_dir):
    cmd = [
        sys.executable,
        "-m",
        "fedapp.sweep",
        "-m",
        "strategy=fedavg,fedprox",
        "partition=iid",
        "partition.num_partitions=2",
        "rounds=1",
        "clients_per_round=2",
        "eval_clients_per_round=0",
        "train.max_steps=5",
        f"hydra.sweep.dir={tmp_path}/sweep",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert len(summary["jobs"]) == 2
    settings = sorted(j["setting"] for j in summary["jobs"])
    assert "strategy=fedavg" in settings[0] and "strategy=fedprox" in settings[1]
    assert len(summary["settings"]) == 2
    assert all(j["status"] == "completed" for j in summary["jobs"])
    assert (tmp_path / "sweep" / "summary.md").exists()


@pytest.mark.parametrize(
    ("task", "engine"),
    [
        ("credit_lending", "flower"),
        ("insurance", "inline"),
        ("bankruptcy", "inline"),
        ("medical", "inline"),
    ],
)
def test_tabular_tasks_end_to_end(task, engine, tmp_path, data_dir):
    _, res = _run(engine, f"task={task} rounds=3", tmp_path / task)
    last, first = res["rounds"][-1], res["rounds"][0]
    for key in (
        "test_balanced_accuracy",
        "test_roc_auc",
        "test_pr_auc",
        "test_precision",
        "test_recall",
        "test_f1",
        "majority_accuracy",
        "client_f1",
        "client_balanced_accuracy",
    ):
        assert last[key] is not None, key
    assert last["test_roc_auc"] > max(0.6, first["test_roc_auc"])
    assert last["test_balanced_accuracy"] > 0.55  # the majority class scores exactly 0.5
    assert res["meta"]["preprocessing"]["prep.label_counts"]  # federated statistics were used


def test_insurance_image_end_to_end(tmp_path, data_dir):
    out = run_simulation(
        "task=insurance_image partition=iid partition.num_partitions=4 rounds=3 clients_per_round=4 "
        "eval_clients_per_round=4 train.max_steps=25",
        tmp_path / "images",
    )
    res = _results(out)
    last = res["rounds"][-1]
    assert len(last["test_confusion"]) == 9 and sum(last["test_confusion"]) == 457
    assert last["test_roc_auc"] > 0.55  # one-vs-rest macro; chance is 0.5
    assert last["client_f1"] is not None


def _untimed(row: dict) -> dict:
    return {k: v for k, v in (row.get("aggregation") or {}).items() if k != "server_train_s"}


def test_synthetic_data_through_flower_gives_the_inline_models(tmp_path, data_dir, monkeypatch):
    """strategy=synthetic (generator round, sharing round, a FedAvg round) and rare-class
    augmentation under sample DP through Flower's simulation engine: Flower routes the
    `train.generator` and `train.synthesize` messages and keeps each client's ledger and
    released label histogram; the models and epsilons are those of the in-process engine.

    DP noise is secret (fresh OS entropy), so two runs never draw the same noise; to compare
    the engines bit for bit, both run in the insecure seeded-noise test mode, set in the
    clients' own environment, and the results say that its guarantee does not hold."""
    import torch

    from tasks.dp_sgd import SEEDED_NOISE_ENV

    monkeypatch.setenv(SEEDED_NOISE_ENV, "1")

    base = (
        "task=medical clients_per_round=4 eval_clients_per_round=2 rounds=3 privacy=sample_dp "
        "privacy.target_epsilon=3"
    )
    runs = {
        "hybrid": "strategy=synthetic strategy.mode=hybrid strategy.generator.rounds=1 "
        "strategy.generator.epochs=1 strategy.generator.finetune_epochs=2 "
        "strategy.generator.epsilon_share=0.5",
        "augment": "strategy=fedavg augment=rare_class augment.generator.rounds=1 "
        "augment.generator.epochs=1",
    }
    for name, overrides in runs.items():
        flower = _results(run_simulation(f"{base} {overrides}", tmp_path / name))
        inline_dir = run_inline(f"{base} {overrides}", tmp_path / f"{name}-inline")
        inline = json.loads((inline_dir / "results.json").read_text())
        assert flower["meta"]["status"] == "completed"
        for rf, ri in zip(flower["rounds"], inline["rounds"], strict=True):
            for key in ("test_roc_auc", "dp_epsilon", "bytes_up", "bytes_down"):
                assert rf.get(key) == ri.get(key), (name, rf["round"], key)
            assert _untimed(rf) == _untimed(ri)
        assert 0 < flower["final"]["dp_epsilon"] <= 3.0
        assert flower["meta"]["privacy"]["guarantee"].startswith("DOES NOT HOLD")
        a = torch.load(tmp_path / name / "final_model.pt")
        b = torch.load(inline_dir / "final_model.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)
    sharing = json.loads((tmp_path / "hybrid" / "results.json").read_text())["rounds"][2]
    assert sharing["aggregation"]["phase"] == "synthesize" and sharing["aggregated"]
    assert (tmp_path / "hybrid" / "synthetic.json").exists()
