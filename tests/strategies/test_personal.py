"""Personalisation (strategies/personal.py) and per-site evaluation (fedapp/features/sites.py), against the
ClientApp's real handlers and in-process runs on the heart-disease table (4 hospitals)."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedapp import client_app
from fedapp.cli.inline import run_inline
from fedapp.core.config import ConfigError
from fedapp.core.config import compose as config_compose
from fedapp.core.node import load_node
from fedapp.features.sites import _screen, site_summary
from strategies.personal import (
    PERSONAL_HEAD,
    PERSONAL_MODEL,
    PersonalError,
    check_combination,
    fenda_keys,
    head_keys,
    input_keys,
)
from tasks.training import TrainSettings

MEDICAL = "task=medical clients_per_round=4 eval_clients_per_round=0 checkpoint=false"


def _context(data_dir, overrides: str, state: RecordDict | None = None) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 4},
        state=state if state is not None else RecordDict(),
        run_config={"overrides": f"{MEDICAL} {overrides}", "data-dir": str(data_dir)},
    )


def _train(ctx: Context, server_round: int = 1, arrays: ArrayRecord | None = None):
    """One training message through the ClientApp's train handler: (sent, reply)."""
    node = load_node(ctx)
    if arrays is None:
        torch.manual_seed(0)
        arrays = ArrayRecord(node.task.make_model().state_dict())
    settings = TrainSettings.from_train_config(node.cfg.train, 0)
    prep = node.task.aggregate_stats([node.task.client_stats(node.data)])
    config = ConfigRecord({**settings.to_config(), **prep, "server-round": server_round})
    msg = Message(
        RecordDict({"arrays": arrays, "config": config}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    return arrays, client_app.train(msg, ctx).content


def test_local_only_sends_no_model_and_keeps_its_own(data_dir):
    ctx = _context(data_dir, "strategy=local_only")
    sent, reply = _train(ctx)
    assert len(reply.array_records["arrays"]) == 0  # nothing of its model leaves the client
    assert set(reply.array_records) == {"arrays"}
    own = ctx.state.array_records[PERSONAL_MODEL].to_torch_state_dict()
    assert any(not torch.equal(own[k], v) for k, v in sent.to_torch_state_dict().items())
    # the next round trains on from its own model, whatever the server sends
    _, _ = _train(ctx, 2, arrays=sent)
    again = ctx.state.array_records[PERSONAL_MODEL].to_torch_state_dict()
    assert any(not torch.equal(again[k], own[k]) for k in own)
    # FedAvg, by contrast, sends its trained model
    _, fedavg = _train(_context(data_dir, "strategy=fedavg"))
    assert len(fedavg.array_records["arrays"]) == len(sent)


def test_fedper_head_never_leaves_the_client(data_dir):
    ctx = _context(data_dir, "strategy=fedper")
    sent, reply = _train(ctx)
    received, back = sent.to_torch_state_dict(), reply.array_records["arrays"].to_torch_state_dict()
    model = load_node(ctx).task.make_model()
    head = head_keys(model)
    assert head and set(head) < set(received)
    assert all(torch.equal(back[k], received[k]) for k in head)  # the head as received
    assert any(not torch.equal(back[k], received[k]) for k in received if k not in head)
    own = ctx.state.array_records[PERSONAL_HEAD].to_torch_state_dict()
    assert set(own) == set(head) and any(not torch.equal(own[k], received[k]) for k in head)
    # round 2: trained with its own head, and still sends the received one
    _, reply2 = _train(ctx, 2, arrays=sent)
    back2 = reply2.array_records["arrays"].to_torch_state_dict()
    assert all(torch.equal(back2[k], received[k]) for k in head)
    own2 = ctx.state.array_records[PERSONAL_HEAD].to_torch_state_dict()
    assert any(not torch.equal(own2[k], own[k]) for k in head)


@pytest.mark.parametrize("lam", ["inf", "1e9"])
def test_ditto_with_lambda_to_infinity_is_the_global_model(lam, data_dir):
    ctx = _context(data_dir, f"strategy=ditto strategy.lam={lam}")
    sent, _ = _train(ctx)
    personal = ctx.state.array_records[PERSONAL_MODEL].to_torch_state_dict()
    received = sent.to_torch_state_dict()
    for k, v in received.items():
        if lam == "inf":
            assert torch.equal(personal[k], v)
        else:
            assert torch.allclose(personal[k], v, atol=1e-6), k
    # lambda = 0: the personal model is trained freely, away from the global one
    ctx0 = _context(data_dir, "strategy=ditto strategy.lam=0")
    sent0, _ = _train(ctx0)
    free = ctx0.state.array_records[PERSONAL_MODEL].to_torch_state_dict()
    assert (
        max((free[k] - v).abs().max().item() for k, v in sent0.to_torch_state_dict().items()) > 1e-3
    )


def test_personal_methods_outside_the_dp_ledger_are_refused():
    from fedapp.checks import compose

    for name in ("ditto", "finetune", "fedrep"):
        with pytest.raises(ConfigError, match="DP ledger does not count"):
            compose(f"task=medical strategy={name} privacy=sample_dp")
    with pytest.raises(ConfigError, match="per-sample gradients"):
        compose("task=medical strategy=fedbn task.norm=batch privacy=sample_dp")
    for name in ("fedper", "local_only"):  # their personal parts are DP-SGD's own steps
        compose(f"task=medical strategy={name} privacy=sample_dp")
        for other in ("privacy=central_dp", "secure=ckks"):  # whole-model averages only
            with pytest.raises(ConfigError, match="own rule"):
                compose(f"task=medical strategy={name} {other}")
    with pytest.raises(ConfigError, match="task.norm=batch"):  # the launchers' compose
        compose("task=medical strategy=fedbn")
    with pytest.raises(PersonalError, match="task.norm=batch"):  # the strategy's own check
        check_combination(config_compose("task=medical strategy=fedbn"))


def _sites(out) -> dict:
    return json.loads((out / "results.json").read_text())["final"]


def test_every_run_reports_each_site_on_its_own_rows(tmp_path, data_dir):
    out = run_inline(f"{MEDICAL} rounds=1 sites.metric=accuracy", tmp_path / "fedavg")
    final = _sites(out)
    sites = final["sites"]
    # the per-site messages leave the rounds' counts as they were: statistics + 1 training
    nodes = json.loads((out / "results.json").read_text())["nodes"]
    assert [n["replies"] for n in nodes.values()] == [2, 2, 2, 2]
    assert [s["client"] for s in sites] == [0, 1, 2, 3]
    assert all(
        set(s) == {"client", "n_test", "metric", "global", "personal", "local_only"} for s in sites
    )
    assert all(s["metric"] == "accuracy" and s["personal"] is None for s in sites)
    # n_test: the held-out validation rows of each hospital (never trained on)
    task = load_node(_context(data_dir, "rounds=1")).task
    assert [s["n_test"] for s in sites] == [len(task.load_partition(p).val) for p in range(4)]
    assert final["site_mean_global"] == pytest.approx(sum(s["global"] for s in sites) / 4)
    assert final["site_mean_personal"] is None
    assert final["site_min"] == min(s["global"] for s in sites)


def test_personal_state_survives_a_resume(tmp_path, data_dir):
    """FedPer's heads live in each client's state files: a server resumed after round 2
    reports the same personal models as an uninterrupted run (a head lost on resume would
    restart from the global one and change them)."""
    overrides = f"{MEDICAL} checkpoint=true strategy=fedper"
    full = _sites(run_inline(f"{overrides} rounds=4", tmp_path / "full"))
    run_inline(f"{overrides} rounds=2", tmp_path / "cut")
    resumed = _sites(run_inline(f"{overrides} rounds=4 resume={tmp_path / 'cut'}"))
    assert resumed["sites"] == full["sites"]
    assert all(s["personal"] is not None for s in full["sites"])
    lost = tmp_path / "lost"
    run_inline(f"{overrides} rounds=2", lost)
    for f in lost.glob("client_state/client-*/r*.state"):
        f.unlink()  # what a resume would see if the heads did not survive
    forgot = _sites(run_inline(f"{overrides} rounds=4 resume={lost}"))
    assert forgot["sites"] != full["sites"]


def test_a_malformed_site_reply_is_rejected_with_a_reason():
    ok, why = _screen(MetricRecord({"n_test": 5, "global": 0.8, "personal": 0.9}))
    assert why is None and ok == {"n_test": 5, "global": 0.8, "personal": 0.9, "local_only": None}
    for bad, reason in [
        ({"n_test": 5, "global": 3.0}, "outside"),
        ({"n_test": -1, "global": 0.5}, "not a count"),
        ({"n_test": 5, "global": 0.5, "extra": 1.0}, "unexpected"),
        ({"global": 0.5}, "malformed"),
    ]:
        assert _screen(MetricRecord(bad))[0] is None and reason in _screen(MetricRecord(bad))[1]
    assert site_summary(None) == {
        "site_mean_global": None,
        "site_mean_personal": None,
        "site_min": None,
    }
    mixed = [{"global": 0.6, "personal": 0.9}, {"global": 0.7, "personal": None, "local_only": 0.5}]
    assert site_summary(mixed) == {
        "site_mean_global": pytest.approx(0.65),
        "site_mean_personal": 0.9,
        "site_min": 0.5,
    }


def test_fedbn_keeps_the_normalisation_layers_on_the_client(data_dir):
    ctx = _context(data_dir, "strategy=fedbn task.norm=batch")
    sent, reply = _train(ctx)
    received, back = sent.to_torch_state_dict(), reply.array_records["arrays"].to_torch_state_dict()
    model = load_node(ctx).task.make_model()
    norms = [k for k in model.state_dict() if "running_mean" in k]
    assert norms  # task.norm=batch gives the MLP BatchNorm layers
    own = ctx.state.array_records[PERSONAL_HEAD].to_torch_state_dict()
    for k in own:  # weights, biases and statistics: kept, and sent back as received
        assert torch.equal(back[k], received[k])
    assert any(not torch.equal(own[k], received[k]) for k in norms)  # statistics moved locally
    with pytest.raises(PersonalError, match="task.norm=batch"):  # the unit refuses too
        _train(_context(data_dir, "strategy=fedbn"))


def test_the_default_models_have_no_normalisation_layers(data_dir):
    """task.norm defaults to none: the models (and so the default job) are as before."""
    from tasks.models import MODELS

    torch.manual_seed(0)
    cnn = MODELS["cnn_small"](62)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in cnn.modules())
    assert [k for k in cnn.state_dict()] == [
        "features.0.weight",
        "features.0.bias",
        "features.3.weight",
        "features.3.bias",
        "classifier.1.weight",
        "classifier.1.bias",
        "classifier.3.weight",
        "classifier.3.bias",
    ]
    mlp = load_node(_context(data_dir, "")).task.make_model()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in mlp.modules())


