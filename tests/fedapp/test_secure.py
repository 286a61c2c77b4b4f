"""secure=ckks against a server that is not trusted (fedapp/features/secure.py): where the keys are made
and who holds them, what the server rejects, what a client refuses, and the stated limit of a
shared secret key (a hostile server routing one client's ciphertext to another)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import tenseal as ts
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedapp.checks import compose
from fedapp.core.config import PROJECT_ROOT, with_keys
from fedapp.core.flower_compat import set_task_identity
from fedapp.features import secure
from fedapp.features.secure import (
    COLLUSION_LIMIT,
    CT,
    KEYS_QUERY,
    KEYS_RECORD,
    PUBLIC,
    PUBLIC_RECORD,
    SECRET,
    ModelRefused,
    SecureAggregator,
    SecureError,
    SecureSpec,
    check_global_model,
    client_key_dir,
    create_keys,
    decrypt,
    encrypt,
    fingerprint,
    load_context,
    secure_meta,
    secure_mod,
    server_aggregator,
    weighted_sum,
)
from strategies import build_strategy
from tests.conftest import instruction

CREDIT = (
    "task=credit partition=iid partition.num_partitions=6 rounds=2 clients_per_round=4 "
    "eval_clients_per_round=0 checkpoint=false train.local_epochs=1 secure=ckks"
)
SPEC = SecureSpec(name="ckks")


@pytest.fixture
def client_home(tmp_path, monkeypatch):
    home = tmp_path / "client-home"
    monkeypatch.setenv(secure.CLIENT_HOME_ENV, str(home))
    return home


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fedkeys")
    s, p = create_keys(folder, SPEC)
    return load_context(s, need_secret=True), load_context(p, need_secret=False)


@pytest.fixture(scope="module")
def layout():
    from tasks import get_task
    from tests.conftest import DATA_DIR

    task = get_task(compose(CREDIT), DATA_DIR)
    return {k: v.numpy() for k, v in task.make_model().state_dict().items()}


def _n(layout) -> int:
    return int(sum(v.size for v in layout.values()))


def _other_context(n=8192, bits=(60, 40, 60), scale_bits=40):
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=n, coeff_mod_bit_sizes=list(bits))
    ctx.global_scale = 2**scale_bits
    return ctx


# -- keys: made on the institutions' side ------------------------------------------------------------
def test_the_secret_key_is_created_0600_from_the_start(tmp_path, monkeypatch):
    opened, real_open = [], os.open

    def spy_open(path, flags, mode=0o777, *a, **k):
        opened.append((os.path.basename(str(path)), flags, mode))
        return real_open(path, flags, mode, *a, **k)

    def no_chmod(*a, **k):
        raise AssertionError("the key's mode must be set when it is created, not after")

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(type(tmp_path), "chmod", no_chmod)
    old = os.umask(0)  # the mode comes from os.open, not from a friendly umask
    try:
        secret, public = create_keys(tmp_path / "k", SPEC)
    finally:
        os.umask(old)
    first = [(f, m) for f, fl, m in opened if f.startswith(f".{SECRET}")]
    assert first and first[0][1] == 0o600
    assert all(fl & os.O_EXCL and fl & os.O_CREAT for f, fl, _ in opened if f.startswith("."))
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert sorted(p.name for p in secret.parent.iterdir()) == [PUBLIC, SECRET]  # no temp left
    assert not load_context(public, need_secret=False).has_secret_key()
    with pytest.raises(SecureError, match="exists"):  # never over an existing key
        create_keys(tmp_path / "k", SPEC)


def test_no_key_is_made_in_a_results_folder_or_by_the_launchers(tmp_path, client_home):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text("{}")
    with pytest.raises(SecureError, match="inside the results folder"):
        create_keys(run / "keys", SPEC)
    cfg = compose(CREDIT)
    assert with_keys(cfg, ["secure=ckks"], run) == (cfg, ["secure=ckks"])
    assert sorted(p.name for p in run.iterdir()) == ["results.json"]

    from fedapp.cli.federation import split_keys

    out = tmp_path / "fed"
    out.mkdir()
    ovr, secret = split_keys(cfg, ["secure=ckks"], out)
    assert secret == client_key_dir(SPEC) / SECRET and client_home in secret.parents
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "server_keys",
        f"server_keys/{PUBLIC}",
    ]
    assert ovr[-1] == f"secure.key_dir={out / 'server_keys'}"
    with pytest.raises(SecureError, match="inside the run's output folder"):
        home_out = client_home.parent
        split_keys(cfg, ["secure=ckks"], home_out)


def test_fedapp_keys_is_the_institutions_tool(tmp_path, capsys):
    assert secure.main(["create", str(tmp_path / "k")]) == 0
    said = capsys.readouterr().out
    assert "out of band" in said and "operator" in said and "mode 600" in said
    assert secure.main(["fingerprint", str(tmp_path / "k" / SECRET)]) == 0
    a = capsys.readouterr().out.strip()
    assert secure.main(["fingerprint", str(tmp_path / "k" / PUBLIC)]) == 0
    assert capsys.readouterr().out.strip() == a and len(a) == 64
    assert secure.main(["create", str(tmp_path / "k")]) == 2  # an existing key stays


def test_a_client_reads_its_key_from_its_own_node_config_never_the_servers(tmp_path, client_home):
    from fedapp.features.secure import client_secret_path

    server_side = tmp_path / "server"
    create_keys(server_side, SPEC)
    run_config = {"overrides": f"{CREDIT} secure.key_dir={server_side}", "output-dir": ""}
    sim = Context(1, 1, {"partition-id": 0, "num-partitions": 6}, RecordDict(), run_config)
    path = client_secret_path(sim, SPEC)
    assert path == client_key_dir(SPEC) / SECRET and server_side not in path.parents
    deployed = Context(1, 1, {"data-path": "/x.csv"}, RecordDict(), run_config)
    with pytest.raises(SecureError, match="ckks-secret"):
        client_secret_path(deployed, SPEC)
    own = Context(1, 1, {"data-path": "/x.csv", "ckks-secret": "/k/s"}, RecordDict(), run_config)
    assert str(client_secret_path(own, SPEC)) == "/k/s"
    inside = {**run_config, "output-dir": str(server_side)}
    with pytest.raises(SecureError, match="inside the run's output folder"):
        client_secret_path(
            Context(1, 1, {"ckks-secret": str(server_side / SECRET)}, RecordDict(), inside), SPEC
        )
    loose = tmp_path / "loose.ckks"
    loose.write_bytes((server_side / SECRET).read_bytes())
    loose.chmod(0o644)
    with pytest.raises(SecureError, match="readable by other users"):
        load_context(loose, need_secret=True)


# -- the server never holds a secret key -------------------------------------------------------------
def test_the_server_never_loads_a_context_with_a_secret_key(tmp_path, monkeypatch, keys):
    secret_ctx, public_ctx = keys
    parsed = []
    real = ts.context_from
    monkeypatch.setattr(ts, "context_from", lambda b, *a, **k: parsed.append(b) or real(b, *a, **k))
    both = tmp_path / "both"
    create_keys(both, SPEC)
    parsed.clear()
    cfg = compose(f"{CREDIT} secure.key_dir={both}")
    with pytest.raises(SecureError, match="operator must hold public.ckks only"):
        server_aggregator(cfg)
    disguised = tmp_path / "disguised"
    disguised.mkdir()
    (disguised / PUBLIC).write_bytes(secret_ctx.serialize(save_secret_key=True))
    with pytest.raises(SecureError, match="holds a secret key"):
        server_aggregator(compose(f"{CREDIT} secure.key_dir={disguised}"))
    with pytest.raises(SecureError, match="holds a secret key"):
        secure.public_context_from(secret_ctx.serialize(save_secret_key=True))
    assert parsed == []  # refused before SEAL parsed any of them
    with pytest.raises(SecureError, match="secret key"):
        SecureAggregator(secret_ctx)
    # a client that offers its secret context as "the public context" is refused too
    grid = KeyGrid({1: secret_ctx, 2: secret_ctx}, send_secret=True)
    with pytest.raises(SecureError, match="no client sent a usable public context"):
        server_aggregator(compose(CREDIT), grid, {1: 0, 2: 1})
    assert parsed == []
    agg = server_aggregator(compose(CREDIT), KeyGrid({1: secret_ctx, 2: secret_ctx}), {1: 0, 2: 1})
    assert not agg.public.has_secret_key() and agg.fingerprint == fingerprint(public_ctx)
    with pytest.raises(ValueError, match="secret"):
        decrypt(agg.public, encrypt(secret_ctx, np.ones(3)))


class KeyGrid:
    """Clients answering the server's key query (client id -> its secret context)."""

    def __init__(self, contexts, send_secret=False, errors=()):
        self.contexts, self.send_secret, self.errors = contexts, send_secret, set(errors)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            cid = msg.metadata.dst_node_id
            assert msg.metadata.message_type == KEYS_QUERY
            set_task_identity(node_id=cid)
            if cid in self.errors:
                from flwr.app import Error

                replies.append(Message(Error(code=2, reason="no key here"), reply_to=msg))
                continue
            ctx = self.contexts[cid]
            content = RecordDict({KEYS_RECORD: ConfigRecord({"fingerprint": fingerprint(ctx)})})
            if msg.content["config"]["send-public"]:
                blob = ctx.serialize(save_secret_key=self.send_secret)
                content[PUBLIC_RECORD] = ArrayRecord(
                    {"public": Array(np.frombuffer(blob, np.uint8))}
                )
            replies.append(Message(content, reply_to=msg))
        set_task_identity(node_id=0)
        return replies


