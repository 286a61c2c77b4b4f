"""A hostile server against an institution's ClientApp (the trust boundary, fedapp.core.policy).

Each test is one attack a curious or compromised server tries; each asserts that it fails,
and where the attack used to work, shows that it still would without the protection (the
seeded-noise test mode, a node without a policy), so the tests can fail.
The in-process engine stands in for Flower (the same ServerApp and ClientApp); real-process
federations are in tests/test_deployment.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedapp.cli.inline import run_inline
from fedapp.core.config import ConfigError
from fedapp.core.node import load_node
from fedapp.core.policy import POLICY_ENV, REFUSED, PolicyRefusal, client_overrides
from fedapp.features.clients import CLIENT_RECORD, virtual_client_mod
from fedapp.features.privacy import PrivacyError, ledger_report, privatize_stats, secret_numpy_noise
from fedapp.server_app import RunFailed
from tasks.base import DataError
from tasks.dp_sgd import SEEDED_NOISE_ENV, DPSGDHook

MEDICAL = "task=medical clients_per_round=4 eval_clients_per_round=0 checkpoint=false"


def _results(out) -> dict:
    return json.loads((out / "results.json").read_text())


def _final(out) -> dict:
    return torch.load(out / "final_model.pt")


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _policy(tmp_path, monkeypatch, default=None, clients=None):
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"default": default or {}, "clients": clients or {}}))
    monkeypatch.setenv(POLICY_ENV, str(path))
    return path


def _context(data_dir, overrides: str, **node) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 4, **node},
        state=RecordDict(),
        run_config={"overrides": overrides, "data-dir": str(data_dir)},
    )


# -- 1. the noise cannot be recomputed from the run seed -------------------------------------------
def _noise_only_step(seed: int) -> torch.Tensor:
    """One DP-SGD step whose per-sample gradients are zero: what is sent is the noise."""
    torch.manual_seed(0)
    model = nn.Linear(50, 4)
    x, y = torch.zeros(8, 50), torch.zeros(8, dtype=torch.long)
    hook = DPSGDHook(1.0, 1.0, seed)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    forward, private, _ = hook.wrap(model, opt, DataLoader(TensorDataset(x, y), batch_size=8), [])
    private.zero_grad()
    (forward(x).sum() * 0.0).backward()
    private.optimizer.pre_step()
    noise = torch.cat([p.grad.flatten() for p in model.parameters()]).clone()
    hook.finish()
    return noise


def _attackers_recomputation(seed: int, like: torch.Tensor) -> torch.Tensor:
    """What a server that knows the seed computes: Opacus' noise draws (secure_mode's four
    summed draws after one thrown away) from a generator seeded as the old code did."""
    g = torch.Generator().manual_seed(seed % (2**63))
    model = nn.Linear(50, 4)
    out = []
    std = 1.0 * 1.0  # noise multiplier x clip, before Opacus divides by the batch
    for p in model.parameters():
        torch.normal(0, std, size=(1, 1), generator=g)
        total = torch.zeros_like(p)
        for _ in range(4):
            total += torch.normal(0, std, size=p.shape, generator=g)
        out.append((total / 2).flatten() / 8)
    return torch.cat(out)


def test_a_server_knowing_the_seed_cannot_recompute_the_dp_sgd_noise(monkeypatch):
    monkeypatch.setenv(SEEDED_NOISE_ENV, "1")  # the old behaviour: the attack works
    seeded = _noise_only_step(1234)
    assert torch.allclose(seeded, _attackers_recomputation(1234, seeded), atol=1e-6)
    monkeypatch.delenv(SEEDED_NOISE_ENV)
    secret = _noise_only_step(1234)
    guess = _attackers_recomputation(1234, secret)
    residual = secret - guess  # what subtracting the recomputed noise leaves: more noise
    assert not torch.allclose(secret, guess, atol=1e-3)
    assert float(residual.std()) > float(secret.std())  # the two are independent
    assert not torch.equal(secret, _noise_only_step(1234))  # fresh noise every time


def test_the_statistics_release_and_central_dp_draw_secret_noise(monkeypatch):
    stats = {
        "stats.count": [10.0],
        "stats.sum": [5.0],
        "stats.sumsq": [4.0],
        "stats.labels": [6.0, 4.0],
    }
    assert privatize_stats(stats, 10.0, 1.0, 7) != privatize_stats(stats, 10.0, 1.0, 7)
    np.random.seed(3)
    before = np.random.get_state()[1].copy()
    with secret_numpy_noise(1):
        a = np.random.normal(size=5)
    assert np.array_equal(np.random.get_state()[1], before)  # the seeded stream is untouched
    with secret_numpy_noise(1):
        b = np.random.normal(size=5)
    assert not np.array_equal(a, b)  # and the same checkpointed state predicts nothing
    monkeypatch.setenv(SEEDED_NOISE_ENV, "1")
    assert privatize_stats(stats, 10.0, 1.0, 7) == privatize_stats(stats, 10.0, 1.0, 7)


def test_two_dp_runs_with_one_seed_draw_different_noise_and_non_dp_runs_stay_identical(
    tmp_path, data_dir, monkeypatch
):
    base = MEDICAL.replace("checkpoint=false", "checkpoint=true")
    dp = f"{base} rounds=1 privacy=sample_dp privacy.target_epsilon=3"
    a, b = run_inline(dp, tmp_path / "a"), run_inline(dp, tmp_path / "b")
    assert not _same(_final(a), _final(b))
    ra, rb = _results(a), _results(b)
    assert ra["final"]["dp_epsilon"] == rb["final"]["dp_epsilon"]  # epsilon is noise-free
    assert "guarantee" not in ra["meta"]["privacy"] and ra["meta"]["privacy"]["noise"]
    plain = f"{base} rounds=1"
    assert _same(
        _final(run_inline(plain, tmp_path / "c")), _final(run_inline(plain, tmp_path / "d"))
    )
    monkeypatch.setenv(SEEDED_NOISE_ENV, "1")  # the test mode: reproducible, and says so
    e, f = run_inline(dp, tmp_path / "e"), run_inline(dp, tmp_path / "f")
    assert _same(_final(e), _final(f))
    assert _results(e)["meta"]["privacy"]["guarantee"].startswith("DOES NOT HOLD")


# -- 2. the institution decides its protections ---------------------------------------------------
def test_privacy_none_is_refused_by_a_node_that_requires_dp(tmp_path, data_dir, monkeypatch):
    _policy(tmp_path, monkeypatch, default={"max-epsilon": 2.0, "ledger-dir": str(tmp_path / "l")})
    # the tabular task stops at start-up: no client released its statistics
    with pytest.raises(DataError, match="4 refused by their institution's policy.*sample_dp"):
        run_inline(f"{MEDICAL} rounds=1 privacy=none", tmp_path / "tab")
    # FEMNIST needs no statistics: every training reply is a refusal, and the run failed
    with pytest.raises(RunFailed, match="no round aggregated"):
        run_inline(
            "task=femnist partition=iid partition.num_partitions=4 clients_per_round=4 "
            "eval_clients_per_round=0 checkpoint=false rounds=1 train.max_steps=1",
            tmp_path / "run",
        )
    res = _results(tmp_path / "run")
    assert res["meta"]["status"] == "failed"
    for node in res["nodes"].values():
        assert node["refusals"] >= 1 and REFUSED in node["last_error"]
        assert "requires privacy=sample_dp with epsilon <= 2" in node["last_error"]


def test_a_stricter_node_epsilon_applies_whatever_the_server_asks(tmp_path, data_dir, monkeypatch):
    _policy(
        tmp_path,
        monkeypatch,
        default={"ledger-dir": str(tmp_path / "ledgers")},
        clients={"hungarian": {"max-epsilon": 1.0}},
    )
    out = run_inline(
        f"{MEDICAL} rounds=1 privacy=sample_dp privacy.target_epsilon=8", tmp_path / "r"
    )
    res = _results(out)
    targets = res["meta"]["privacy"]["target_epsilons"]
    assert targets["1"] == 1.0 and targets["0"] == 8.0
    clients = {c["partition_id"]: c for c in res["rounds"][1]["clients"]}
    assert clients[1]["dp_epsilon"] <= 1.0 < clients[0]["dp_epsilon"]
    assert (tmp_path / "ledgers" / "client-1.dp-ledger.json").is_file()


def test_secure_none_is_refused_by_a_node_that_requires_encryption(data_dir):
    with pytest.raises(PolicyRefusal, match="requires secure=ckks"):
        load_node(_context(data_dir, "task=medical secure=none", **{"require-secure": "ckks"}))


def test_tasks_and_strategies_outside_the_node_s_list_are_refused(data_dir):
    node = {"accept-tasks": "medical", "accept-strategies": "fedavg,fedprox"}
    load_node(_context(data_dir, "task=medical strategy=fedprox", **node), with_data=False)
    with pytest.raises(PolicyRefusal, match="strategy=trust is not one"):
        load_node(_context(data_dir, "task=medical strategy=trust", **node), with_data=False)
    with pytest.raises(PolicyRefusal, match="task=credit is not one"):
        load_node(_context(data_dir, "task=credit", **node), with_data=False)


# -- 3. nothing executable or path-like from the server -------------------------------------------
@pytest.mark.parametrize(
    "override, why",
    [
        ("train.lr=${oc.env:HOME}", "no interpolation"),
        ("strategy._target_=os.system", "registered components"),
        # a registered class under another strategy's name (a policy accepts names; what a
        # client sends, e.g. synthetic rows, is read from the class)
        ("strategy._target_=strategies.synthetic.SyntheticData", "registered components"),
        ("~privacy", "no deletion"),
        ("privacy@x=none", "registered components"),
        # found by the hostile review: Hydra unescapes these after a plain-text check
        (r"train.precision=$\{oc.env:HOME\}", "no interpolation"),
        ("strategy={_target_:this.s,name:fedavg}", "scalar values only"),
        ("task=../../../../tmp/evil", "group choice"),
        ("task.files.0={path:/etc/passwd}", "scalar values only"),
        ("strategy=trust strategy.name=fedavg", "identity is set by its group choice"),
        ("x=choice(1,2)", "no sweep"),
    ],
)
def test_executable_and_interpolated_overrides_are_refused(override, why, data_dir):
    with pytest.raises(PolicyRefusal, match=why) as err:
        load_node(_context(data_dir, f"task=medical {override}"), with_data=False)
    assert os.environ.get("HOME", "/root") not in str(err.value).replace("${oc.env:HOME}", "")


def test_a_strategy_name_and_class_that_disagree_are_refused():
    """Whatever way a config reaches a node: a policy accepts strategies by name, a client
    reads what it may do from the class (its units, synthetic rows), so the two must be the
    node's own pair (conf/strategy/<name>.yaml)."""
    from omegaconf import OmegaConf

    from fedapp.core.config import compose
    from fedapp.core.policy import NodePolicy

    cfg = compose("task=medical strategy=fedavg")
    NodePolicy().enforce(cfg)  # the node's own pair
    OmegaConf.update(cfg, "strategy._target_", "strategies.synthetic.SyntheticData")
    with pytest.raises(PolicyRefusal, match="conf/strategy/fedavg.yaml is"):
        NodePolicy().enforce(cfg)
    OmegaConf.update(cfg, "strategy.name", "not_one_of_ours")  # a name the node does not know
    with pytest.raises(PolicyRefusal, match="not one of this node's"):
        NodePolicy().enforce(cfg)