def test_fenda_federates_only_the_global_extractor(data_dir, tmp_path):
    """FENDA-FL: the local extractor and the head stay with the client (sent back as
    received, its own copy trained on); the global extractor is trained and sent."""
    ctx = _context(data_dir, "strategy=fenda task.fenda=true")
    sent, reply = _train(ctx)
    received, back = sent.to_torch_state_dict(), reply.array_records["arrays"].to_torch_state_dict()
    model = load_node(ctx).task.make_model()
    mine = fenda_keys(model)
    shared = [k for k in received if k.startswith("global_extractor.")]
    assert mine and shared and set(mine) | set(shared) == set(received)
    assert model.head.in_features == 2 * 32  # both extractors' features (hidden [64, 32])
    assert all(torch.equal(back[k], received[k]) for k in mine)  # as received
    assert any(not torch.equal(back[k], received[k]) for k in shared)
    own = ctx.state.array_records[PERSONAL_HEAD].to_torch_state_dict()
    assert set(own) == set(mine) and any(not torch.equal(own[k], received[k]) for k in mine)
    # the node refuses FENDA on a model without its extractors, and the run reports per site
    with pytest.raises(PersonalError, match="task.fenda=true"):
        _train(_context(data_dir, "strategy=fenda"))
    out = run_inline(f"{MEDICAL} rounds=2 strategy=fenda task.fenda=true", tmp_path / "fenda")
    sites = _sites(out)["sites"]
    assert len(sites) == 4 and all(s["personal"] is not None for s in sites)