def test_clients_with_another_key_are_recorded_and_their_replies_rejected(tmp_path, keys, layout):
    secret_ctx, public_ctx = keys
    stranger = _other_context()
    grid = KeyGrid({1: secret_ctx, 2: secret_ctx, 3: stranger, 4: secret_ctx}, errors={5})
    cfg = compose(CREDIT)
    agg = server_aggregator(cfg, grid, {c: c - 1 for c in range(1, 6)})
    assert agg.fingerprint == fingerprint(public_ctx)
    assert sorted(agg.refused) == [3, 5]
    assert "not the federation's" in agg.refused[3] and "no key here" in agg.refused[5]
    meta = secure_meta(cfg, agg)
    assert set(meta["clients_refused"]) == {"3", "5"}
    assert meta["key_fingerprint"] == agg.fingerprint
    assert meta["collusion_limit"] == COLLUSION_LIMIT
    blob = encrypt(stranger, np.zeros(_n(layout)))
    assert agg.screen(3, ArrayRecord({CT: Array(blob)})).startswith("rejected: its CKKS key")
    # the operator's copy of public.ckks decides; clients without it are refused
    operator = tmp_path / "operator"
    operator.mkdir()
    (operator / PUBLIC).write_bytes(public_ctx.serialize())
    cfg = compose(f"{CREDIT} secure.key_dir={operator}")
    assert server_aggregator(cfg, grid, {c: c - 1 for c in range(1, 6)}).refused.keys() == {3, 5}
    with pytest.raises(SecureError, match="no client holds the key"):
        server_aggregator(cfg, KeyGrid({1: stranger}), {1: 0})