def test_a_server_s_search_path_is_never_loaded(data_dir, tmp_path):
    evil = tmp_path / "evil" / "task"
    evil.mkdir(parents=True)
    (evil / "evil.yaml").write_text("name: evil\nkind: tabular\n")
    ctx = _context(data_dir, f"hydra.searchpath=[file://{tmp_path / 'evil'}] task=evil")
    with pytest.raises(ConfigError, match="evil"):  # not found: the node's own configs only
        load_node(ctx, with_data=False)


def test_server_paths_and_the_validation_share_are_never_taken(data_dir, tmp_path):
    taken = client_overrides(
        f"task=medical data_dir={tmp_path} secure.key_dir={tmp_path} output_dir={tmp_path} "
        "task.client_val_fraction=0.9 task.test_file=/etc/passwd train.lr=0.5"
    )
    assert taken == ["task=medical", "train.lr=0.5"]
    node = load_node(_context(data_dir, "task=medical task.client_val_fraction=0.9"))
    assert float(node.cfg.task.client_val_fraction) != 0.9
    own = load_node(_context(data_dir, "task=medical", **{"val-fraction": 0.3}))
    assert float(own.cfg.task.client_val_fraction) == 0.3


def _virtual_record(partition_id: int, **extra) -> dict:
    """The record a server sends with a message for a virtual client (fedapp.features.clients)."""
    return {
        "lineage": "ab12",
        "lineages": [""],
        "lineage-upto": [-1],
        "partition-id": partition_id,
        "num-partitions": 4,
        **extra,
    }