def test_fenda_s_model_wraps_any_body_with_a_linear_last_layer():
    from tasks.models import MODELS, Fenda

    cnn = Fenda(MODELS["cnn_small"](62))
    assert cnn(torch.zeros(3, 1, 28, 28)).shape == (3, 62)
    assert cnn.head.in_features == 2 * 352
    with pytest.raises(ValueError, match="last layer is linear"):
        Fenda(torch.nn.Sequential(torch.nn.ReLU()))


def test_lg_fedavg_keeps_the_site_s_input_encoder(data_dir):
    """A per-site input encoder: the first layer stays with the client (sent as received,
    its own copy trained), the rest is trained and sent; a model with one layer is refused."""
    ctx = _context(data_dir, "strategy=lg_fedavg")
    sent, reply = _train(ctx)
    received, back = sent.to_torch_state_dict(), reply.array_records["arrays"].to_torch_state_dict()
    model = load_node(ctx).task.make_model()
    first = input_keys(model)
    assert first == ["net.0.weight", "net.0.bias"]
    assert all(torch.equal(back[k], received[k]) for k in first)
    assert any(not torch.equal(back[k], received[k]) for k in received if k not in first)
    own = ctx.state.array_records[PERSONAL_HEAD].to_torch_state_dict()
    assert set(own) == set(first) and any(not torch.equal(own[k], received[k]) for k in first)
    with pytest.raises(PersonalError, match="no shared layers"):
        _train(_context(data_dir, "strategy=lg_fedavg task.model=logreg"))