# -- the server screens ciphertexts ------------------------------------------------------------------
def _reply(cid, blob, n=10):
    msg = instruction(cid)
    set_task_identity(node_id=cid)
    content = RecordDict(
        {
            "arrays": ArrayRecord({CT: Array(np.asarray(blob))}),
            "metrics": MetricRecord({"num-examples": n, "train_loss": 0.1, "train_steps": 1.0}),
        }
    )
    out = Message(content, reply_to=msg)
    set_task_identity(node_id=0)
    return out


def test_bad_ciphertexts_are_rejected_replies_and_the_sum_goes_on(keys, layout):
    secret_ctx, public_ctx = keys
    n = _n(layout)
    cfg = compose(CREDIT)
    strategy = build_strategy(cfg, num_nodes=12)
    strategy.secure = SecureAggregator(public_ctx, None, length=n)
    strategy.bind({c: c - 1 for c in range(1, 13)}, seed=0, min_replies=1)
    rng = np.random.default_rng(0)
    good = {c: rng.normal(size=n) for c in (1, 2, 3)}
    fresh = encrypt(secret_ctx, rng.normal(size=n))
    bad = {
        4: encrypt(secret_ctx, rng.normal(size=n - 1)),  # wrong size
        5: encrypt(_other_context(16384, (60, 40, 40, 60)), rng.normal(size=n)),  # other N
        6: encrypt(_other_context(8192, (60, 40, 40)), rng.normal(size=n)),  # other modulus
        7: encrypt(_other_context(8192, (60, 40, 60), 30), rng.normal(size=n)),  # other scale
        8: rng.integers(0, 256, size=fresh.size, dtype=np.uint8),  # right size, not a ciphertext
        9: fresh[: fresh.size // 3],  # truncated
        10: weighted_sum(public_ctx, [fresh], [1.0]),  # not a fresh encryption
    }
    replies = [_reply(c, encrypt(secret_ctx, v), n=10 * c) for c, v in good.items()]
    replies += [_reply(c, b) for c, b in bad.items()]
    arrays, _ = strategy.aggregate_train(1, replies)  # never raises
    assert arrays is not None
    status = {c.partition_id + 1: c.status for c in strategy.rounds[1].clients}
    assert all(status[c] == "ok" for c in good)
    for c in bad:
        assert status[c].startswith("rejected: ckks-ct: "), (c, status[c])
    assert "values, the model has" in status[4]
    assert "not a ciphertext under the federation's CKKS parameters" in status[6]
    assert "bytes, expected" in status[5] and "bytes, expected" in status[9]
    assert "expected 2" in status[7] or "scale" in status[7]
    expected = sum(10 * c * v for c, v in good.items()) / 60
    np.testing.assert_allclose(decrypt(secret_ctx, arrays[CT].numpy()), expected, atol=1e-4)


def test_a_ciphertext_under_another_key_with_the_same_parameters_is_not_detected(keys, layout):
    """The stated limit (no authentication): the server adds it; the clients refuse the sum."""
    secret_ctx, public_ctx = keys
    n = _n(layout)
    agg = SecureAggregator(public_ctx, None, length=n)
    forged = encrypt(_other_context(), np.zeros(n))
    assert agg.screen(1, ArrayRecord({CT: Array(forged)})) is None
    total = weighted_sum(public_ctx, [encrypt(secret_ctx, np.zeros(n)), forged], [0.5, 0.5])
    with pytest.raises(ModelRefused, match="norm"):
        check_global_model(secret_ctx, ArrayRecord({CT: Array(total)}), layout, 1e6)
    assert "cannot detect a ciphertext made under another key" in secure.AUTHENTICATION_LIMIT


# -- the client checks what it decrypts ---------------------------------------------------------------
def test_a_client_refuses_a_non_finite_huge_or_misshapen_global_model(keys, layout):
    secret_ctx, public_ctx = keys
    n = _n(layout)
    honest = weighted_sum(public_ctx, [encrypt(secret_ctx, np.full(n, 0.01))], [1.0])
    values = check_global_model(secret_ctx, ArrayRecord({CT: Array(honest)}), layout, 1e6)
    assert list(values) == list(layout)
    huge = weighted_sum(public_ctx, [encrypt(secret_ctx, np.full(n, 1e5))], [1.0])
    with pytest.raises(ModelRefused, match="L2 norm .* exceeds this node's max-model-norm"):
        check_global_model(secret_ctx, ArrayRecord({CT: Array(huge)}), layout, 1e6)
    with pytest.raises(ModelRefused, match="max-model-norm 0.1"):
        check_global_model(secret_ctx, ArrayRecord({CT: Array(honest)}), layout, 0.1)
    short = weighted_sum(public_ctx, [encrypt(secret_ctx, np.zeros(n - 5))], [1.0])
    with pytest.raises(ModelRefused, match=f"values, the model has {n}"):
        check_global_model(secret_ctx, ArrayRecord({CT: Array(short)}), layout, 1e6)
    other = weighted_sum(
        _other_context(16384, (60, 40, 40, 60)),
        [encrypt(_other_context(16384, (60, 40, 40, 60)), np.zeros(n))],
        [1.0],
    )
    with pytest.raises(ModelRefused, match="CKKS parameters"):
        check_global_model(secret_ctx, ArrayRecord({CT: Array(other)}), layout, 1e6)
    nan = {k: Array(np.full_like(v, np.nan)) for k, v in layout.items()}
    with pytest.raises(ModelRefused, match="NaN/Inf"):
        check_global_model(secret_ctx, ArrayRecord(nan), layout, 1e6)
    with pytest.raises(ModelRefused, match="layout"):
        check_global_model(secret_ctx, ArrayRecord({"w": Array(np.zeros(3))}), layout, 1e6)


def _client(partition, node_config=None, extra=""):
    run_config = {"overrides": f"{CREDIT} {extra}".strip(), "output-dir": ""}
    config = {"partition-id": partition, "num-partitions": 6, **(node_config or {})}
    return Context(
        run_id=1,
        node_id=100 + partition,
        node_config=config,
        state=RecordDict(),
        run_config=run_config,
    )


def _train(context, arrays):
    """A train message through secure_mod whose 'training' adds 0.01 to every value (and
    records what the client's training received)."""
    seen = {}

    def call_next(msg, ctx):
        seen.update({k: v.numpy().copy() for k, v in msg.content["arrays"].items()})
        out = ArrayRecord(
            {
                k: Array(v.numpy() + np.asarray(0.01, v.numpy().dtype))
                for k, v in msg.content["arrays"].items()
            }
        )
        metrics = MetricRecord({"num-examples": 10, "train_steps": 1.0})
        return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)

    msg = instruction(context.node_id)
    msg.content["arrays"] = arrays
    msg.content["config"] = ConfigRecord({"server-round": 2})
    return secure_mod(msg, context, call_next), seen


