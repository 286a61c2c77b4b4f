"""The Flower adapter (fedapp/core/flower_compat.py): every private or semi-private Flower API
fedapp relies on, exercised here so that an upgrade that moves or changes one fails here,
loudly, instead of somewhere in a run. And a guard: nothing else imports them."""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, HTTPServer
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedapp.core.config import PROJECT_ROOT
from fedapp.core.flower_compat import (
    SUPERLINK_NODE_ID,
    ErrorCode,
    aggregate_arrayrecords,
    aggregate_metricrecords,
    build_fab_from_disk,
    build_fab_from_files,
    fab_config,
    fab_filename,
    fab_from_hub,
    fab_id_and_version,
    load_ed25519_private_key,
    load_supernode_auth_keys,
    load_trusted_entities,
    recorddict_from_bytes,
    recorddict_to_bytes,
    request_download_link,
    select_multikrum,
    set_message_id,
    set_src_node_id,
    set_task_identity,
    sign_fab_digest,
    validate_trusted_entities_ed25519,
    verify_fab,
)
from tests.conftest import TINY_APP


def test_message_ids_can_be_assigned_and_replies_point_to_them():
    set_task_identity(run_id=7, task_id=1, node_id=SUPERLINK_NODE_ID)
    msg = Message(RecordDict(), dst_node_id=42, message_type=MessageType.TRAIN)
    set_message_id(msg, "m-1")
    assert msg.metadata.message_id == "m-1" and msg.metadata.run_id == 7
    set_task_identity(node_id=42)
    reply = Message(RecordDict({"metrics": MetricRecord({"a": 1})}), reply_to=msg)
    assert reply.metadata.reply_to_message_id == "m-1"
    assert reply.metadata.src_node_id == 42 and reply.metadata.dst_node_id == SUPERLINK_NODE_ID
    error = Message(Error(ErrorCode.NODE_UNAVAILABLE, "gone"), reply_to=msg)
    assert error.has_error() and error.error.code == ErrorCode.NODE_UNAVAILABLE
    set_task_identity(run_id=1, task_id=1, node_id=0)


def test_a_replys_sender_can_be_restamped():
    msg = Message(RecordDict(), dst_node_id=42, message_type=MessageType.TRAIN)
    set_message_id(msg, "m-2")
    reply = Message(RecordDict(), reply_to=msg)
    set_src_node_id(reply, 7)
    assert reply.metadata.src_node_id == 7 and reply.metadata.reply_to_message_id == "m-2"


def test_recorddicts_survive_the_wire_format_with_their_arrays():
    records = RecordDict(
        {
            "arrays": ArrayRecord([np.arange(5, dtype=np.float32), np.ones((2, 3), np.int64)]),
            "metrics": MetricRecord({"a": 1, "b": [0.5, 2.0]}),
            "config": ConfigRecord({"s": "text", "raw": b"\x00\x01"}),
        }
    )
    back = recorddict_from_bytes(recorddict_to_bytes(records))
    assert set(back) == set(records)
    for a, b in zip(
        back["arrays"].to_numpy_ndarrays(), records["arrays"].to_numpy_ndarrays(), strict=True
    ):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert dict(back["metrics"]) == dict(records["metrics"])
    assert dict(back["config"]) == dict(records["config"])


def test_error_codes_fedapp_uses_exist_and_differ():
    codes = [
        ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
        ErrorCode.NODE_UNAVAILABLE,
        ErrorCode.CLIENT_APP_CRASHED,
        ErrorCode.MESSAGE_UNAVAILABLE,
    ]
    assert len(set(codes)) == 4 and all(isinstance(c, int) for c in codes)


def _record(value: float, n: int) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord([np.full(3, value, np.float32)]),
            "metrics": MetricRecord({"num-examples": n, "loss": value}),
        }
    )