def _train_message(record: dict) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    content[CLIENT_RECORD] = ConfigRecord(record)
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_a_deployed_node_takes_no_state_folder_or_partition_from_the_server(tmp_path):
    honest = {"lineage": "ab12", "lineages": [""], "lineage-upto": [-1]}
    own = Context(1, 1, {"data-path": "/data/bank.csv", "partition-id": 2}, RecordDict(), {})
    seen = []
    virtual_client_mod(_train_message(honest), own, lambda m, c: seen.append(c) or m)
    assert seen[0].node_config["partition-id"] == 2
    for extra in ({"state-dir": str(tmp_path)}, {"partition-id": 0, "num-partitions": 3}):
        with pytest.raises(PolicyRefusal, match="takes no"):
            virtual_client_mod(_train_message({**honest, **extra}), own, lambda m, c: m)
    assert not any(tmp_path.iterdir())  # nothing written where the server pointed
    with pytest.raises(PolicyRefusal, match="not a hex string"):
        virtual_client_mod(_train_message({**honest, "lineage": "../../x"}), own, lambda m, c: m)


def test_a_simulated_client_keeps_its_state_where_its_policy_says(tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    _policy(tmp_path, monkeypatch, default={"state-dir": str(mine)})
    rec = _virtual_record(1, **{"state-dir": str(tmp_path / "servers")})
    host = Context(1, 1, {"partition-id": 0, "num-partitions": 2}, RecordDict(), {})

    def train(msg, ctx):
        ctx.state.config_records["x"] = ConfigRecord({"v": 1})
        return Message(RecordDict(), reply_to=msg)

    virtual_client_mod(_train_message(rec), host, train)
    assert (mine / "client-1").is_dir() and not (tmp_path / "servers").exists()


# -- 4. one ledger per institution, across runs ---------------------------------------------------
def test_a_new_run_does_not_reset_an_institution_s_budget(tmp_path, data_dir, monkeypatch):
    _policy(tmp_path, monkeypatch, default={"ledger-dir": str(tmp_path / "ledgers")})
    dp = f"{MEDICAL} rounds=1 privacy=sample_dp privacy.target_epsilon=1"
    first = _results(run_inline(dp, tmp_path / "first"))
    assert 0.9 < first["final"]["dp_epsilon"] <= 1.0  # one round planned: all of it spent
    again = _results(run_inline(dp, tmp_path / "second"))  # a new run, a new state folder
    # what is left (under 0.01 of the 1.0) is all the second run may spend: either nothing,
    # or noise far larger than the first run's; never a fresh epsilon of 1
    for pid, node in again["nodes"].items():
        if node["failures"]:
            assert "in earlier runs" in node["last_error"]
            continue
        first_sigma = first["meta"]["privacy"]["noise_multipliers"][pid]
        assert again["meta"]["privacy"]["noise_multipliers"][pid] > 5 * first_sigma
    assert again["final"]["dp_epsilon"] <= 1.0 + 1e-9
    ledger = json.loads((tmp_path / "ledgers" / "client-0.dp-ledger.json").read_text())
    assert ledger["target_epsilon"] == 1.0 and len(ledger["history"]) >= 3  # both runs kept
    report = {r["institution"]: r for r in ledger_report(tmp_path / "ledgers")}
    assert sorted(report) == [f"client-{p}" for p in range(4)]
    assert all(0.9 < r["spent_epsilon"] <= 1.0 and r["left_epsilon"] < 0.1 for r in report.values())
    # without the node's ledger folder (the run's own state folder), a new run starts at 0
    monkeypatch.delenv(POLICY_ENV)
    fresh = _results(run_inline(dp, tmp_path / "third"))
    assert (
        fresh["meta"]["privacy"]["noise_multipliers"]
        == first["meta"]["privacy"]["noise_multipliers"]
    )


def test_a_deployed_node_refuses_dp_without_a_persistent_ledger(data_dir):
    from fedapp.features.privacy import require_persistent_ledger

    with pytest.raises(PrivacyError, match="ledger-dir"):
        require_persistent_ledger({"data-path": "/data/bank.csv"})
    require_persistent_ledger({"data-path": "/data/bank.csv", "ledger-dir": "/var/lib/fedapp"})


# -- 7. per-client levels ------------------------------------------------------------------------
def test_a_level_for_no_client_stops_the_run_naming_the_valid_ids(tmp_path, data_dir):
    with pytest.raises(
        ConfigError, match=r"\['Cleveland'\].*valid ids: 0, cleveland, 1, hungarian"
    ):
        run_inline(
            f"{MEDICAL} rounds=1 privacy=sample_dp privacy.levels={{Cleveland:1.0}}", tmp_path / "r"
        )


# -- 6. evaluation replies under DP ----------------------------------------------------------------
def test_evaluation_under_dp_sends_no_exact_confusion_counts(tmp_path, data_dir):
    out = run_inline(
        "task=medical clients_per_round=4 eval_clients_per_round=4 checkpoint=false rounds=1 "
        "privacy=sample_dp privacy.target_epsilon=3",
        tmp_path / "r",
    )
    last = _results(out)["rounds"][-1]
    evals = [c for c in last["clients"] if c["phase"] == "evaluate"]
    assert evals and all("eval-confusion" not in c for c in evals)
    assert last.get("client_f1") is None


# -- 8. a partition id is bound to the key registered for it ----------------------------------------
def test_a_node_claiming_another_institution_s_partition_is_refused(tmp_path):
    from fedapp.features.clients import ClientGrid, NodeInfo
    from fedapp.features.identity import load_node_keys, new_nonce, sign_claim
    from fedapp.features.tls import create_credentials
    from tests.conftest import FakeGrid

    creds = create_credentials(tmp_path / "creds", nodes=["bank-a", "bank-b"])
    registry = tmp_path / "node_keys.yaml"
    registry.write_text(
        f'0: "{creds.node_public_key("bank-a")}"\n1: "{creds.node_public_key("bank-b")}"\n'
    )
    keys = load_node_keys(registry)
    nonces = [new_nonce() for _ in range(4)]
    a, b = creds.node_key("bank-a"), creds.node_key("bank-b")
    nodes = {
        101: NodeInfo(0, 2, True, nonces[0], sign_claim(a, nonces[0], 0)),  # bank A, honest
        102: NodeInfo(0, 2, True, nonces[1], sign_claim(b, nonces[1], 0)),  # B claims A's id
        103: NodeInfo(1, 2, True, nonces[2], b""),  # no proof at all
        104: NodeInfo(1, 2, True, nonces[3], sign_claim(b, nonces[0], 1)),  # a replayed nonce
    }
    grid = ClientGrid(FakeGrid(list(nodes)), nodes, None, tmp_path / "s", node_keys=keys)
    assert grid.node_partitions == {1: 0}  # only bank A, serving partition 0
    assert grid.status[1].node_id == 101
    assert "another institution's partition id" in grid.ignored[102]
    assert "no auth-key" in grid.ignored[103]
    assert "does not verify" in grid.ignored[104]
    # without the registry, two claims on one partition are both refused (recorded; neither
    # takes the institution's place) and the run goes on with the other clients
    open_grid = ClientGrid(FakeGrid(list(nodes)), nodes, None, tmp_path / "t")
    assert open_grid.node_partitions == {}
    assert all("all claim partition-id" in open_grid.ignored[n] for n in nodes)
    # the honest B, signing its own id with its own key, is taken
    honest = {105: NodeInfo(1, 2, True, nonces[2], sign_claim(b, nonces[2], 1))}
    assert ClientGrid(
        FakeGrid([105]), honest, None, tmp_path / "u", node_keys=keys
    ).node_partitions == {2: 1}
    # a simulation host, or a node holding data without a partition id, is handed no
    # partition when a registry is set (it would otherwise take the unclaimed ones unproven)
    mixed = {
        105: honest[105],
        106: NodeInfo(0, 2, False, nonces[0], b""),  # a simulation host claiming partition 0
        107: NodeInfo(-1, 2, True, nonces[1], b""),  # its own data, no partition id
    }
    grid = ClientGrid(FakeGrid(list(mixed)), mixed, 2, tmp_path / "v", node_keys=keys)
    assert grid.node_partitions == {2: 1}
    assert all("node_keys is set" in grid.ignored[n] for n in (106, 107))


# -- 9. the ledger: concurrent messages, forged state, the node's delta -----------------------------
def test_two_messages_at_once_both_spend_into_one_ledger(tmp_path):
    """Two training messages for one institution at once (two SuperNode processes, a restart):
    each reads the ledger, spends, writes. Under the ledger lock both spendings are kept;
    without it (the same two calls, no lock) the slower one writes over the faster one's."""
    import threading
    import time as _time

    from fedapp.features.privacy import (
        Ledger,
        ledger_file,
        ledger_lock_mod,
        load_ledger,
        save_ledger,
    )

    node_config = {"partition-id": 0, "ledger-dir": str(tmp_path / "l"), "institution": "bank"}
    path = ledger_file(node_config, 0)
    save_ledger(Ledger(8.0, 1e-5, "rdp"), RecordDict(), path)

    def spend(sigma):
        def call_next(msg, ctx):
            ledger = load_ledger(RecordDict(), path)
            _time.sleep(0.3)  # local training
            ledger.record(sigma, 0.01, 100)
            save_ledger(ledger, RecordDict(), path)
            return msg

        return call_next

    def both(locked: bool):
        ctx = Context(1, 1, node_config, RecordDict(), {})
        msgs = [Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN) for _ in "ab"]
        run = (
            (lambda m, s: ledger_lock_mod(m, ctx, spend(s)))
            if locked
            else (lambda m, s: spend(s)(m, ctx))
        )
        threads = [
            threading.Thread(target=run, args=(m, s)) for m, s in zip(msgs, (1.0, 2.0), strict=True)
        ]
        for t in threads:
            t.start()
            _time.sleep(0.05)
        for t in threads:
            t.join()
        return load_ledger(RecordDict(), path).history

    assert sorted(h[0] for h in both(locked=True)) == [1.0, 2.0]
    save_ledger(Ledger(8.0, 1e-5, "rdp"), RecordDict(), path)
    assert len(both(locked=False)) == 1  # the attack the lock stops: one spending lost


