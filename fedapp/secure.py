"""Encrypted aggregation (`secure=ckks`): the server never holds one client's update in the clear.

CKKS homomorphic encryption through TenSEAL (no cryptography of ours):

- **Keys** (`fedapp-keys DIR`, or made by fedapp-run / fedapp-inline in `<run>/keys` when
  `secure.key_dir` is empty): one CKKS context per federation. `DIR/secret.ckks` (with the
  secret key) goes to the clients (a deployed SuperNode reads it from `--node-config
  "ckks-secret=/path/secret.ckks"`, a simulated one from `secure.key_dir`); `DIR/public.ckks`
  (no secret key: it can add and scale ciphertexts, not decrypt) is all the server reads.
- **A round**: each client decrypts the global model it receives, trains, and sends Enc(y_k),
  its model encrypted (FedNova: also Enc(d_k), its change per effective step). The server
  weights and adds ciphertexts with the plaintext weights it already knows from the clients'
  `num-examples` (and steps): Enc(x') = sum_k p_k Enc(y_k) (FedNova:
  + sum_k p_k (a_k - tau_eff) Enc(d_k)), and sends Enc(x') to the next round's clients.
- **Evaluation**: clients evaluate the decrypted model as usual (federated evaluation). The
  server cannot read the global model; server-side test metrics come from a designated
  evaluator that holds the secret context (in simulation the run's key folder, stated in
  `meta.secure`; in deployment run with an operator node holding the key, otherwise those
  metrics are empty).
- **Strategies**: FedAvg, FedProx and MOON (FedAvg's average) and FedNova work under encryption;
  every other one needs each client's plaintext update (trust and contribution score it, robust
  aggregators sort its coordinates, SCAFFOLD sends controls, the event-driven ones discount
  stale updates against older models) and is refused at start-up with the reason, as are
  compression (ciphertexts do not quantise) and central DP (its clipping needs plaintext).
- Not covered: the server sees each client's `num-examples`, training steps and metrics (the
  plaintext weights), and the sizes and timing of messages.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from omegaconf import DictConfig

from fedapp.config import ConfigError

CT = "ckks-ct"  # the ciphertext of a model (uint8 bytes) in an ArrayRecord
CT_DELTA = "ckks-d"  # FedNova: the ciphertext of the change per effective step
SECRET, PUBLIC = "secret.ckks", "public.ckks"


class SecureError(ConfigError):
    """Invalid encrypted-aggregation settings or key material; the message says what to do."""


@dataclass(frozen=True)
class SecureSpec:
    """The `secure` config group."""

    name: str = "none"
    key_dir: str = ""
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


def _tenseal():
    try:
        import tenseal
    except ImportError as err:  # pragma: no cover - a missing optional install
        raise SecureError("secure=ckks needs TenSEAL: pip install tenseal==0.3.18") from err
    return tenseal


# -- keys --------------------------------------------------------------------------------------------
def create_keys(directory: Path, spec: SecureSpec = SecureSpec(name="ckks")) -> tuple[Path, Path]:
    """Write a new CKKS context: `secret.ckks` (for the clients) and `public.ckks` (for the
    server: no secret key). Additions and plaintext scalings only, so no Galois or
    relinearisation keys."""
    ts = _tenseal()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=spec.poly_modulus_degree,
        coeff_mod_bit_sizes=list(spec.coeff_mod_bit_sizes),
    )
    ctx.global_scale = 2**spec.scale_bits
    secret, public = directory / SECRET, directory / PUBLIC
    secret.write_bytes(ctx.serialize(save_secret_key=True))
    secret.chmod(0o600)
    ctx.make_context_public()
    public.write_bytes(ctx.serialize(save_secret_key=False))
    return secret, public


def load_context(path: Path, need_secret: bool):
    ts = _tenseal()
    path = Path(path)
    if not path.exists():
        raise SecureError(
            f"{path} not found: create the federation's keys with `fedapp-keys DIR` and set "
            "secure.key_dir=DIR (clients: --node-config 'ckks-secret=DIR/secret.ckks')"
        )
    ctx = ts.context_from(path.read_bytes())
    if need_secret and not ctx.has_secret_key():
        raise SecureError(f"{path} holds no secret key; clients need secret.ckks")
    return ctx


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


# -- the server side --------------------------------------------------------------------------------
@dataclass
class SecureAggregator:
    """What the strategy uses under `secure=ckks`: the public context only."""

    public: Any
    fednova_momentum: float | None = None  # FedNova's rule (its momentum), else FedAvg's
    bytes_by_reply: dict[str, int] = field(default_factory=dict)

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

    from fedapp.privacy import PrivacySpec, central_dp_refusal
    from strategies.fednova import FedNova

    cls = get_class(str(cfg.strategy._target_))
    if cfg.get("compression") is not None and cfg.compression.get("name", "none") != "none":
        return "compressed updates cannot be encrypted (a ciphertext does not quantise); use compression=none"
    if PrivacySpec.from_config(cfg.get("privacy")).name == "central_dp":
        return "central DP clips each plaintext update on the server; use privacy=sample_dp"
    if issubclass(cls, FedNova):
        return None
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


def server_aggregator(cfg: DictConfig) -> SecureAggregator | None:
    spec = SecureSpec.from_config(cfg.get("secure"))
    if not spec.active:
        return None
    if not spec.key_dir:
        raise SecureError(
            "secure=ckks needs secure.key_dir (the folder with public.ckks): run `fedapp-keys DIR` "
            "and pass secure.key_dir=DIR (fedapp-run and fedapp-inline make one for you)"
        )
    public = load_context(Path(spec.key_dir) / PUBLIC, need_secret=False)
    if public.has_secret_key():
        raise SecureError(f"{spec.key_dir}/{PUBLIC} holds a secret key; the server must not")
    from hydra.utils import get_class

    from strategies.fednova import FedNova

    momentum = (
        float(cfg.train.momentum)
        if issubclass(get_class(str(cfg.strategy._target_)), FedNova)
        else None
    )
    return SecureAggregator(public, momentum)


def secure_meta(cfg: DictConfig) -> dict[str, Any]:
    spec = SecureSpec.from_config(cfg.get("secure"))
    secret = Path(spec.key_dir) / SECRET
    return {
        "mode": "ckks",
        "library": "TenSEAL (Microsoft SEAL CKKS)",
        "poly_modulus_degree": spec.poly_modulus_degree,
        "coeff_mod_bit_sizes": list(spec.coeff_mod_bit_sizes),
        "scale_bits": spec.scale_bits,
        "server_key": "public context only (no secret key)",
        "evaluation": (
            f"server-side test metrics by a designated evaluator holding the secret context "
            f"({secret}); federated evaluation by the clients on the decrypted model"
            if secret.exists()
            else "no evaluator key: server-side test metrics are empty; federated evaluation "
            "by the clients on the decrypted model"
        ),
        "visible_to_server": "each client's num-examples, training steps and metrics (the "
        "plaintext weights), message sizes and timing",
    }


def designated_evaluator(cfg: DictConfig, task) -> Evaluator:
    spec = SecureSpec.from_config(cfg.get("secure"))
    layout = {k: v.detach().cpu().numpy() for k, v in task.make_model().state_dict().items()}
    return Evaluator(Path(spec.key_dir) / SECRET, layout)


class Evaluator:
    """The designated evaluator of an encrypted run: holds the secret context and decrypts the
    global model for server-side test metrics and checkpoints (never given to the strategy)."""

    def __init__(self, secret_path: Path, layout: Mapping[str, np.ndarray]) -> None:
        self.path = Path(secret_path)
        self.ctx = load_context(self.path, need_secret=True) if self.path.exists() else None
        self.layout = dict(layout)

    def plaintext(self, arrays: ArrayRecord) -> ArrayRecord | None:
        if not is_encrypted(arrays):
            return arrays
        if self.ctx is None:
            return None
        values = unflatten(decrypt(self.ctx, arrays[CT].numpy()), self.layout)
        return ArrayRecord({k: Array(v) for k, v in values.items()})


# -- the client side: a Flower mod ---------------------------------------------------------------------
def _client_context(context: Context, spec: SecureSpec):
    path = context.node_config.get("ckks-secret") or (
        Path(spec.key_dir) / SECRET if spec.key_dir else None
    )
    if not path:
        raise SecureError(
            "this node has no CKKS secret context: start it with --node-config "
            "'ckks-secret=/path/secret.ckks' (from fedapp-keys)"
        )
    return _cached_context(str(path))


_CONTEXTS: dict[str, Any] = {}


def _cached_context(path: str):
    if path not in _CONTEXTS:
        _CONTEXTS[path] = load_context(Path(path), need_secret=True)
    return _CONTEXTS[path]


def secure_mod(msg: Message, context: Context, call_next) -> Message:
    """Decrypt the global model on the way in; encrypt the trained model (and FedNova's change
    per step) on the way out. Training and evaluation handlers."""
    from fedapp.node import load_node

    node = load_node(context, with_data=False)
    spec = SecureSpec.from_config(node.cfg.get("secure"))
    if not spec.active or "arrays" not in msg.content.array_records:
        return call_next(msg, context)
    ctx = _client_context(context, spec)
    t0 = time.perf_counter()
    layout = {k: v.detach().cpu().numpy() for k, v in node.task.make_model().state_dict().items()}
    received = msg.content["arrays"]
    if is_encrypted(received):
        values = unflatten(decrypt(ctx, received[CT].numpy()), layout)
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
    metrics["crypto_s"] = spent + time.perf_counter() - t0  # decrypting and encrypting
    return reply


# -- fedapp-keys -------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedapp-keys",
        description="Create a federation's CKKS key material: DIR/secret.ckks for the clients "
        "(keep it off the server) and DIR/public.ckks for the server.",
    )
    parser.add_argument("dir", type=Path)
    parser.add_argument("--poly-modulus-degree", type=int, default=8192)
    args = parser.parse_args(argv)
    spec = SecureSpec(name="ckks", poly_modulus_degree=args.poly_modulus_degree)
    secret, public = create_keys(args.dir, spec)
    print(f"[fedapp-keys] clients: {secret} (secret, mode 600); server: {public} (public only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