def test_flowers_fedavg_math_is_the_weighted_mean():
    records = [_record(1.0, 10), _record(4.0, 30)]
    arrays = aggregate_arrayrecords(records, "num-examples")
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], np.full(3, 3.25))
    metrics = aggregate_metricrecords(records, "num-examples")
    assert metrics["loss"] == 3.25


def test_multikrum_selection_leaves_out_the_outlier():
    records = [_record(v, 10) for v in (1.0, 1.1, 0.9, 50.0)]
    selected = select_multikrum(records, 1, 2)
    assert len(selected) == 2 and all(r is not records[3] for r in selected)


# -- app signing (fedapp.features.appsign) ------------------------------------------------------------


def _ssh_private(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def _ssh_public(key) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


def _b64url(sig: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(sig).rstrip(b"=").decode("ascii")


def test_flowers_fab_builder_and_reader_agree(tmp_path):
    fab = build_fab_from_files({"pyproject.toml": TINY_APP, "tiny/__init__.py": b""})
    assert isinstance(fab, bytes)
    with zipfile.ZipFile(BytesIO(fab)) as archive:
        assert {"pyproject.toml", "tiny/__init__.py"} <= set(archive.namelist())
    config = fab_config(fab)
    assert config["project"]["name"] == "tinyapp"
    assert config["tool"]["flwr"]["app"]["publisher"] == "tester"
    assert fab_id_and_version(fab) == ("tester/tinyapp", "1.2.3")
    assert fab_filename(fab).endswith(".fab")
    prefix = fab_filename(fab).removesuffix(".fab").split(".")
    assert prefix[:3] == ["tester", "tinyapp", "1-2-3"] and len(prefix) == 4  # + hash prefix
    assert prefix[3] and hashlib.sha256(fab).hexdigest().startswith(prefix[3])
    # the same app on disk builds the same FAB (what `flwr run <folder>` sends)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "pyproject.toml").write_bytes(TINY_APP)
    (tmp_path / "tiny" / "__init__.py").write_bytes(b"")
    assert fab_id_and_version(build_fab_from_disk(tmp_path)) == ("tester/tinyapp", "1.2.3")
    assert build_fab_from_disk(str(tmp_path)) == build_fab_from_disk(tmp_path)


def test_flowers_app_signature_is_ed25519_over_signed_at_and_the_fab_digest(tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "signing").write_bytes(_ssh_private(key))
    loaded = load_ed25519_private_key(tmp_path / "signing")
    assert loaded.private_bytes_raw() == key.private_bytes_raw()
    (tmp_path / "ec").write_bytes(_ssh_private(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(ValueError, match="not Ed25519"):
        load_ed25519_private_key(str(tmp_path / "ec"))
    digest = hashlib.sha256(b"a fab").digest()
    sig = sign_fab_digest(key, digest, 1_700_000_000)
    key.public_key().verify(sig, (1_700_000_000).to_bytes(8, "big") + digest)  # raises if not


def test_flowers_supernode_accepts_only_a_trusted_signature_of_these_bytes(tmp_path):
    fab = build_fab_from_files({"pyproject.toml": TINY_APP})
    key, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    signed_at = 1_700_000_000
    good = {
        "public_key_id": "op",
        "signature": _b64url(sign_fab_digest(key, hashlib.sha256(fab).digest(), signed_at)),
        "signed_at": signed_at,
    }
    record = fab_from_hub(fab, [good])
    assert record.hash_str == hashlib.sha256(fab).hexdigest() and record.content == fab
    assert record.verifications["valid_license"]
    assert json.loads(record.verifications["op"]) == {
        "signature": good["signature"],
        "signed_at": signed_at,
    }
    assert fab_from_hub(fab, []).verifications == {"valid_license": "Valid"}
    (tmp_path / "trusted.yaml").write_text(f"op: {json.dumps(_ssh_public(key))}\n")
    entities = load_trusted_entities(tmp_path / "trusted.yaml")
    assert entities == {"op": _ssh_public(key)}
    assert load_trusted_entities(None) is None
    validate_trusted_entities_ed25519(entities)  # returns (it exits the process otherwise)
    assert verify_fab(record, entities) is True
    assert verify_fab(fab_from_hub(fab + b"x", [good]), entities) is False
    assert verify_fab(fab_from_hub(fab, []), entities) is False
    assert verify_fab(record, {"op": _ssh_public(other)}) is False
    assert verify_fab(record, {"someone-else": _ssh_public(key)}) is False
    # fedapp.features.appsign mirrors the SuperNode's decision: a license, then a trusted signature
    from flwr.supernode import start_client_internal

    source = inspect.getsource(start_client_internal._pull_and_store_message)
    assert "valid_license" in source and "_verify_fab(" in source


def test_flowers_supernode_reads_its_authentication_key(tmp_path):
    key = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "node.key").write_bytes(_ssh_private(key))
    pair = load_supernode_auth_keys(tmp_path / "node.key")
    assert pair is not None
    private, public = pair
    assert private.private_numbers() == key.private_numbers()
    assert public.public_numbers() == key.public_key().public_numbers()
    assert load_supernode_auth_keys(None) is None


def test_the_superlinks_fetch_fab_request():
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            found = body["app_version"] in ("1.0.0", None)
            reply = (
                {"fab_url": "http://x/a.fab", "verifications": [{"public_key_id": "op"}]}
                if found
                else {"detail": {"available_app_versions": ["1.0.0"]}}
            )
            data = json.dumps(reply).encode()
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hub/fetch-fab"
    try:
        assert request_download_link("@tester/app", "1.0.0", url, "fab_url") == (
            "http://x/a.fab",
            [{"public_key_id": "op"}],
            None,
        )
        assert request_download_link("@tester/app", None, url, "fab_url")[0] == "http://x/a.fab"
        with pytest.raises(ValueError, match="not found"):
            request_download_link("@tester/app", "9.9.9", url, "fab_url")
    finally:
        server.shutdown()
        server.server_close()
    assert [(b["app_id"], b["app_version"]) for b in seen] == [
        ("@tester/app", "1.0.0"),
        ("@tester/app", None),
        ("@tester/app", "9.9.9"),
    ]
    assert all(set(b) == {"app_id", "app_version", "flwr_version"} for b in seen)


def test_the_adapter_imports_flowers_runtime_modules_only_when_used():
    """`import fedapp.core.flower_compat` must stay cheap: the SuperLink, SuperNode and CLI
    modules behind the app-signing wrappers are imported on first call only."""
    import subprocess
    import sys

    code = (
        "import sys, fedapp.core.flower_compat; "
        "print([m for m in ('flwr.superlink', 'flwr.supernode', 'flwr.cli') if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


# Private Flower/flwr-datasets modules or attributes, and where they may appear.
FORBIDDEN = [
    r"flwr\.common\.constant",
    r"flwr\.supercore",
    r"strategy_utils",
    r"flwr\.serverapp\.strategy\.multikrum",
    r"__dict__\[",
    r"_construct_messages",
    r"_determine_partition_id_to_indices",
    r"TaskIdentity",
    r"flwr\.superlink\b",
    r"flwr\.supernode\b",
    r"flwr\.cli\b",
    r"flwr\.common\.config\b",
]


def test_no_private_flower_api_outside_the_adapter():
    offenders = []
    for pkg in ("fedapp", "strategies", "tasks", "bench", "tests"):
        for path in sorted((PROJECT_ROOT / pkg).rglob("*.py")):
            if path.name in ("flower_compat.py", Path(__file__).name):
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if any(re.search(p, line) for p in FORBIDDEN):
                    offenders.append(f"{path.relative_to(PROJECT_ROOT)}:{i}: {line.strip()}")
    assert not offenders, "use fedapp.core.flower_compat instead:\n" + "\n".join(offenders)
