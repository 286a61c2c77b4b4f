"""Encrypted aggregation (`secure=ckks`): the server never holds one client's update in the clear.

CKKS homomorphic encryption through TenSEAL (no cryptography of ours). The server (operator)
is not trusted by an institution, so every key decision is made on the institutions' side:

- **Keys**: one CKKS secret context per federation, created by the institutions, never by the
  operator and never inside a results folder. Deployment: one institution runs `fedapp-keys
  create DIR` (DIR/secret.ckks, mode 0600 from its creation, and DIR/public.ckks), shares
  secret.ckks with the other institutions out of band and gives the operator public.ckks only;
  each SuperNode reads its secret context from its own node config (`--node-config
  "ckks-secret=/path/secret.ckks"`), never from the run config (the server's). Simulation and
  the in-process engine: a client without `ckks-secret` (from the per-client policy,
  fedapp.core.policy) uses the client side's key folder, `$FEDAPP_CLIENT_HOME/ckks/<parameters>/`
  (default `~/.cache/fedapp/client/...`), created once, atomically, mode 0600.
- **The server** holds the public context only: it asks every client (`query.keys`) for the
  fingerprint of its key (sha256 of its public key and parameters), takes the public context
  from a client holding the majority's key (or from `secure.key_dir/public.ckks`, the
  operator's copy, which the clients must then match), refuses a context that holds a secret
  key before SEAL parses it, and records the clients whose key differs (their replies are
  rejected).
- **A round**: each client checks and decrypts the global model it receives, trains, and sends
  Enc(y_k) (FedNova: also Enc(d_k), its change per effective step). The server screens every
  reply's ciphertexts against the public context (size, CKKS parameters, level, scale; a bad
  one is a rejected reply with its reason, never a crash), weights and adds them with the
  plaintext weights it already knows from the clients' `num-examples` (and steps): Enc(x') =
  sum_k p_k Enc(y_k) (FedNova: + sum_k p_k (a_k - tau_eff) Enc(d_k)), and sends Enc(x') on.
- **The client's checks** (`check_global_model`) before it uses a received global model: it
  deserialises under its own parameters, has exactly the model's number of values, is not a
  fresh ciphertext forwarded as is (it went through the server's weighted sum), decrypts to
  finite values, and its L2 norm is at most the node's `max-model-norm` (default 1e6: the
  models of every task here have norms of 3 to 20 at initialisation, a ciphertext made under
  another key decrypts to norms above 1e15). A refused model is an error reply with the reason.
- **Evaluation**: clients evaluate the decrypted model (federated evaluation). Server-side test
  metrics need a party holding the secret key: in deployment there is none (they are empty);
  in a simulation, where operator and institutions are one party on one machine, the ServerApp
  reads the client side's key folder (stated in `meta.secure.evaluator`; never the strategy).
- **Limits** (exact statements in `COLLUSION_LIMIT` and `AUTHENTICATION_LIMIT`, written to
  `meta.secure` and the README): the secret key is shared (no threshold or multi-key CKKS is
  usable here), so the operator with any one institution decrypts every update, and the server
  can route one client's ciphertext to another; ciphertexts are not authenticated.
- **Strategies**: FedAvg, FedProx and MOON (FedAvg's average) and FedNova work under encryption;
  every other one needs each client's plaintext update and is refused at start-up with the
  reason, as are compression (ciphertexts do not quantise) and central DP.
- Not covered: the server sees each client's `num-examples`, training steps and metrics (the
  plaintext weights), and the sizes and timing of messages.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from omegaconf import DictConfig

from fedapp.core.config import ConfigError
from fedapp.core.files import create_exclusive

CT = "ckks-ct"  # the ciphertext of a model (uint8 bytes) in an ArrayRecord
CT_DELTA = "ckks-d"  # FedNova: the ciphertext of the change per effective step
SECRET, PUBLIC = "secret.ckks", "public.ckks"
KEYS_QUERY = f"{MessageType.QUERY}.keys"  # a client's key fingerprint (and public context)
KEYS_RECORD, PUBLIC_RECORD = "ckks", "ckks-public"
CLIENT_HOME_ENV = "FEDAPP_CLIENT_HOME"  # the client side's folder (simulation keys)
MAX_MODEL_NORM = 1e6  # default of a node's `max-model-norm`

COLLUSION_LIMIT = (
    "one CKKS secret key is shared by every institution (no threshold or multi-key CKKS is "
    "usable here: TenSEAL has none, OpenFHE's wheels are built for CPython 3.10/3.12 only, "
    "Flower 1.41's SecAgg+ exists only for the legacy strategy API). Hence: any one institution "
    "can decrypt every ciphertext of the federation, so the operator together with any one "
    "institution learns every individual update; and the server can send one client's "
    "ciphertext to another client as 'the global model' (multiplied by 1.0, or mixed with "
    "little of the others), which that client cannot tell from an aggregate: it decrypts, "
    "trains on and evaluates the other institution's model, so it holds that model, and the "
    "server alone learns that model's training and evaluation metrics on the receiving "
    "client's data. The only check against this is of form: a client refuses a fresh "
    "ciphertext forwarded as is (one that did not go through the server's weighted sum)."
)
AUTHENTICATION_LIMIT = (
    "ciphertexts are not authenticated (TenSEAL/SEAL have no authentication): the server "
    "rejects a reply whose ciphertext is malformed, of the wrong size, or under other CKKS "
    "parameters, level or scale than the public context's, but it cannot detect a ciphertext "
    "made under another key with the same parameters, nor well-formed random bytes; summed "
    "in, such a reply makes the aggregate decrypt to garbage, which every client then refuses "
    "(finite values and the norm bound), so one such client can stop the federation from "
    "learning, and reads nothing."
)


class SecureError(ConfigError):
    """Invalid encrypted-aggregation settings or key material; the message says what to do."""


class ModelRefused(SecureError):
    """A client refuses the global model it received (the reason is the error reply's, marked
    as a refusal by the node: the server counts it per client, fedapp.core.policy)."""

    def __init__(self, why: str) -> None:
        from fedapp.core.policy import REFUSED

        super().__init__(f"{REFUSED}: {why}")


@dataclass(frozen=True)
class SecureSpec:
    """The `secure` config group."""

    name: str = "none"
    key_dir: str = ""  # the operator's copy of public.ckks (server side only; optional)
    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> SecureSpec:
        if not cfg:
            return cls()
        spec = cls(
            name=str(cfg.get("name", "none")),
            key_dir=str(cfg.get("key_dir") or ""),
            poly_modulus_degree=int(cfg.get("poly_modulus_degree", 8192)),
            coeff_mod_bit_sizes=tuple(int(b) for b in cfg.get("coeff_mod_bit_sizes", (60, 40, 60))),
            scale_bits=int(cfg.get("scale_bits", 40)),
        )
        if spec.name not in ("none", "ckks"):
            raise SecureError(f"secure={spec.name}: use none or ckks")
        return spec

    @property
    def active(self) -> bool:
        return self.name == "ckks"

    @property
    def tag(self) -> str:
        """The parameters, as a folder name (the client side keeps one key per set)."""
        bits = "_".join(str(b) for b in self.coeff_mod_bit_sizes)
        return f"n{self.poly_modulus_degree}-q{bits}-s{self.scale_bits}"


def _tenseal():
    try:
        import tenseal
    except ImportError as err:  # pragma: no cover - a missing optional install
        raise SecureError("secure=ckks needs TenSEAL: pip install tenseal==0.3.18") from err
    return tenseal


# -- files --------------------------------------------------------------------------------------
def _within(path: Path | str, folder: Path | str | None) -> bool:
    if not folder:
        return False
    path, folder = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return path == folder or folder in path.parents


def _results_folder(path: Path) -> Path | None:
    """The fedapp results folder `path` lies in (one holding results.json or a checkpoint)."""
    for folder in [path, *path.parents]:
        if (folder / "results.json").exists() or (folder / "checkpoint.json").exists():
            return folder
    return None


# -- keys (the institutions' side) ---------------------------------------------------------------
def create_keys(
    directory: Path, spec: SecureSpec = SecureSpec(name="ckks"), *, exist_ok: bool = False
) -> tuple[Path, Path]:
    """Create a federation's CKKS context, on an institution's machine: `secret.ckks` (mode 0600
    from its creation; for the institutions only) and `public.ckks` (no secret key: for the
    operator). Additions and plaintext scalings only, so no Galois keys. Never in a results
    folder. `exist_ok`: keep a secret key that exists (or that a concurrent process created
    first) instead of failing."""
    ts = _tenseal()
    directory = Path(directory).expanduser()
    inside = _results_folder(directory.resolve())
    if inside is not None:
        raise SecureError(
            f"{directory} is inside the results folder {inside}; the secret key must live on "
            "the institutions' side, outside any results folder"
        )
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret, public = directory / SECRET, directory / PUBLIC
    if secret.exists():
        if not exist_ok:
            raise SecureError(f"{secret} exists; not replacing a federation's key")
        if not public.exists():  # a creator stopped between the two files: derive it
            blob = load_context(secret, need_secret=True).serialize(save_secret_key=False)
            create_exclusive(public, blob, 0o644)
        return secret, public
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=spec.poly_modulus_degree,
        coeff_mod_bit_sizes=list(spec.coeff_mod_bit_sizes),
    )
    ctx.global_scale = 2**spec.scale_bits
    if not create_exclusive(secret, ctx.serialize(save_secret_key=True), 0o600):
        if exist_ok:
            return secret, public
        raise SecureError(f"{secret} was created by another process; not replacing it")
    ctx.make_context_public()
    public_bytes = ctx.serialize(save_secret_key=False)
    if not create_exclusive(public, public_bytes, 0o644):
        public.unlink()  # a stale public context of an older key: replace it
        create_exclusive(public, public_bytes, 0o644)
    return secret, public


def client_home() -> Path:
    """The client side's folder: `$FEDAPP_CLIENT_HOME`, else `<cache>/client` (the cache:
    `$FEDAPP_CACHE_DIR`, else ~/.cache/fedapp)."""
    if os.environ.get(CLIENT_HOME_ENV):
        return Path(os.environ[CLIENT_HOME_ENV]).expanduser()
    cache = os.environ.get("FEDAPP_CACHE_DIR") or Path.home() / ".cache" / "fedapp"
    return Path(cache).expanduser() / "client"


def client_key_dir(spec: SecureSpec) -> Path:
    """Where simulated clients without `ckks-secret` keep the federation's key."""
    return client_home() / "ckks" / spec.tag


