"""A harness of unreliable and malicious clients, applied inside the ClientApp.

Selected with Hydra: `attack=label_flip attack.fraction=0.3` (likewise `gaussian`, `scaled`,
`free_rider`, `crash`, `inflate`; `attack=none` by default). Which clients misbehave is a pure
function of (seed, number of partitions, fraction), so the server knows the same set and can report
how much aggregation weight attackers received (`attacker_weight` per round) without any
client telling it. Every random choice is seeded; the attack is recorded in the run's config.

Attacks (what an attacking client does in a training round):
- `label_flip` (data poisoning): trains honestly on labels mapped y -> C-1-y;
- `gaussian` (model poisoning): returns the global model plus N(0, std^2) noise, no training;
- `scaled`: trains honestly, then returns w + scale * (w_local - w); scale < 0 flips the
  update's sign, |scale| > 1 boosts it;
- `free_rider`: returns the global model unchanged (`mode: unchanged`) or the global model of
  its previous participation (`mode: stale`), optionally with a little noise to look busy;
  it claims its real number of examples;
- `crash`: with probability `probability` per round, raises (`mode: exception`, the server
  receives an error reply) or returns NaN weights (`mode: nan`);
- `inflate`: trains honestly but claims `claim` examples (`num-examples`, default 1e12) with
  its label histogram scaled to match, to take the weight of every average proportional to
  the claim (strategies/claims.py caps it).

Simulation only: in a deployment, nodes that hold their own files have no partition id and
are never attackers. `AttackHarness` is the client-side unit (fedapp/core/units.py) that applies
an attack inside the ClientApp.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from fedapp.core import seeds
from fedapp.core.units import ClientUnit, TrainJob

ATTACKS = ("none", "label_flip", "gaussian", "scaled", "free_rider", "crash", "inflate")
# Their draws are named seed streams (fedapp.core.seeds: attack.assign, attack.noise, attack.crash).


class AttackError(ValueError):
    """The attack configuration is invalid; the message says which key and what is allowed."""


class InjectedCrash(RuntimeError):
    """Raised by a `crash` attacker: the server sees an error reply, as for a real crash."""


@dataclass(frozen=True)
class AttackSpec:
    name: str = "none"
    fraction: float = 0.0
    std: float = 1.0  # gaussian
    scale: float = -4.0  # scaled
    mode: str = ""  # free_rider: unchanged | stale; crash: exception | nan
    noise_std: float = 0.0  # free_rider
    probability: float = 1.0  # crash
    claim: float = 1e12  # inflate: the num-examples claimed

    @classmethod
    def from_config(cls, cfg: DictConfig | Mapping[str, Any] | None) -> AttackSpec:
        if cfg is None:
            return cls()
        raw = dict(cfg)
        name = str(raw.get("name", "none"))
        if name not in ATTACKS:
            raise AttackError(f"attack.name={name!r}; choose one of {', '.join(ATTACKS)}")
        spec = cls(
            name=name,
            fraction=float(raw.get("fraction", 0.0)),
            std=float(raw.get("std", 1.0)),
            scale=float(raw.get("scale", -4.0)),
            mode=str(raw.get("mode", "") or ""),
            noise_std=float(raw.get("noise_std", 0.0)),
            probability=float(raw.get("probability", 1.0)),
            claim=float(raw.get("claim", 1e12)),
        )
        if not 0.0 <= spec.fraction <= 1.0:
            raise AttackError(f"attack.fraction={spec.fraction} must be in [0, 1]")
        if name == "free_rider" and spec.mode not in ("unchanged", "stale"):
            raise AttackError("attack.mode for free_rider must be 'unchanged' or 'stale'")
        if name == "crash" and spec.mode not in ("exception", "nan"):
            raise AttackError("attack.mode for crash must be 'exception' or 'nan'")
        if not 0.0 <= spec.probability <= 1.0:
            raise AttackError(f"attack.probability={spec.probability} must be in [0, 1]")
        if spec.std < 0 or spec.noise_std < 0:
            raise AttackError("attack.std and attack.noise_std must be >= 0")
        if name == "inflate" and not 1 <= spec.claim < 2**62:
            raise AttackError(f"attack.claim={spec.claim:g} must be in [1, 2^62)")
        return spec

    @property
    def active(self) -> bool:
        return self.name != "none" and self.fraction > 0


def attacker_partitions(num_partitions: int, fraction: float, seed: int) -> list[int]:
    """The partition ids that attack: round(fraction * num_partitions) of them, seeded."""
    k = int(round(float(fraction) * num_partitions))
    if k <= 0 or num_partitions <= 0:
        return []
    rng = seeds.rng("attack.assign", seed)
    return sorted(
        int(p) for p in rng.choice(num_partitions, size=min(k, num_partitions), replace=False)
    )


def flipped_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Label flipping y -> C-1-y (for two classes: swap them)."""
    return (num_classes - 1 - np.asarray(y)).astype(np.asarray(y).dtype)


def crashes_now(spec: AttackSpec, client_seed: int) -> bool:
    """Whether a `crash` attacker fails in this round (client_seed differs per round)."""
    return spec.name == "crash" and bool(
        seeds.rng("attack.crash", client_seed).random() < spec.probability
    )