def test_a_forged_state_ledger_does_not_stand_in_for_the_node_s_file(tmp_path):
    """A state record (restored in simulation from a folder) with a long history of tiny
    spending: the file under the node's ledger-dir alone counts."""
    from fedapp.features.privacy import STATE_KEY, Ledger, load_ledger, save_ledger

    path = tmp_path / "bank.dp-ledger.json"
    real = Ledger(8.0, 1e-5, "rdp", history=[(1.0, 0.05, 400)])
    save_ledger(real, RecordDict(), path)
    forged = Ledger(8.0, 1e-5, "rdp", history=[(1e6, 0.001, 10**7)])
    state = RecordDict({STATE_KEY: ConfigRecord({"json": forged.to_json()})})
    assert forged.epsilon() < 0.2 and real.epsilon() > 1.0  # many steps, little spent
    loaded = load_ledger(state, path)
    assert loaded.history == real.history and loaded.epsilon() == pytest.approx(real.epsilon())
    assert load_ledger(state, None).history == forged.history  # no ledger-dir: the state's


def test_the_node_s_max_delta_lowers_the_run_s(data_dir):
    from fedapp.features.privacy import PrivacySpec, new_ledger

    node = load_node(_context(data_dir, "task=medical privacy=sample_dp"), with_data=False)
    spec = PrivacySpec.from_config(node.cfg.privacy)
    strict = new_ledger(spec, node.task, 0, {"max-delta": spec.delta / 100})
    assert strict.delta == spec.delta / 100
    assert new_ledger(spec, node.task, 0, {"max-delta": 0.5}).delta == spec.delta
    assert new_ledger(spec, node.task, 0, {}).delta == spec.delta