def ensure_client_key(spec: SecureSpec) -> Path:
    """The client side's secret context for these parameters (created once, atomically)."""
    directory = client_key_dir(spec)
    if not (directory / SECRET).is_file() or not (directory / PUBLIC).is_file():
        create_keys(directory, spec, exist_ok=True)
    return directory / SECRET


def _has_private_part(blob: bytes) -> bool:
    """Whether a serialised TenSEAL context carries its private part (the secret key): field 3
    (`private_context`) of TenSEALContextProto (tenseal/proto/tensealcontext.proto), read from
    the protobuf wire format without SEAL parsing the key."""
    i, n = 0, len(blob)

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            if i >= n or shift > 63:
                raise ValueError("truncated varint")
            b = blob[i]
            i += 1
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7

    try:
        while i < n:
            tag = varint()
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                varint()
            elif wire == 1:
                i += 8
            elif wire == 5:
                i += 4
            elif wire == 2:
                length = varint()
                if number == 3 and length > 0:
                    return True
                i += length
            else:
                raise ValueError(f"wire type {wire}")
    except ValueError:
        return True  # not a context we can read: treated as holding a secret (refused)
    return False


def load_context(path: Path, need_secret: bool):
    """A context from a file: the secret one (a client; the file must be private to its owner,
    as ssh keys are) or a public one (refused if it holds a secret key, before SEAL parses it)."""
    ts = _tenseal()
    path = Path(path).expanduser()
    if not path.exists():
        raise SecureError(
            f"{path} not found: the institutions create the federation's keys with "
            "`fedapp-keys create DIR`; a SuperNode reads DIR/secret.ckks from its node config "
            "(--node-config 'ckks-secret=DIR/secret.ckks'), the operator gets DIR/public.ckks"
        )
    if need_secret and os.name == "posix" and path.stat().st_mode & 0o077:
        raise SecureError(
            f"{path} is readable by other users (mode {path.stat().st_mode & 0o777:o}); "
            f"run chmod 600 {path}"
        )
    blob = path.read_bytes()
    if not need_secret and _has_private_part(blob):
        raise SecureError(f"{path} holds a secret key; the server side must hold public.ckks only")
    ctx = ts.context_from(blob)
    if need_secret and not ctx.has_secret_key():
        raise SecureError(f"{path} holds no secret key; clients need secret.ckks")
    if not need_secret and ctx.has_secret_key():  # pragma: no cover - caught above
        raise SecureError(f"{path} holds a secret key; the server side must hold public.ckks only")
    return ctx