State = dict[str, torch.Tensor]


def _float(t: torch.Tensor) -> bool:
    return torch.is_floating_point(t)


def poisoned_state(
    spec: AttackSpec,
    global_state: State,
    local_state: State,
    client_seed: int,
    stale_state: State | None = None,
) -> State:
    """The weights an attacker sends instead of `local_state` (pure; inputs not modified).

    `global_state` is the model as received this round, `local_state` after local training
    (ignored by attacks that do not train), `stale_state` the global model of this client's
    previous participation (free riders in `stale` mode; None on the first one).
    """
    gen = seeds.rng("attack.noise", client_seed)

    def noise_like(t: torch.Tensor, std: float) -> torch.Tensor:
        return torch.from_numpy(gen.normal(0.0, std, size=tuple(t.shape))).to(t.dtype)

    out: State = {}
    for key, g in global_state.items():
        if not _float(g):  # integer buffers (counters) are passed through
            out[key] = local_state.get(key, g).clone()
            continue
        if spec.name == "gaussian":
            out[key] = g + noise_like(g, spec.std)
        elif spec.name == "scaled":
            out[key] = g + spec.scale * (local_state[key] - g)
        elif spec.name == "free_rider":
            base = stale_state[key] if (spec.mode == "stale" and stale_state) else g
            out[key] = base.clone() + (noise_like(g, spec.noise_std) if spec.noise_std else 0)
        elif spec.name == "crash":  # mode nan
            out[key] = torch.full_like(g, float("nan"))
        else:
            out[key] = local_state[key].clone()
    return out


def trains_locally(spec: AttackSpec) -> bool:
    """Whether an attacker of this kind runs local training at all (a crasher trains like an
    honest client in the rounds it does not crash)."""
    return spec.name in ("none", "label_flip", "scaled", "crash", "inflate")


def inflated_claim(label_counts, claim: float) -> tuple[int, list[int]]:
    """(num-examples, label-counts) an `inflate` attacker reports: its histogram scaled to
    about `claim` rows, and the claim made to add up exactly (so that no consistency check
    between the two gives it away)."""
    counts = np.asarray(label_counts, dtype=np.float64)
    total = float(counts.sum())
    scaled = [int(round(c * claim / total)) for c in counts] if total > 0 else [int(claim)]
    return int(sum(scaled)), scaled


# -- the client-side unit ----------------------------------------------------------------------
STALE_KEY = "fedapp.previous-global"  # free riders in stale mode keep the last global model here


@lru_cache(maxsize=64)
def _attackers(num_partitions: int, fraction: float, seed: int) -> frozenset[int]:
    return frozenset(attacker_partitions(num_partitions, fraction, seed))


def attack_of(job: TrainJob) -> AttackSpec | None:
    """This client's attack, or None for an honest client (or a node without partition id)."""
    spec = AttackSpec.from_config(job.cfg.get("attack"))
    if not spec.active or job.partition_id < 0:
        return None
    attackers = _attackers(job.num_clients, spec.fraction, int(job.cfg.seed))
    return spec if job.partition_id in attackers else None


class AttackHarness(ClientUnit):
    """The attack harness as a client-side unit: the outermost stage around an honest client.

    Before training it crashes (`crash`, mode exception), flips labels (`label_flip`) or
    skips training (attacks that send made-up weights report the loss of the received model
    on their data and the step count an honest client would have run, so that screening
    cannot spot them by form). After training it replaces the weights to send.
    """

    stage = "attack"

    @classmethod
    def wanted(cls, job: TrainJob) -> bool:
        return attack_of(job) is not None

    def before_train(self, job: TrainJob) -> None:
        spec = attack_of(job)
        assert spec is not None
        self.spec = spec
        self.crashes = crashes_now(spec, job.seed)
        if self.crashes and spec.mode == "exception":
            raise InjectedCrash(f"client {job.partition_id}: injected crash (attack=crash)")
        if spec.name == "label_flip":
            classes = job.task.num_classes
            job.data = job.task.with_labels(job.data, flipped_labels(np.arange(classes), classes))
        if not trains_locally(spec):
            job.trains = False
            loss = float(job.task.evaluate(job.model, job.data.train, job.prep)["loss"])
            steps = job.settings.steps_per_round(job.data.num_train)
            job.metrics = {"train_loss": loss, "train_steps": float(steps), "train_time_s": 0.0}

    def after_train(self, job: TrainJob) -> None:
        spec = self.spec
        if spec.name == "inflate":  # honest weights, a huge claim
            n, counts = inflated_claim(job.data.label_counts, spec.claim)
            job.reply_metrics.update({"num-examples": n, "label-counts": counts})
            return
        # Model poisoning replaces the weights sent; a crasher does so only in rounds it crashes.
        if spec.name == "label_flip" or (spec.name == "crash" and not self.crashes):
            return
        stale = None
        if STALE_KEY in job.state.array_records:
            stale = job.state.array_records[STALE_KEY].to_torch_state_dict()
        job.model.load_state_dict(
            poisoned_state(spec, job.global_state, job.model.state_dict(), job.seed, stale)
        )
        if spec.name == "free_rider" and spec.mode == "stale":
            job.state.array_records[STALE_KEY] = job.received