def test_a_simulated_policy_with_dp_needs_its_own_ledger_folder(tmp_path, monkeypatch):
    _policy(tmp_path, monkeypatch, default={"max-epsilon": 2.0})
    rec = _virtual_record(1, **{"state-dir": str(tmp_path / "servers")})
    host = Context(1, 1, {"partition-id": 0, "num-partitions": 2}, RecordDict(), {})
    with pytest.raises(PolicyRefusal, match="no ledger-dir"):
        virtual_client_mod(_train_message(rec), host, lambda m, c: m)
    assert not (tmp_path / "servers").exists()


def test_the_statistics_noise_is_drawn_as_opacus_secure_mode_does():
    from fedapp.features.privacy import secure_gaussian

    draws = secure_gaussian(np.random.default_rng(0), 3.0, (200_000,))
    assert draws.std() == pytest.approx(3.0, rel=0.01) and abs(draws.mean()) < 0.03


# -- 10. the CKKS oracle and undeclared phases -------------------------------------------------------
def test_a_node_with_ckks_metrics_off_sends_no_metric_of_a_received_model(data_dir):
    """Under secure=ckks a server could send one client's update as the "aggregate" and read
    that client's data through the loss of it. A node with `ckks-metrics=false` answers no
    evaluate, and its training reply carries counts and timings only."""
    from fedapp import client_app
    from fedapp.core.policy import NodePolicy

    ctx = _context(data_dir, "task=medical secure=ckks", **{"ckks-metrics": "false"})
    node = load_node(ctx)
    arrays = ArrayRecord(node.task.make_model().state_dict())
    prep = node.task.aggregate_stats([node.task.client_stats(node.data)])
    config = ConfigRecord({"server-round": 1, "local-epochs": 1, **prep})
    content = RecordDict({"arrays": arrays, "config": config})
    msg = Message(content, dst_node_id=1, message_type=MessageType.EVALUATE)
    with pytest.raises(PolicyRefusal, match="ckks-metrics=false"):
        client_app.evaluate(msg, ctx)
    policy = NodePolicy.from_node_config(ctx.node_config)
    assert not policy.model_metrics_allowed(node.cfg)
    assert policy.model_metrics_allowed(load_node(_context(data_dir, "task=medical")).cfg)
    open_node = NodePolicy.from_node_config({})
    assert open_node.model_metrics_allowed(node.cfg)  # the default: metrics are sent
    reply = client_app.train(Message(content, dst_node_id=1, message_type=MessageType.TRAIN), ctx)
    sent = set(reply.content["metrics"])
    assert "train_loss" not in sent and sent <= {*client_app.MODEL_FREE}