def test_a_client_cannot_claim_a_model_the_strategy_does_not_make():
    """A hostile client under fedavg sending a 'personal' score (which would become
    site_mean_personal and site_min), or scores on no rows: rejected with the reason."""
    from hydra.utils import get_class

    from fedapp.features.sites import allowed_models
    from strategies.personal import FedPer, LocalOnly

    fedavg = get_class(str(config_compose("strategy=fedavg").strategy._target_))
    assert allowed_models(fedavg) == ("global",)
    assert allowed_models(FedPer) == ("global", "personal")
    assert allowed_models(LocalOnly) == ("global", "local_only")
    for bad, allowed, reason in [
        ({"n_test": 5, "global": 0.1, "personal": 0.99}, ("global",), "makes no personal"),
        ({"n_test": 5, "local_only": 0.99}, ("global", "personal"), "makes no local_only"),
        ({"n_test": 0, "global": 0.9}, ("global",), "n_test=0"),
        ({"n_test": float("inf"), "global": 0.9}, ("global",), "not a count"),
    ]:
        ok, why = _screen(MetricRecord(bad), allowed)
        assert ok is None and reason in why, (bad, why)
    assert _screen(MetricRecord({"n_test": 0}), ("global",)) == (
        {"n_test": 0, "global": None, "personal": None, "local_only": None},
        None,
    )


def _sites_message(ctx, server_round: int) -> Message:
    node = load_node(ctx)
    torch.manual_seed(0)
    arrays = ArrayRecord(node.task.make_model().state_dict())
    prep = node.task.aggregate_stats([node.task.client_stats(node.data)])
    settings = TrainSettings.from_train_config(node.cfg.train, 0)
    config = ConfigRecord({**settings.to_config(), **prep, "server-round": server_round})
    return Message(
        RecordDict({"arrays": arrays, "config": config}),
        dst_node_id=1,
        message_type="evaluate.sites",
    )


def test_a_server_asking_a_site_again_or_under_encryption_is_refused(data_dir):
    from fedapp.core.policy import PolicyRefusal
    from fedapp.features.sites import site_metric, site_reply

    ctx = _context(data_dir, "strategy=finetune sites.metric=recall")
    first = site_reply(_sites_message(ctx, 3), ctx).content["metrics"]
    assert first["n_test"] > 0 and 0 <= first["personal"] <= 1
    for again in (3, 2):  # the same round, or an earlier one: each would fine-tune again
        with pytest.raises(PolicyRefusal, match="already answered for round 3"):
            site_reply(_sites_message(ctx, again), ctx)
    site_reply(_sites_message(ctx, 5), ctx)  # a resumed run's new last round
    enc = _context(data_dir, "secure=ckks")
    with pytest.raises(PolicyRefusal, match="not part of a run under secure=ckks"):
        site_reply(_sites_message(enc, 1), enc)
    # under sample-level DP the score is the headline metric, whatever sites.metric says
    dp = load_node(_context(data_dir, "privacy=sample_dp sites.metric=recall"))
    assert site_metric(dp.cfg, dp.task) == "roc_auc"  # the table's headline metric
    plain = load_node(ctx)
    assert site_metric(plain.cfg, plain.task) == "recall"


def test_a_client_refuses_a_ditto_lambda_it_cannot_use(data_dir):
    for lam in ("-1", "nan"):
        with pytest.raises(PersonalError, match="lambda must be >= 0"):
            _train(_context(data_dir, f"strategy=ditto strategy.lam={lam}"))
