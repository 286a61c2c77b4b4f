"""A SuperNode's partition id, bound to the key it registered (deployment).

Flower's SuperNode authentication makes sure a message reaches the holder of a registered
key, but the ServerApp sees only node ids: it cannot tell which institution a node is, so a
registered SuperNode could claim another institution's `partition-id` at discovery and take
its messages and its weight. The binding:

- the operator keeps a registry `node_keys` (YAML: partition id -> the OpenSSH public key it
  registered with `flwr supernode register` for that institution, or the path of that .pub);
- its discovery message carries a fresh random nonce (`secrets`);
- a node that holds its own data signs `fedapp partition claim v1|<nonce>|<partition id>`
  with its SuperNode private key (`auth-key=` in its node config: the file it passes to
  `flower-supernode --auth-supernode-private-key`);
- the server verifies the signature with the key registered for that partition id; a node
  that cannot is refused (not used; `meta.nodes_refused` in results.json says why).

Signatures are ECDSA (SHA-384, the P-384 keys `fedapp-certs` makes) or Ed25519 through the
`cryptography` package; nothing here is our own cryptography.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from fedapp.core.config import ConfigError

CONTEXT = b"fedapp partition claim v1"


def new_nonce() -> str:
    return secrets.token_hex(32)


def claim(nonce: str, partition_id: int) -> bytes:
    return b"|".join([CONTEXT, str(nonce).encode(), str(int(partition_id)).encode()])


def sign_claim(key_path: str | Path, nonce: str, partition_id: int) -> bytes:
    """The node's signature of its claim, with its SuperNode private key (OpenSSH or PEM)."""
    data = Path(key_path).expanduser().read_bytes()
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except ValueError:
        key = serialization.load_pem_private_key(data, password=None)
    message = claim(nonce, partition_id)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA384()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    raise ConfigError(f"auth-key {key_path}: an ECDSA or Ed25519 key is needed")


def _public_key(text: str):
    text = text.strip()
    if not text.startswith(("ecdsa-", "ssh-ed25519")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ConfigError(f"node_keys: {text!r} is neither an OpenSSH public key nor a file")
        text = path.read_text().strip()
    return serialization.load_ssh_public_key(text.encode())


def load_node_keys(path: str | Path | None) -> dict[int, Any] | None:
    """The operator's registry (see the module docstring); None when not configured."""
    if not path:
        return None
    from omegaconf import OmegaConf

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ConfigError(f"node_keys={path}: no such file (partition id -> public key, YAML)")
    raw = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    if not isinstance(raw, dict):
        raise ConfigError(f"node_keys={path}: a mapping of partition id -> public key")
    try:
        return {int(k): _public_key(str(v)) for k, v in raw.items()}
    except ValueError as err:
        raise ConfigError(f"node_keys={path}: {err}") from err


def verify_claim(public_key, nonce: str, partition_id: int, signature: bytes) -> bool:
    message = claim(nonce, partition_id)
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(bytes(signature), message, ec.ECDSA(hashes.SHA384()))
        else:
            public_key.verify(bytes(signature), message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def claim_refusal(
    node_keys: Mapping[int, Any] | None, partition_id: int, nonce: str, signature: bytes
) -> str | None:
    """Why a node holding its own data may not serve `partition_id` (None: it may)."""
    if node_keys is None:
        return None
    key = node_keys.get(int(partition_id))
    if key is None:
        return f"partition-id {partition_id} has no registered key in node_keys"
    if not signature:
        return (
            f"it did not prove it holds the key registered for partition-id {partition_id} "
            "(no auth-key in its node config)"
        )
    if not verify_claim(key, nonce, partition_id, signature):
        return (
            f"its signature does not verify against the key registered for partition-id "
            f"{partition_id}: another institution's partition id?"
        )
    return None
