"""The one place where fedapp touches Flower or flwr-datasets beyond their public APIs.

Flower 1.41 has no public way to do a few things fedapp needs; each is wrapped here, with a
test in `tests/fedapp/test_flower_compat.py` that fails loudly when an upgrade moves or
changes it. Nothing else in the code base may import a private Flower module or write a
Flower object's private attributes.

| what | why it is not public | used by |
|---|---|---|
| `set_message_id` | only the SuperLink assigns message ids (`Metadata` has no setter) | the in-process engine and the clock's synthetic error replies |
| `set_src_node_id` | only the SuperLink stamps a reply's sender (`Metadata` has no setter) | `ClientGrid`: a reply from a shared SuperNode is stamped with the client it answers for |
| `recorddict_to_bytes`, `recorddict_from_bytes` | Flower's own RecordDict wire format (`flwr.common.serde`, protobuf) | a virtual client's state file (no pickle) |
| `set_task_identity` | the identity a ServerApp/ClientApp process runs under (`flwr.supercore`) | the in-process engine; tests that build replies |
| `ErrorCode` | the codes of `Error` replies live in `flwr.common.constant` | the clock, the in-process engine |
| `aggregate_arrayrecords`, `aggregate_metricrecords` | Flower's FedAvg math, in `flwr.serverapp.strategy.strategy_utils` | strategies that reuse FedAvg's average |
| `select_multikrum` | Multi-Krum's selection, a module-level function of `flwr.serverapp.strategy.multikrum` | effective shares of Krum/Multi-Krum |
| `load_ed25519_private_key`, `sign_fab_digest` | Flower's app-signing primitives and signed message (`signed_at`, 8 bytes big-endian, + sha256 of the FAB), in `flwr.supercore.primitives.asymmetric_ed25519` | `fedapp.features.appsign` (signing a FAB) |
| `build_fab_from_disk`, `build_fab_from_files` | the FAB builder of `flwr build`/`flwr run`, in `flwr.cli.build` (lazy: pulls in the CLI) | `fedapp.features.appsign`; the tests' tiny FABs |
| `fab_config`, `fab_id_and_version`, `fab_filename` | a FAB's `pyproject.toml`, its `publisher/name` and version, and its file name, in `flwr.common.config` and `flwr.cli.build` | `fedapp.features.appsign` (naming and indexing signed FABs) |
| `fab_from_hub` | the SuperLink's `Fab` of an app fetched by name: private `_format_verification` of `flwr.superlink.servicer.control.control_handlers`, `Fab` of `flwr.supercore.fab` (lazy) | `fedapp.features.appsign.verify_with_flower` |
| `verify_fab` | the SuperNode's signature check under `--trusted-entities`, private `_verify_fab` of `flwr.supernode.start_client_internal` (lazy) | `fedapp.features.appsign.verify_with_flower` |
| `load_trusted_entities`, `validate_trusted_entities_ed25519`, `load_supernode_auth_keys` | how `flower-supernode` reads `--trusted-entities` and `--auth-supernode-private-key`, private functions of `flwr.supernode.cli.flower_supernode` (lazy; they exit the process on a bad file, as the SuperNode does) | `fedapp.features.appsign.verify_with_flower`; the credentials tests |
| `request_download_link` | the SuperLink's `fetch-fab` request to the app platform, in `flwr.supercore.utils` (lazy) | the test of the app index (`fedapp.features.appsign.serve_apps`) |

The lazy ones import their Flower module on first call: those modules pull in Flower's
SuperLink, SuperNode or CLI, which `import fedapp.core.flower_compat` must not pay for.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.constant import ErrorCode as _ErrorCode
from flwr.common.serde import recorddict_from_proto as _rd_from_proto
from flwr.common.serde import recorddict_to_proto as _rd_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as _ProtoRecordDict
from flwr.serverapp.strategy.multikrum import select_multikrum as _select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords as _agg_arrays
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords as _agg_metrics
from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign as _message_to_sign
from flwr.supercore.primitives.asymmetric_ed25519 import load_private_key as _load_private_key
from flwr.supercore.primitives.asymmetric_ed25519 import sign_message as _sign_message
from flwr.supercore.task_identity import TaskIdentity

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from flwr.supercore.fab import Fab

__all__ = [
    "SUPERLINK_NODE_ID",
    "ErrorCode",
    "aggregate_arrayrecords",
    "aggregate_metricrecords",
    "select_multikrum",
    "recorddict_from_bytes",
    "recorddict_to_bytes",
    "set_message_id",
    "set_src_node_id",
    "set_task_identity",
    "load_ed25519_private_key",
    "sign_fab_digest",
    "build_fab_from_disk",
    "build_fab_from_files",
    "fab_config",
    "fab_id_and_version",
    "fab_filename",
    "fab_from_hub",
    "verify_fab",
    "load_trusted_entities",
    "validate_trusted_entities_ed25519",
    "load_supernode_auth_keys",
    "request_download_link",
]

ErrorCode = _ErrorCode
aggregate_arrayrecords = _agg_arrays
aggregate_metricrecords = _agg_metrics
select_multikrum = _select_multikrum


def set_message_id(msg: Message, message_id: str) -> None:
    """Give `msg` the id a SuperLink would have given it (Flower writes the same field)."""
    msg.metadata.__dict__["_message_id"] = message_id


def set_src_node_id(msg: Message, node_id: int) -> None:
    """Stamp `msg` as sent by `node_id` (the field the SuperLink fills in on a reply)."""
    msg.metadata.__dict__["_src_node_id"] = int(node_id)


def recorddict_to_bytes(records: RecordDict) -> bytes:
    """A RecordDict in Flower's protobuf wire format (arrays included)."""
    return _rd_to_proto(records).SerializeToString()


