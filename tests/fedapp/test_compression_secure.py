"""Compressed updates (fedapp/features/compression.py) and encrypted aggregation (fedapp/features/secure.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedapp.checks import compose
from fedapp.cli.inline import run_inline
from fedapp.core.config import ConfigError
from fedapp.features.compression import (
    CompressionSpec,
    decode,
    decode_int8,
    encode,
    encode_int8,
    topk,
)
from fedapp.features.secure import (
    PUBLIC,
    SECRET,
    SecureSpec,
    create_keys,
    decrypt,
    encrypt,
    load_context,
    weighted_sum,
)

floats = st.floats(-1e3, 1e3, allow_nan=False, width=32)
vectors = hnp.arrays(np.float32, st.integers(1, 700), elements=floats)


# -- codecs ------------------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(v=vectors)
def test_fp16_round_trip_is_within_half_precision(v):
    spec = CompressionSpec("fp16")
    enc, _ = encode({"w": v}, spec, {})
    back = decode(enc, spec, {"w": v})["w"]
    assert enc["#fp16"].dtype == np.float16 and back.dtype == np.float32
    np.testing.assert_allclose(back, v, rtol=2**-11, atol=1e-4)


@settings(max_examples=50, deadline=None)
@given(v=vectors, block=st.sampled_from([1, 7, 64, 256]))
def test_int8_error_is_at_most_half_a_step_of_its_block(v, block):
    q, scales = encode_int8(v, block)
    assert q.dtype == np.int8 and len(scales) == -(-len(v) // block)
    back = decode_int8(q, scales, block)
    step = np.repeat(scales, block)[: len(v)]
    assert np.all(np.abs(back - v) <= step / 2 + 1e-6 * np.abs(v) + 1e-30)


@settings(max_examples=50, deadline=None)
@given(v=vectors, ratio=st.sampled_from([0.01, 0.1, 0.5]), data=st.data())
def test_topk_sends_the_largest_and_carries_exactly_the_rest(v, ratio, data):
    spec = CompressionSpec("topk", ratio=ratio)
    old = data.draw(hnp.arrays(np.float32, v.shape, elements=floats))
    enc, residual = encode({"w": v}, spec, {"w": old})
    sent = decode(enc, spec, {"w": v})["w"]
    u = v + old
    # what was sent and what is carried add up to exactly the update plus the old residual
    np.testing.assert_array_equal(sent + residual["w"], u)
    k = len(enc["#idx"])
    assert k == max(1, int(np.ceil(ratio * v.size)))
    kept = np.abs(u.ravel()[enc["#idx"]])
    assert kept.min() >= np.abs(np.delete(u.ravel(), enc["#idx"])).max(initial=0.0)
    idx, _ = topk(u, ratio)
    np.testing.assert_array_equal(idx, enc["#idx"])


@settings(max_examples=30, deadline=None)
@given(
    layers=st.lists(
        hnp.arrays(np.float32, st.integers(1, 300), elements=floats), min_size=1, max_size=5
    ),
    codec=st.sampled_from(["fp16", "int8", "topk"]),
)
def test_layers_are_packed_into_one_message_and_unpacked_in_place(layers, codec):
    """Each codec sends two arrays at most, whatever the number of layers, and the server puts
    every value back in its own layer even when its model lists the layers in another order."""
    spec = CompressionSpec(codec, block=64, ratio=0.1)
    update = {f"layer{i}": v for i, v in enumerate(layers)}
    update["num_batches"] = np.array([3], dtype=np.int64)  # non-float arrays go as they are
    enc, _ = encode(update, spec, {})
    assert set(enc) - {"num_batches"} == set(
        {"fp16": ["#fp16"], "int8": ["#int8", "#scale"], "topk": ["#idx", "#val"]}[codec]
    )
    layout = dict(reversed(list(update.items())))
    back = decode(enc, spec, layout)
    np.testing.assert_array_equal(back["num_batches"], update["num_batches"])
    for key, v in enumerate(layers):
        one, _ = encode({"w": v}, spec, {})  # the same as encoding that layer alone
        np.testing.assert_array_equal(back[f"layer{key}"], decode(one, spec, {"w": v})["w"])


def test_a_reply_that_does_not_fit_the_model_is_refused():
    spec = CompressionSpec("int8", block=4)
    layout = {"a": np.zeros(10, np.float32), "b": np.zeros(3, np.float32)}
    enc, _ = encode(layout, spec, {})
    with pytest.raises(ValueError, match="#int8 holds 13 values, the model needs 14"):
        decode(enc, spec, {**layout, "c": np.zeros(1, np.float32)})
    spec = CompressionSpec("topk", ratio=0.5)
    enc, _ = encode(layout, spec, {})
    enc["#idx"] = enc["#idx"] + 13
    with pytest.raises(ValueError, match="outside the model's 13 values"):
        decode(enc, spec, layout)


def test_bad_compression_settings_are_refused():
    with pytest.raises(ValueError, match="compression.ratio"):
        CompressionSpec.from_config({"name": "topk", "ratio": 0})
    with pytest.raises(ConfigError, match="secure=ckks cannot be combined"):
        compose("secure=ckks compression=int8")


CREDIT = (
    "task=credit partition=iid partition.num_partitions=6 rounds=2 clients_per_round=4 "
    "eval_clients_per_round=0 checkpoint=false train.local_epochs=1"
)


def _results(tmp_path, extra):
    out = run_inline(f"{CREDIT} {extra}", tmp_path / extra.replace(" ", "_").replace("=", "-"))
    return json.loads((out / "results.json").read_text())


def test_byte_counts_are_the_encoded_sizes_and_learning_survives(tmp_path, data_dir):
    import torch
    from flwr.app import ArrayRecord

    from tasks import get_task

    plain = _results(tmp_path, "compression=none")
    task = get_task(compose(CREDIT), data_dir)
    layout = {k: v.numpy() for k, v in task.make_model().state_dict().items()}
    for name, extra in (("int8", "compression=int8"), ("topk", "compression=topk")):
        res = _results(tmp_path, extra)
        spec = CompressionSpec.from_config(compose(f"{CREDIT} {extra}").compression)
        enc, _ = encode({k: np.ones_like(v) for k, v in layout.items()}, spec, {})
        size = ArrayRecord({k: torch.as_tensor(v) for k, v in enc.items()}).count_bytes()
        for r in res["rounds"][1:]:
            assert r["bytes_up"] == r["num_replies"] * size, name
            assert r["bytes_up"] < plain["rounds"][1]["bytes_up"]
        if name == "int8":  # ~lossless
            assert res["rounds"][-1]["test_roc_auc"] == pytest.approx(
                plain["rounds"][-1]["test_roc_auc"], abs=0.005
            )
        assert res["rounds"][-1]["test_roc_auc"] > 0.65


# -- CKKS --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    create_keys(folder, SecureSpec(name="ckks"))
    return load_context(folder / SECRET, need_secret=True), load_context(folder / PUBLIC, False)


@settings(max_examples=15, deadline=None)
@given(
    data=st.data(),
    k=st.integers(1, 5),
    n=st.integers(1, 5000),
)
def test_encrypt_weight_sum_decrypt_is_the_weighted_sum(keys, data, k, n):
    secret, public = keys
    vs = [
        data.draw(hnp.arrays(np.float64, n, elements=st.floats(-100, 100, allow_nan=False)))
        for _ in range(k)
    ]
    w = data.draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k))
    total = weighted_sum(public, [encrypt(secret, v) for v in vs], w)  # the server's side
    expected = sum(wi * vi for wi, vi in zip(w, vs, strict=True))
    np.testing.assert_allclose(decrypt(secret, total), expected, atol=1e-5)


def test_the_servers_context_cannot_decrypt(keys):
    secret, public = keys
    assert secret.has_secret_key() and not public.has_secret_key()
    blob = encrypt(secret, np.arange(10.0))
    with pytest.raises(ValueError, match="secret"):
        decrypt(public, blob)


def test_strategies_that_need_plaintext_updates_are_refused():
    for strategy in (
        "trust",
        "contribution",
        "fedmedian",
        "krum",
        "scaffold",
        "tiered",
        "fedasync",
    ):
        with pytest.raises(
            ConfigError, match=f"secure=ckks cannot be combined with strategy={strategy}"
        ):
            compose(f"secure=ckks strategy={strategy}")
    for strategy in ("fedavg", "fedprox", "fednova", "moon"):
        compose(f"secure=ckks strategy={strategy}")


@pytest.mark.parametrize(
    "strategy",
    [
        "fedavg",
        "fednova",
        # the rest of the README's support table
        *(pytest.param(s, marks=pytest.mark.slow) for s in ("fedprox", "moon", "fedavg_deadline")),
    ],
)
def test_encrypted_runs_match_plain_ones(tmp_path, data_dir, strategy, monkeypatch):
    from fedapp.features.secure import CLIENT_HOME_ENV, SecureSpec, client_key_dir

    monkeypatch.setenv(CLIENT_HOME_ENV, str(tmp_path / "client-home"))
    plain = _results(tmp_path, f"strategy={strategy}")
    enc = _results(tmp_path, f"strategy={strategy} secure=ckks")
    for p, e in zip(plain["rounds"], enc["rounds"], strict=True):
        assert e["test_roc_auc"] == pytest.approx(p["test_roc_auc"], abs=1e-6)
        assert e["test_loss"] == pytest.approx(p["test_loss"], abs=1e-5)
    secure = enc["meta"]["secure"]
    assert secure["server_key"].startswith("public context only")
    assert enc["rounds"][1]["bytes_up"] > 10 * plain["rounds"][1]["bytes_up"]  # ciphertexts
    # the key: made on the clients' side, outside the run's folder; the server got the public
    # context from the clients, all of which hold the same key
    out = Path(enc["meta"]["output_dir"])
    assert not list(out.rglob("*.ckks")) and enc["config"]["secure"]["key_dir"] is None
    secret = client_key_dir(SecureSpec(name="ckks")) / SECRET
    assert secret.stat().st_mode & 0o777 == 0o600
    assert secure["clients_refused"] == {} and secure["clients_checked"] == 6
    assert secure["public_context_from"].endswith("public context (no secret key)")
    assert (
        secure["evaluator"].startswith("simulation exception")
        and str(secret) in secure["evaluator"]
    )


# one of each kind in the default suite (extra records, scoring, event-driven); the rest: slow
_FAST = {"scaffold", "tiered"}
STRATEGIES = [
    pytest.param(s, marks=() if s in _FAST else pytest.mark.slow)
    for s in sorted(
        p.stem for p in (Path(__file__).parents[2] / "conf" / "strategy").glob("*.yaml")
    )
    if s != "synthetic"  # sends rows, not updates: the README's table says no (and it is refused)
]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_learns_from_int8_updates(tmp_path, data_dir, strategy):
    """The README's support table says compression works with every strategy: each one
    aggregates decoded updates (event-driven ones against the model each client started from)
    and what travels up is the int8 size."""
    from flwr.app import ArrayRecord

    from tasks import get_task

    extra = f"strategy={strategy} compression=int8"
    res = _results(tmp_path, extra)
    assert res["meta"]["status"] == "completed", res["meta"].get("status_detail")
    layout = get_task(compose(CREDIT), data_dir).make_model().state_dict()
    plain_size = ArrayRecord(dict(layout)).count_bytes()
    for r in res["rounds"][1:]:
        assert r["num_replies"] > 0 and r["aggregated"]
        # int8 + one float32 scale per 256 values: under a third of float32 (SCAFFOLD's
        # controls travel beside the update, uncompressed)
        per_reply = r["bytes_up"] / r["num_replies"]
        assert per_reply < (1.4 if strategy == "scaffold" else 0.34) * plain_size
    assert np.isfinite(res["rounds"][-1]["test_loss"])
    assert res["rounds"][-1]["test_roc_auc"] > 0.6