def test_a_generator_phase_the_run_did_not_declare_is_refused(data_dir):
    from fedapp.core.policy import NodePolicy
    from fedapp.features.synthetic import check_generator_message

    fedavg = load_node(_context(data_dir, "task=medical"), with_data=False).cfg
    for sharing in (False, True):
        with pytest.raises(PolicyRefusal, match="no synthetic-data phase"):
            check_generator_message(fedavg, NodePolicy(), sharing)
    synthetic = load_node(_context(data_dir, "task=medical strategy=synthetic"), with_data=False)
    check_generator_message(synthetic.cfg, NodePolicy(), True)  # declared: taken
    with pytest.raises(PolicyRefusal, match="requires secure=ckks"):
        check_generator_message(synthetic.cfg, NodePolicy(require_secure=True), True)
    rare = load_node(_context(data_dir, "task=medical augment=rare_class"), with_data=False).cfg
    check_generator_message(rare, NodePolicy(), False)
    with pytest.raises(PolicyRefusal, match="no synthetic-data phase"):
        check_generator_message(rare, NodePolicy(), True)  # rare_class sends no rows


def test_policies_by_institution_refuse_a_partition_that_mixes_institutions(
    tmp_path, data_dir, monkeypatch
):
    """A policy naming hospitals (natural ids) under a server's partition=iid: every client
    holds rows of every hospital, so no hospital's entry (nor its one ledger) would cover
    them; the client refuses. Under the natural partition the hospital's entry applies."""
    _policy(
        tmp_path,
        monkeypatch,
        default={"ledger-dir": str(tmp_path / "l")},
        clients={"hungarian": {"max-epsilon": 1.0}},
    )
    seen = []

    def host(overrides):
        run_config = {"overrides": overrides, "data-dir": str(data_dir)}
        return Context(1, 1, {"partition-id": 0, "num-partitions": 1}, RecordDict(), run_config)

    rec = _virtual_record(1)
    with pytest.raises(PolicyRefusal, match="not one institution's rows"):
        virtual_client_mod(
            _train_message(rec),
            host("task=medical partition=iid partition.num_partitions=4"),
            lambda m, c: m,
        )
    virtual_client_mod(_train_message(rec), host("task=medical"), lambda m, c: seen.append(c) or m)
    assert float(seen[0].node_config["max-epsilon"]) == 1.0  # partition 1 is hungarian