def recorddict_from_bytes(data: bytes) -> RecordDict:
    proto = _ProtoRecordDict()
    proto.ParseFromString(data)
    return _rd_from_proto(proto)


def set_task_identity(
    run_id: int | None = None, task_id: int | None = None, node_id: int | None = None
) -> None:
    """Set the run, task and node this process speaks for (what Flower's runtime sets before
    it calls a ServerApp or ClientApp). Fields left None are not changed."""
    if run_id is not None:
        TaskIdentity.run_id = run_id
    if task_id is not None:
        TaskIdentity.task_id = task_id
    if node_id is not None:
        TaskIdentity.node_id = node_id


# -- app signing (`fedapp.features.appsign`): Flower's FAB builder, signatures and checks ------------


def load_ed25519_private_key(path: Path | str) -> ed25519.Ed25519PrivateKey:
    """An SSH-format Ed25519 private key, read as Flower reads app-signing keys (ValueError
    if it is another kind of key)."""
    return _load_private_key(Path(path))


def sign_fab_digest(key: ed25519.Ed25519PrivateKey, fab_digest: bytes, signed_at: int) -> bytes:
    """The raw Ed25519 signature of Flower's signed message for a FAB: `signed_at` (8 bytes,
    big-endian) followed by the FAB's sha256 digest."""
    return _sign_message(key, _message_to_sign(fab_digest, signed_at))


def build_fab_from_disk(app_dir: Path | str) -> bytes:
    """The FAB `flwr run <app_dir>` would send (Flower's own builder, its include/exclude
    rules)."""
    from flwr.cli.build import build_fab_from_disk as _build

    return _build(Path(app_dir))


def build_fab_from_files(files: Mapping[str, bytes | Path]) -> bytes:
    """A FAB built by Flower's builder from in-memory files {relative path: content}."""
    from flwr.cli.build import build_fab_from_files as _build

    return _build(files)[0]


def fab_config(fab: bytes | Path) -> dict[str, Any]:
    """The `pyproject.toml` of a FAB, as a dict (Flower's reader, which validates the FAB)."""
    from flwr.common.config import get_fab_config

    return get_fab_config(fab)


def fab_id_and_version(fab: bytes | Path) -> tuple[str, str]:
    """A FAB's `publisher/name` (no "@") and version, as Flower reads them."""
    from flwr.common.config import get_metadata_from_config

    return get_metadata_from_config(fab_config(fab))


def fab_filename(fab: bytes) -> str:
    """The file name `flwr build` gives this FAB."""
    from flwr.cli.build import get_fab_filename

    return get_fab_filename(fab_config(fab), hashlib.sha256(fab).hexdigest())


def fab_from_hub(fab: bytes, verifications: list[dict]) -> Fab:
    """The `Fab` a SuperLink hands its SuperNodes for an app it fetched by name, with the
    verification records the platform returned ({public_key_id, signature, signed_at}, ...)
    in Flower's format (one JSON string per key id, plus `valid_license`)."""
    from flwr.supercore.fab import Fab
    from flwr.superlink.servicer.control.control_handlers import _format_verification

    return Fab(hashlib.sha256(fab).hexdigest(), fab, _format_verification(verifications))


def verify_fab(fab: Fab, trusted_entities: dict[str, str]) -> bool:
    """The SuperNode's signature check of `fab` under `--trusted-entities` (True when one
    trusted key's signature verifies; `valid_license` is checked by the caller, as Flower's
    SuperNode checks it before)."""
    from flwr.supernode.start_client_internal import _verify_fab

    return _verify_fab(fab, trusted_entities)


def load_trusted_entities(path: Path | str | None) -> dict[str, str] | None:
    """The `--trusted-entities` YAML file as `flower-supernode` reads it (None for no path;
    exits the process on a missing or malformed file, as the SuperNode does)."""
    from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities

    return _try_obtain_trusted_entities(None if path is None else Path(path))


def validate_trusted_entities_ed25519(trusted_entities: dict[str, str]) -> None:
    """`flower-supernode`'s check that every trusted key is Ed25519 (exits the process if
    one is not)."""
    from flwr.supernode.cli.flower_supernode import _validate_public_keys_ed25519

    _validate_public_keys_ed25519(trusted_entities)


def load_supernode_auth_keys(
    private_key_path: Path | str | None,
) -> tuple[ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey] | None:
    """The key pair `flower-supernode --auth-supernode-private-key PATH` authenticates with
    (None for no path; exits the process if the file is not an EC private key)."""
    from argparse import Namespace

    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    return _try_setup_client_authentication(
        Namespace(
            auth_supernode_private_key=str(private_key_path) if private_key_path else None,
            auth_supernode_public_key=None,
        )
    )


def request_download_link(
    app_id: str, app_version: str | None, in_url: str, out_url: str
) -> tuple[str, list[dict[str, str]] | None, str | None]:
    """The SuperLink's request for an app to the platform API at `in_url`: (download URL from
    the response's `out_url` key, verifications, compatibility note); ValueError if the app
    or version is not found."""
    from flwr.supercore.utils import request_download_link as _request

    return _request(app_id, app_version, in_url, out_url)