def public_context_from(blob: bytes):
    """The server's side: a public context received from a client, refused if it holds a
    secret key (checked before SEAL parses it)."""
    if _has_private_part(blob):
        raise SecureError(
            "the context offered holds a secret key; the server takes public ones only"
        )
    ctx = _tenseal().context_from(blob)
    if ctx.has_secret_key() or not ctx.has_public_key():  # pragma: no cover - caught above
        raise SecureError("the context offered is not a public CKKS context")
    return ctx


def parameters(ctx) -> dict[str, Any]:
    """A context's CKKS parameters, as SEAL holds them."""
    data = ctx.seal_context().data
    first = data.first_context_data()
    return {
        "poly_modulus_degree": int(first.parms().poly_modulus_degree()),
        "data_modulus_bits": int(first.total_coeff_modulus_bit_count()),
        "key_modulus_bits": int(data.key_context_data().total_coeff_modulus_bit_count()),
        "data_levels": int(first.chain_index()) + 1,
        "scale": float(ctx.global_scale),
    }


def fingerprint(ctx) -> str:
    """sha256 of a context's public key and parameters: the same for every copy of one key
    (the serialised contexts differ: SEAL re-draws relinearisation keys on loading)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pk"
        ctx.public_key().data.save(str(path))
        key = path.read_bytes()
    digest = hashlib.sha256(key)
    digest.update(repr(sorted(parameters(ctx).items())).encode())
    return digest.hexdigest()


# -- vectors --------------------------------------------------------------------------------------
def flatten(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays.values()])


def unflatten(vector: Sequence[float], layout: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, i = {}, 0
    v = np.asarray(vector, dtype=np.float64)
    for key, ref in layout.items():
        out[key] = v[i : i + ref.size].reshape(ref.shape).astype(ref.dtype)
        i += ref.size
    if i != len(v):
        raise SecureError(f"decrypted {len(v)} values for a model of {i}")
    return out


def encrypt(ctx, vector: np.ndarray) -> np.ndarray:
    """A vector's CKKS ciphertext, serialised as uint8 (what travels in an ArrayRecord)."""
    ts = _tenseal()
    blob = ts.ckks_vector(ctx, np.asarray(vector, dtype=np.float64).tolist()).serialize()
    return np.frombuffer(blob, dtype=np.uint8)


def decrypt(ctx, blob: np.ndarray) -> np.ndarray:
    ts = _tenseal()
    return np.asarray(ts.ckks_vector_from(ctx, np.asarray(blob, np.uint8).tobytes()).decrypt())