def test_a_refused_model_is_an_error_reply_with_the_reason(data_dir, client_home, layout):
    from fedapp.cli.inline import InlineGrid

    ctx = load_context(secure.ensure_client_key(SPEC), need_secret=True)
    n = _n(layout)
    huge = weighted_sum(ctx, [encrypt(ctx, np.full(n, 1e5))], [1.0])
    node = _client(0)
    msg = instruction(node.node_id, "train")
    msg.content["arrays"] = ArrayRecord({CT: Array(huge)})
    msg.content["config"] = ConfigRecord({"server-round": 2, "seed": 0})
    from fedapp.client_app import app as client_app

    reply = InlineGrid(client_app, {node.node_id: node})._deliver(msg)
    assert reply.has_error()
    assert "refused the global model: its L2 norm" in reply.error.reason


# -- a hostile server routes one client's ciphertext to another -----------------------------------------
def test_a_hostile_server_routing_one_clients_ciphertext_to_another(data_dir, client_home, layout):
    """What happens, and the stated limit: the server alone reads nothing; a fresh ciphertext
    forwarded as is is refused; forwarded through a weighted sum (x 1.0) it is indistinguishable
    from an aggregate, and client B trains on client A's model (with one key shared by every
    institution no client can tell; docs/how-to/encryption.md and meta.secure say so)."""
    a, b = _client(0), _client(1)
    start = ArrayRecord({k: Array(np.zeros_like(v)) for k, v in layout.items()})
    reply_a, _ = _train(a, start)  # client A's encrypted model: everything zero + 0.01
    ct_a = reply_a.content["arrays"][CT].numpy()
    y_a = decrypt(load_context(client_key_dir(SPEC) / SECRET, need_secret=True), ct_a)

    public_ctx = secure.public_context_from(
        load_context(client_key_dir(SPEC) / SECRET, need_secret=True).serialize(
            save_secret_key=False
        )
    )
    with pytest.raises(ValueError, match="secret"):  # the server alone cannot read A's model
        decrypt(public_ctx, ct_a)

    with pytest.raises(ModelRefused, match="forwarded as is"):  # naive routing: refused
        _train(b, ArrayRecord({CT: Array(ct_a)}))

    disguised = weighted_sum(public_ctx, [ct_a], [1.0])  # A's model dressed as an aggregate
    reply_b, seen = _train(b, ArrayRecord({CT: Array(disguised)}))
    assert not reply_b.has_error()
    np.testing.assert_allclose(np.concatenate([v.ravel() for v in seen.values()]), y_a, atol=1e-6)
    meta = secure_meta(compose(CREDIT))
    assert "send one client's" in meta["collusion_limit"]
    guide = (PROJECT_ROOT / "docs" / "how-to" / "encryption.md").read_text()
    assert "the operator together with any one institution learns every individual update" in (
        " ".join(guide.split())
    )


def test_in_deployment_nobody_on_the_server_side_decrypts(keys, data_dir):
    from fedapp.features.secure import designated_evaluator
    from tasks import get_task

    _, public_ctx = keys
    cfg = compose(CREDIT)
    task = get_task(cfg, data_dir)
    agg = SecureAggregator(public_ctx)
    evaluator = designated_evaluator(cfg, task, agg, simulation=False)
    assert evaluator.ctx is None and evaluator.statement.startswith("none: in deployment")
    meta = secure_meta(cfg, agg, evaluator)
    assert meta["evaluation"].startswith("no evaluator key")
    assert meta["evaluator"] == evaluator.statement
    assert evaluator.plaintext(ArrayRecord({CT: Array(np.zeros(8, np.uint8))})) is None
