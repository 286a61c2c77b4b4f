"""The registry of named seed streams: every seeded draw of a run, derived from the run's seed.

Each stream has a name, what it draws and the derivation of its seed material from the run's
seed and the stream's key (a round, a partition id...). Code asks for a stream by name
(`rng`, `torch_seed`, `words`); a name that is not registered is a KeyError, so a new draw
cannot silently share another's numbers. The derivations are the ones each draw used before
the registry existed, kept exactly (`bench/behaviour_digest.py` checks that runs repeat);
`tests/fedapp/test_seeds.py` checks that no two streams give the same seed material.

DP noise is not here: it comes from fresh OS entropy (fedapp.features.privacy, tasks.dp_sgd), never
from the run's seed. Its streams (`dp.*`) name only the seed that the explicit test mode
(`FEDAPP_INSECURE_SEEDED_DP_NOISE=1`, "DOES NOT HOLD" in results.json) reproduces noise from.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["STREAMS", "Stream", "rng", "torch_seed", "words"]

Material = int | list[int]

# the attack harness's stream words (fedapp.features.attacks)
ATTACK_ASSIGN, ATTACK_NOISE, ATTACK_CRASH = 0xA77AC, 0x0015E, 0xC4A54


@dataclass(frozen=True)
class Stream:
    name: str
    draws: str  # what the stream decides
    derive: Callable[..., Material]  # (run seed, *key) -> seed material


def _crc_words(*key: int | str) -> list[int]:
    return [zlib.crc32(str(k).encode()) if isinstance(k, str) else int(k) for k in key]


def _client(seed: int, server_round: int, partition_id: int) -> int:
    return int(seed) * 1_000_003 + int(server_round) * 10_007 + int(partition_id)


_ALL = (
    # -- the run --------------------------------------------------------------------------------
    Stream("model.init", "the initial global model's weights (ServerApp)", lambda s: int(s)),
    Stream(
        "sampling",
        "which clients a round trains (purpose 0) or evaluates (1); key: round, purpose "
        "(strategies.base.sample_partitions)",
        lambda s, rnd, purpose=0: [int(s), int(rnd), int(purpose)],
    ),
    Stream(
        "client",
        "a client's local work in a round: shuffling, dropout, its attack draws; key: round, "
        "partition id (fedapp.core.node.client_seed)",
        _client,
    ),
    # -- schedulers -----------------------------------------------------------------------------
    Stream(
        "tiered.pick",
        "the tie-break among a tier's idle members; key: round, salt (strategies.tiered)",
        lambda s, rnd, salt: [int(s), int(rnd), int(salt), 0x7E1],
    ),
    Stream(
        "tifl.tier",
        "which tier a TiFL round draws from; key: round (strategies.tifl)",
        lambda s, rnd: [int(s), int(rnd), 0x7F1],
    ),
    Stream(
        "fedasync.dispatch",
        "which idle client FedAsync starts next (strategies.fedasync)",
        lambda s: [int(s), 0xA5C],
    ),
    # -- device heterogeneity -------------------------------------------------------------------
    Stream(
        "hetero.profiles",
        "which device class each client gets, and its jitter (fedapp.features.hetero.assign_profiles)",
        lambda s: [int(s), 0x4E7E],
    ),
    Stream(
        "hetero.event",
        "one U(0,1) draw per clock event (unavailable, crash); key: client, slot, kind... "
        "(fedapp.features.hetero); strings enter as their CRC-32",
        lambda s, *key: _crc_words(s, *key),
    ),
    # -- attacks --------------------------------------------------------------------------------
    Stream(
        "attack.assign",
        "which partitions attack (fedapp.features.attacks.attacker_partitions)",
        lambda s: [int(s), ATTACK_ASSIGN],
    ),
    Stream(
        "attack.noise",
        "a Gaussian attacker's noise; the run seed is the client's `client` seed",
        lambda s: [int(s) % (2**63), ATTACK_NOISE],
    ),
    Stream(
        "attack.crash",
        "whether a crashing attacker crashes this round; the run seed is the client's `client` seed",
        lambda s: [int(s) % (2**63), ATTACK_CRASH],
    ),
    # -- synthetic data -------------------------------------------------------------------------
    Stream(
        "synthetic.generator-init",
        "the run's common initial generator (fedapp.features.synthetic.initial_generator)",
        lambda s: int(s) + 0x6E4,
    ),
    Stream(
        "synthetic.round",
        "the one-shot synthetic strategy's server-side training in a round; key: round "
        "(strategies.synthetic)",
        lambda s, rnd: int(s) * 1_000_003 + int(rnd),
    ),
    Stream(
        "synthetic.sample",
        "the generator's latent draws when it samples rows; the run seed is the caller's",
        lambda s: int(s) % (2**63),
    ),
    Stream(
        "synthetic.discriminator",
        "the refining discriminator's initial weights and batches; the run seed is the caller's",
        lambda s: int(s) % (2**63),
    ),
    Stream(
        "synthetic.select",
        "which generated rows the discriminator keeps (Efraimidis-Spirakis keys)",
        lambda s: [int(s) % (2**32), 0xD15],
    ),
    Stream(
        "synthetic.labels",
        "the labels of the rows a client generates, from the federated label histogram",
        lambda s: [int(s) % (2**32), 0x1AB],
    ),
    Stream(
        "synthetic.quality",
        "the row subsamples of the synthetic-data quality report",
        lambda s: int(s),
    ),
    # -- tuning -----------------------------------------------------------------------------------
    Stream(
        "tune.settings",
        "which setting of the search space each fedapp-tune trial runs (data-independent; the "
        "number of trials comes from OS entropy, fedapp.cli.tune)",
        lambda s: [int(s), 0x7E5],
    ),
    # -- DP: only the seeds of the explicit seeded-noise test mode ------------------------------
    Stream(
        "dp.refine",
        "the DP discriminator's noise in the seeded-noise test mode",
        lambda s: int(s) * 1_000_003 + 0xD15,
    ),
    Stream(
        "dp.generator",
        "a client's DP generator training noise in a round, in the seeded-noise test mode; key: "
        "round, partition id",
        lambda s, rnd, pid: (int(s) * 7919 + int(rnd)) * 1_000_003 + int(pid),
    ),
)
STREAMS: dict[str, Stream] = {s.name: s for s in _ALL}
assert len(STREAMS) == len(_ALL), "two streams share a name"


def words(name: str, seed: int, *key: int | str) -> Material:
    """The seed material of stream `name` for run seed `seed` and key `key`."""
    return STREAMS[name].derive(seed, *key)


def rng(name: str, seed: int, *key: int | str) -> np.random.Generator:
    """A NumPy generator of stream `name`."""
    return np.random.default_rng(words(name, seed, *key))


def torch_seed(name: str, seed: int, *key: int | str) -> int:
    """An integer seed of stream `name` (for `torch.manual_seed` or a torch.Generator)."""
    material = words(name, seed, *key)
    if not isinstance(material, int):
        raise TypeError(f"stream {name} gives seed words, not one integer: use seeds.rng")
    return material