def weighted_sum(ctx, blobs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_k weights_k Enc(v_k), computed on ciphertexts with plaintext weights (the server)."""
    ts = _tenseal()
    total = None
    for blob, w in zip(blobs, weights, strict=True):
        term = ts.ckks_vector_from(ctx, np.asarray(blob, np.uint8).tobytes()) * float(w)
        total = term if total is None else total + term
    return np.frombuffer(total.serialize(), dtype=np.uint8)


def is_encrypted(arrays: ArrayRecord | None) -> bool:
    return arrays is not None and CT in arrays


@dataclass(frozen=True)
class CiphertextForm:
    """What a well-formed ciphertext of a model looks like under one context."""

    length: int  # the model's values (0: not checked)
    poly_modulus_degree: int
    data_levels: int
    scale: float
    first_parms_id: tuple

    @classmethod
    def of(cls, ctx, length: int) -> CiphertextForm:
        p = parameters(ctx)
        first = tuple(ctx.seal_context().data.first_parms_id())
        return cls(int(length), p["poly_modulus_degree"], p["data_levels"], p["scale"], first)

    @property
    def chunks(self) -> int:
        return max(1, math.ceil(self.length / (self.poly_modulus_degree // 2)))

    def byte_bounds(self) -> tuple[int, int]:
        """Serialised size of a fresh ciphertext: at most uncompressed (2 polynomials of N
        64-bit coefficients per data prime, per chunk, plus headers), at least half of that
        (SEAL compresses uniformly random coefficients very little)."""
        raw = self.chunks * 2 * self.poly_modulus_degree * self.data_levels * 8
        return raw // 2, raw + 1024 * self.chunks + 4096

    def parse(self, ctx, blob: np.ndarray, *, fresh: bool):
        """The deserialised vector, or SecureError saying why it is not of this form. `fresh`:
        a client's reply (the first level, scale and size of an encryption); else an aggregate
        (anything but the first level: it went through a plaintext scaling)."""
        data = np.asarray(blob)
        if data.dtype != np.uint8 or data.ndim != 1:
            raise SecureError(f"a ciphertext travels as 1-d uint8, got {data.dtype} {data.shape}")
        if self.length and fresh:
            low, high = self.byte_bounds()
            if not low <= data.size <= high:
                raise SecureError(
                    f"ciphertext of {data.size} bytes, expected {low}..{high} for {self.length} "
                    "values under the federation's parameters"
                )
        try:
            vec = _tenseal().ckks_vector_from(ctx, data.tobytes())
        except Exception as err:  # SEAL refuses other parameters, malformed data
            raise SecureError(
                f"not a ciphertext under the federation's CKKS parameters ({type(err).__name__}: "
                f"{err})"
            ) from None
        if self.length and vec.size() != self.length:
            raise SecureError(f"ciphertext of {vec.size()} values, the model has {self.length}")
        cts = vec.ciphertext()
        if self.length and len(cts) != self.chunks:
            raise SecureError(f"{len(cts)} ciphertext chunks, expected {self.chunks}")
        for c in cts:
            if int(c.poly_modulus_degree()) != self.poly_modulus_degree or not c.is_ntt_form():
                raise SecureError("a ciphertext chunk of other parameters")
            if int(c.size()) != 2:
                raise SecureError(f"a ciphertext chunk of {c.size()} polynomials, expected 2")
            at_first = tuple(c.parms_id()) == self.first_parms_id
            if fresh and (not at_first or c.scale != self.scale):
                raise SecureError(
                    "a ciphertext chunk not at the level and scale of a fresh encryption "
                    f"(scale {c.scale:g}, expected {self.scale:g})"
                )
            if not fresh and at_first:
                raise SecureError(
                    "a fresh ciphertext forwarded as is, not the server's weighted sum (a "
                    "client's own encrypted model?)"
                )
        return vec


# -- the server side --------------------------------------------------------------------------------
@dataclass
class SecureAggregator:
    """What the strategy uses under `secure=ckks`: the public context only."""

    public: Any
    fednova_momentum: float | None = None  # FedNova's rule (its momentum), else FedAvg's
    length: int = 0  # the model's number of values (0: sizes not checked)
    fingerprint: str = ""
    origin: str = ""  # where the public context came from
    refused: dict[int, str] = field(default_factory=dict)  # client id -> why its key is not ours
    clients_checked: int = 0
    bytes_by_reply: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.public.has_secret_key():
            raise SecureError(
                "the server's context holds a secret key; it must hold public.ckks only"
            )
        self.form = CiphertextForm.of(self.public, self.length)
        self.fingerprint = self.fingerprint or fingerprint(self.public)

    @property
    def keys(self) -> list[str]:
        return [CT] + ([CT_DELTA] if self.fednova_momentum is not None else [])

    def screen(self, client_id: int, arrays: ArrayRecord) -> str | None:
        """Why a reply's ciphertexts cannot be added (None: they can): a client whose key is
        not the federation's, or a ciphertext of the wrong size, parameters, level or scale
        (checked against the public context, never decrypted)."""
        if client_id in self.refused:
            return f"rejected: {self.refused[client_id]}"
        for key in self.keys:
            try:
                self.form.parse(self.public, arrays[key].numpy(), fresh=True)
            except SecureError as err:
                return f"rejected: {key}: {err}"
        return None

    def aggregate(self, accepted: list[Message], weights: list[float], steps: list[float]):
        """Enc(new global) from the accepted replies' ciphertexts, as an ArrayRecord."""
        models = [m.content["arrays"][CT].numpy() for m in accepted]
        if self.fednova_momentum is None:
            return ArrayRecord({CT: Array(weighted_sum(self.public, models, weights))})
        from strategies.fednova import effective_steps

        a = [effective_steps(s, self.fednova_momentum) for s in steps]
        tau = float(np.dot(weights, a))
        deltas = [m.content["arrays"][CT_DELTA].numpy() for m in accepted]
        coef = [*weights, *(p * (ak - tau) for p, ak in zip(weights, a, strict=True))]
        return ArrayRecord({CT: Array(weighted_sum(self.public, [*models, *deltas], coef))})


def secure_refusal(cfg: DictConfig) -> str | None:
    """Why this run cannot aggregate under encryption (None: it can)."""
    from hydra.utils import get_class

    from fedapp.features.privacy import PrivacySpec, central_dp_refusal

    cls = get_class(str(cfg.strategy._target_))
    if cfg.get("compression") is not None and cfg.compression.get("name", "none") != "none":
        return "compressed updates cannot be encrypted (a ciphertext does not quantise); use compression=none"
    if PrivacySpec.from_config(cfg.get("privacy")).name == "central_dp":
        return "central DP clips each plaintext update on the server; use privacy=sample_dp"
    if cls.aggregation_rule == "normalized_mean" and not cls.extra_array_records:
        return None  # FedNova: public weights and steps, a sum the server can take encrypted
    why = central_dp_refusal(cls)  # the same condition: FedAvg's average of the updates
    if why:
        return (
            f"{why}; under encryption the server can only add updates with public weights "
            "(per-client plaintext is what trust and contribution score)"
        )
    return None


def check_combination(cfg: DictConfig) -> None:
    spec = SecureSpec.from_config(cfg.get("secure"))
    if not spec.active:
        return
    why = secure_refusal(cfg)
    if why:
        raise SecureError(
            f"secure=ckks cannot be combined with strategy={cfg.strategy.name}: {why}"
        )


def operator_public(key_dir: Path | str):
    """The operator's copy of the public context (`secure.key_dir`): public.ckks only; a folder
    that also holds secret.ckks is refused without reading it."""
    folder = Path(key_dir).expanduser()
    if (folder / SECRET).exists():
        raise SecureError(
            f"{folder} holds {SECRET}: the operator must hold {PUBLIC} only (the institutions "
            "keep the secret key; give the server a folder with public.ckks alone)"
        )
    return load_context(folder / PUBLIC, need_secret=False)


def query_keys(
    grid, partitions: Mapping[int, int], timeout: float, send_public: bool = False
) -> dict[int, tuple[str, str, bytes | None]]:
    """Ask clients (ids of `partitions`) for their key: client id -> (fingerprint or "", why
    not, the public context's bytes if asked for)."""
    config = ConfigRecord({"send-public": int(send_public)})
    msgs = [
        Message(RecordDict({"config": config}), dst_node_id=cid, message_type=KEYS_QUERY)
        for cid in partitions
    ]
    out: dict[int, tuple[str, str, bytes | None]] = {
        cid: ("", "no reply to the key query", None) for cid in partitions
    }
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        cid = reply.metadata.src_node_id
        if cid not in out:
            continue
        if reply.has_error():
            out[cid] = ("", f"error: {reply.error.reason.strip()[:300]}", None)
            continue
        rec = reply.content.config_records.get(KEYS_RECORD)
        fp = str(rec.get("fingerprint", "")) if rec is not None else ""
        blob = None
        if PUBLIC_RECORD in reply.content.array_records:
            blob = reply.content[PUBLIC_RECORD]["public"].numpy().tobytes()
        out[cid] = (fp, "" if fp else "no key fingerprint in its reply", blob)
    return out


def server_aggregator(
    cfg: DictConfig,
    grid=None,
    partitions: Mapping[int, int] | None = None,
    task=None,
    timeout: float = 60.0,
) -> SecureAggregator | None:
    """The strategy's side of encryption: the public context (from `secure.key_dir/public.ckks`,
    the operator's copy, or from the clients), checked against every client's key."""
    from flwr.common import log

    spec = SecureSpec.from_config(cfg.get("secure"))
    if not spec.active:
        return None
    partitions = dict(partitions or {})
    public, origin = None, ""
    if spec.key_dir:
        public, origin = operator_public(spec.key_dir), f"operator's copy {spec.key_dir}/{PUBLIC}"
    elif grid is None:
        raise SecureError(
            "secure=ckks needs the clients' public context: the server asks the clients for it "
            "(or takes secure.key_dir=DIR with the institutions' DIR/public.ckks)"
        )
    reference = fingerprint(public) if public is not None else ""
    reports = query_keys(grid, partitions, timeout) if grid is not None else {}
    held = {cid: fp for cid, (fp, _, _) in sorted(reports.items()) if fp}
    if not reference:
        if not held:
            why = "; ".join(f"client {partitions[c]}: {w}" for c, (_, w, _) in reports.items())
            raise SecureError(
                "no client reported a CKKS key (each needs its secret context: --node-config "
                f"'ckks-secret=/path/secret.ckks' from `fedapp-keys create`): {why[:800]}"
            )
        reference = Counter(held.values()).most_common(1)[0][0]  # ties: the lowest client id
    refused = {
        cid: (
            f"its CKKS key (fingerprint {fp[:16]}) is not the federation's ({reference[:16]})"
            if fp
            else f"it reported no CKKS key ({why})"
        )
        for cid, (fp, why, _) in reports.items()
        if fp != reference
    }
    if reports and len(refused) == len(reports):
        raise SecureError(
            f"no client holds the key of {origin} (fingerprint {reference[:16]}): "
            + "; ".join(f"client {partitions[c]}: {w}" for c, w in sorted(refused.items()))[:800]
        )
    if public is None:
        public, origin = _public_from_clients(grid, partitions, held, reference, timeout)
    length = 0
    if task is not None:
        length = int(sum(v.numel() for v in task.make_model().state_dict().values()))
    from hydra.utils import get_class

    normalized = get_class(str(cfg.strategy._target_)).aggregation_rule == "normalized_mean"
    momentum = float(cfg.train.momentum) if normalized else None
    agg = SecureAggregator(public, momentum, length, reference, origin, refused, len(reports))
    log(
        INFO,
        "[fedapp] secure=ckks: public context %s (%s); %d of %d clients hold that key",
        reference[:16],
        origin,
        len(reports) - len(refused),
        len(reports),
    )
    for cid, why in sorted(refused.items()):
        log(WARNING, "[fedapp] client %s: %s; its replies will be rejected", partitions[cid], why)
    return agg


def _public_from_clients(grid, partitions, held, reference, timeout):
    """The public context from the first clients holding the reference key (its fingerprint
    checked, refused if it carries a secret key)."""
    errors = []
    for cid in [c for c, fp in held.items() if fp == reference][:3]:
        fp, why, blob = query_keys(grid, {cid: partitions[cid]}, timeout, send_public=True)[cid]
        if blob is None:
            errors.append(f"client {partitions[cid]}: {why or 'no public context'}")
            continue
        try:
            ctx = public_context_from(blob)
        except Exception as err:
            errors.append(f"client {partitions[cid]}: {err}")
            continue
        if fingerprint(ctx) != reference:
            errors.append(f"client {partitions[cid]}: its public context is not of its fingerprint")
            continue
        return ctx, f"client {partitions[cid]}'s public context (no secret key)"
    raise SecureError(f"no client sent a usable public context: {'; '.join(errors)}")


def check_resumed_key(saved_meta: Mapping[str, Any], secure: SecureAggregator | None) -> None:
    """A resumed encrypted run continues only under the key its checkpointed model is under."""
    old = (saved_meta.get("secure") or {}).get("key_fingerprint")
    if secure is not None and old and old != secure.fingerprint:
        raise SecureError(
            f"the checkpointed global model is encrypted under key {old[:16]}, the clients now "
            f"hold {secure.fingerprint[:16]}: resume with the institutions' original key"
        )


def secure_meta(
    cfg: DictConfig, secure: SecureAggregator | None = None, evaluator: Evaluator | None = None
) -> dict[str, Any]:
    spec = SecureSpec.from_config(cfg.get("secure"))
    params = parameters(secure.public) if secure is not None else {}
    has_evaluator = evaluator is not None and evaluator.ctx is not None
    meta: dict[str, Any] = {
        "mode": "ckks",
        "library": "TenSEAL (Microsoft SEAL CKKS)",
        "poly_modulus_degree": params.get("poly_modulus_degree", spec.poly_modulus_degree),
        "coeff_mod_bit_sizes": list(spec.coeff_mod_bit_sizes),
        "scale_bits": spec.scale_bits,
        "server_key": "public context only (no secret key)",
        "evaluation": (
            "server-side test metrics by the designated evaluator (see evaluator); federated "
            "evaluation by the clients on the decrypted model"
            if has_evaluator
            else "no evaluator key: server-side test metrics are empty (no party on the server "
            "side holds the secret key); federated evaluation by the clients on the decrypted "
            "model"
        ),
        "evaluator": (
            evaluator.statement if evaluator is not None else "none: the server holds no secret key"
        ),
        "visible_to_server": "each client's num-examples, training steps and metrics (the "
        "plaintext weights), message sizes and timing",
        "secret_key": "created on the institutions' side (a node's ckks-secret, or in "
        "simulation the client side's key folder), never by the operator and never in a "
        "results folder; one key shared by every institution",
        "collusion_limit": COLLUSION_LIMIT,
        "authentication": AUTHENTICATION_LIMIT,
        "server_checks": "each reply's ciphertexts against the public context: byte size, "
        "number of values, CKKS parameters, level and scale (a bad one is a rejected reply)",
        "client_checks": "the received global model: its CKKS parameters, number of values, "
        "not a fresh ciphertext forwarded as is, finite, L2 norm <= the node's max-model-norm "
        f"(default {MAX_MODEL_NORM:g}); refused with an error reply",
    }
    if secure is not None:
        meta.update(
            {
                "key_fingerprint": secure.fingerprint,
                "public_context_from": secure.origin,
                "data_modulus_bits": params["data_modulus_bits"],
                "clients_checked": secure.clients_checked,
                "clients_refused": {str(cid): why for cid, why in sorted(secure.refused.items())},
            }
        )
    return meta


def designated_evaluator(
    cfg: DictConfig, task, secure: SecureAggregator | None = None, simulation: bool = False
) -> Evaluator:
    """Who decrypts the global model for server-side test metrics: in a simulation (every node a
    host without its own data) the client side's key folder, when the clients hold that key;
    nobody otherwise."""
    spec = SecureSpec.from_config(cfg.get("secure"))
    layout = {k: v.detach().cpu().numpy() for k, v in task.make_model().state_dict().items()}
    if not simulation:
        return Evaluator(
            None,
            layout,
            "none: in deployment no party on the server side holds the secret key",
        )
    path = client_key_dir(spec) / SECRET
    if not path.is_file():
        return Evaluator(None, layout, f"none: no client-side key at {path}")
    evaluator = Evaluator(
        path,
        layout,
        f"simulation exception: the ServerApp reads the clients' secret key at {path} (the "
        "client side's key folder; in a simulation operator and institutions are one party on "
        "one machine) to decrypt the global model for server-side test metrics and "
        "final_model.pt; the strategy holds the public context only; in deployment nobody does",
    )
    if secure is not None and fingerprint(evaluator.ctx) != secure.fingerprint:
        return Evaluator(
            None, layout, f"none: the clients' key is not the client-side key at {path}"
        )
    return evaluator


class Evaluator:
    """The designated evaluator of an encrypted run: holds the secret context and decrypts the
    global model for server-side test metrics and checkpoints (never given to the strategy)."""

    def __init__(
        self, secret_path: Path | None, layout: Mapping[str, np.ndarray], statement: str = ""
    ) -> None:
        self.path = Path(secret_path) if secret_path else None
        self.statement = statement or (
            f"the secret context at {secret_path}" if secret_path else "none"
        )
        self.ctx = (
            load_context(self.path, need_secret=True)
            if self.path is not None and self.path.exists()
            else None
        )
        self.layout = dict(layout)

    def plaintext(self, arrays: ArrayRecord) -> ArrayRecord | None:
        if not is_encrypted(arrays):
            return arrays
        if self.ctx is None:
            return None
        values = unflatten(decrypt(self.ctx, arrays[CT].numpy()), self.layout)
        return ArrayRecord({k: Array(v) for k, v in values.items()})


# -- the client side -------------------------------------------------------------------------------
def client_secret_path(context: Context, spec: SecureSpec) -> Path:
    """This node's secret context: `ckks-secret` of its own node config, else (a simulated
    client, no data of its own) the client side's key folder. Never the run config's (the
    server's) `secure.key_dir`, and never inside the run's output folder."""
    configured = context.node_config.get("ckks-secret")
    if configured:
        path = Path(str(configured)).expanduser()
    elif context.node_config.get("data-path"):
        raise SecureError(
            "this node has no CKKS secret context: start it with --node-config "
            "'ckks-secret=/path/secret.ckks' (the institutions' key from `fedapp-keys create`)"
        )
    else:
        path = ensure_client_key(spec)
    out = context.run_config.get("output-dir")
    if _within(path, out):
        raise SecureError(
            f"the secret context {path} is inside the run's output folder {out}; keep it on "
            "the institution's side"
        )
    return path


_CONTEXTS: dict[str, tuple[tuple[int, int], Any, str]] = {}


def _cached_context(path: str):
    """(secret context, its fingerprint), reloaded if the file changed."""
    st = Path(path).stat()
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _CONTEXTS.get(path)
    if cached is None or cached[0] != stamp:
        ctx = load_context(Path(path), need_secret=True)
        cached = (stamp, ctx, fingerprint(ctx))
        _CONTEXTS[path] = cached
    return cached[1], cached[2]


def _client_context(context: Context, spec: SecureSpec):
    return _cached_context(str(client_secret_path(context, spec)))[0]


def max_model_norm(context: Context) -> float:
    value = float(context.node_config.get("max-model-norm", MAX_MODEL_NORM))
    if not value > 0:
        raise SecureError(f"max-model-norm={value}: use a positive number")
    return value


def check_global_model(
    ctx, received: ArrayRecord, layout: Mapping[str, np.ndarray], max_norm: float
) -> dict[str, np.ndarray]:
    """The global model a client received, in the clear, after its checks (ModelRefused says
    which failed): an encrypted one is under this node's parameters, has the model's number of
    values and went through the server's weighted sum; any one has the model's layout, finite
    values and an L2 norm of at most `max_norm`."""
    n = int(sum(np.asarray(v).size for v in layout.values()))
    if is_encrypted(received):
        if set(received) != {CT}:
            raise ModelRefused(f"refused the global model: unexpected arrays {sorted(received)}")
        form = CiphertextForm.of(ctx, n)
        try:
            vec = form.parse(ctx, received[CT].numpy(), fresh=False)
        except SecureError as err:
            raise ModelRefused(f"refused the encrypted global model: {err}") from None
        values = unflatten(np.asarray(vec.decrypt()), layout)
    else:
        shapes = {k: tuple(v.shape) for k, v in received.items()}
        if shapes != {k: tuple(np.shape(v)) for k, v in layout.items()}:
            raise ModelRefused("refused the global model: it does not have the model's layout")
        values = {k: v.numpy() for k, v in received.items()}
    flat = flatten(values)
    if not np.all(np.isfinite(flat)):
        raise ModelRefused("refused the global model: it has NaN/Inf values")
    norm = float(np.linalg.norm(flat))
    if norm > max_norm:
        raise ModelRefused(
            f"refused the global model: its L2 norm {norm:.3g} exceeds this node's "
            f"max-model-norm {max_norm:g} (a ciphertext under another key decrypts to norms "
            "above 1e15)"
        )
    return values


def secure_mod(msg: Message, context: Context, call_next) -> Message:
    """Check and decrypt the global model on the way in; encrypt the trained model (and
    FedNova's change per step) on the way out. Training and evaluation handlers."""
    from fedapp.core.node import load_node

    node = load_node(context, with_data=False)
    spec = SecureSpec.from_config(node.cfg.get("secure"))
    if not spec.active or "arrays" not in msg.content.array_records:
        return call_next(msg, context)
    ctx = _client_context(context, spec)
    t0 = time.perf_counter()
    layout = {k: v.detach().cpu().numpy() for k, v in node.task.make_model().state_dict().items()}
    values = check_global_model(ctx, msg.content["arrays"], layout, max_model_norm(context))
    msg.content["arrays"] = ArrayRecord({k: Array(v) for k, v in values.items()})
    x = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    spent = time.perf_counter() - t0
    reply = call_next(msg, context)
    if reply.has_error() or "arrays" not in reply.content.array_records:
        return reply
    t0 = time.perf_counter()
    y = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    flat_y = flatten(y)
    if not np.all(np.isfinite(flat_y)):
        raise SecureError("the trained model has NaN/Inf values; not encrypting it")
    out = {CT: Array(encrypt(ctx, flat_y))}
    config = msg.content.config_records.get("config") or {}
    if config.get("ckks-fednova"):
        metrics = next(iter(reply.content.metric_records.values()))
        from strategies.fednova import effective_steps

        a = effective_steps(float(metrics["train_steps"]), float(config.get("momentum", 0.0)))
        out[CT_DELTA] = Array(encrypt(ctx, (flatten(x) - flat_y) / a))
    reply.content["arrays"] = ArrayRecord(out)
    metrics = next(iter(reply.content.metric_records.values()))
    metrics["crypto_s"] = spent + time.perf_counter() - t0  # checking, decrypting, encrypting
    return reply


def keys_reply(msg: Message, context: Context) -> Message:
    """`query.keys`: this client's key fingerprint and parameters (and, when asked, its public
    context: never the secret key)."""
    from fedapp.core.node import load_node

    node = load_node(context, with_data=False)
    spec = SecureSpec.from_config(node.cfg.get("secure"))
    if not spec.active:
        raise SecureError("this run is not encrypted (secure=none): no key to report")
    ctx, fp = _cached_context(str(client_secret_path(context, spec)))
    params = parameters(ctx)
    content = RecordDict(
        {
            KEYS_RECORD: ConfigRecord(
                {"fingerprint": fp, **{k: v for k, v in params.items() if k != "scale"}}
            )
        }
    )
    config = msg.content.config_records.get("config") or {}
    if int(config.get("send-public", 0)):
        blob = ctx.serialize(save_secret_key=False)
        content[PUBLIC_RECORD] = ArrayRecord({"public": Array(np.frombuffer(blob, np.uint8))})
    return Message(content, reply_to=msg)


# -- fedapp-keys (an institution's tool) -------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedapp-keys",
        description="An institution's tool for a federation's CKKS key (secure=ckks). `create "
        "DIR`: DIR/secret.ckks (mode 600, for the institutions only) and DIR/public.ckks (the "
        "only file the operator gets). `fingerprint FILE`: the key's fingerprint, to compare "
        "with the run's results.json meta.secure.key_fingerprint.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a new key in DIR")
    create.add_argument("dir", type=Path)
    create.add_argument("--poly-modulus-degree", type=int, default=8192)
    show = sub.add_parser("fingerprint", help="print the fingerprint of a secret or public context")
    show.add_argument("file", type=Path)
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] not in ("create", "fingerprint", "-h", "--help"):
        args = ["create", *args]  # the old form, `fedapp-keys DIR`
    ns = parser.parse_args(args)
    try:
        if ns.command == "fingerprint":
            blob = ns.file.read_bytes()
            ctx = load_context(ns.file, need_secret=_has_private_part(blob))
            print(fingerprint(ctx))
            return 0
        spec = SecureSpec(name="ckks", poly_modulus_degree=ns.poly_modulus_degree)
        secret, public = create_keys(ns.dir, spec)
    except (SecureError, OSError) as err:
        print(f"fedapp-keys: {err}", file=sys.stderr)
        return 2
    print(
        f"[fedapp-keys] {secret}: the federation's secret key (mode 600). Share it with the other "
        "institutions out of band (never through the operator); each SuperNode reads it with "
        f"--node-config 'ckks-secret={secret}'.\n"
        f"[fedapp-keys] {public}: the public context (no secret key): the only file for the "
        f"operator (secure.key_dir=<folder with it alone>). Fingerprint: "
        f"{fingerprint(load_context(public, need_secret=False))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
