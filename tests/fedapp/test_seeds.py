"""fedapp.core.seeds: every seeded draw is a named stream, the derivations are the ones the runs
have always used (so published numbers repeat), and no two streams share seed material."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedapp.core import seeds
from fedapp.core.config import PROJECT_ROOT

# The seed material each stream gave before the registry existed (the formulas the call sites
# held), for run seed 7 and a key of small numbers.
LEGACY = {
    "model.init": ((), 7),
    "sampling": ((3, 1), [7, 3, 1]),
    "client": ((3, 5), 7 * 1_000_003 + 3 * 10_007 + 5),
    "tiered.pick": ((3, 2), [7, 3, 2, 0x7E1]),
    "tifl.tier": ((3,), [7, 3, 0x7F1]),
    "fedasync.dispatch": ((), [7, 0xA5C]),
    "hetero.profiles": ((), [7, 0x4E7E]),
    "attack.assign": ((), [7, 0xA77AC]),
    "attack.noise": ((), [7, 0x0015E]),
    "attack.crash": ((), [7, 0xC4A54]),
    "synthetic.generator-init": ((), 7 + 0x6E4),
    "synthetic.round": ((3,), 7 * 1_000_003 + 3),
    "synthetic.sample": ((), 7),
    "synthetic.discriminator": ((), 7),
    "synthetic.select": ((), [7, 0xD15]),
    "synthetic.labels": ((), [7, 0x1AB]),
    "synthetic.quality": ((), 7),
    "tune.settings": ((), [7, 0x7E5]),
    "dp.refine": ((), 7 * 1_000_003 + 0xD15),
    "dp.generator": ((3, 5), (7 * 7919 + 3) * 1_000_003 + 5),
}


def test_every_stream_keeps_its_derivation():
    assert set(LEGACY) == set(seeds.STREAMS) - {"hetero.event"}
    for name, (key, material) in LEGACY.items():
        assert seeds.words(name, 7, *key) == material, name
    # strings enter as their CRC-32 (the clock's per-event draws)
    assert seeds.words("hetero.event", 7, 2, 4, "crash") == [7, 2, 4, zlib.crc32(b"crash")]


def test_an_unregistered_stream_is_refused():
    with pytest.raises(KeyError):
        seeds.rng("sampling.typo", 0)
    with pytest.raises(TypeError, match="seed words"):
        seeds.torch_seed("sampling", 0, 1)


def test_streams_that_share_seed_material_are_only_the_documented_twins():
    """Within a run, for the keys the call sites give, two different streams never give the
    same material, except where one draw's seed is another stream's output by design (documented: the
    synthetic.sample / discriminator / quality draws take the caller's seed as it is)."""
    twins = {"model.init", "synthetic.sample", "synthetic.discriminator", "synthetic.quality"}
    for seed in range(30):  # within one run (one run seed)
        seen: dict[str, str] = {}
        for name, stream in seeds.STREAMS.items():
            for key in _keys(name):
                material = repr(stream.derive(seed, *key))
                other = seen.setdefault(material, name)
                assert other == name or {other, name} <= twins, (other, name, seed, key)


def _keys(name: str) -> list[tuple]:
    """Keys as the call sites give them: rounds 1..19 (and partition ids 0..19), the sampling
    purpose 0 or 1, the clock's events named by a string."""
    if name == "hetero.event":
        return [(p, s, kind) for p in range(20) for s in range(3) for kind in ("offline", "crash")]
    if name == "sampling":
        return [(r, purpose) for r in range(1, 20) for purpose in (0, 1)]
    if name == "client":
        return [(r, p) for r in range(1, 20) for p in range(20)]
    if name == "dp.generator":
        return [(r, p) for r in range(1, 20) for p in range(20)]
    arity = len(LEGACY[name][0])
    return [(k, *LEGACY[name][0][1:]) for k in range(1, 20)] if arity else [()]


@given(st.integers(0, 2**31), st.integers(1, 10_000), st.integers(0, 1))
def test_sampling_streams_repeat_and_differ_by_purpose(seed, rnd, purpose):
    a = seeds.rng("sampling", seed, rnd, purpose).random(4)
    np.testing.assert_array_equal(a, seeds.rng("sampling", seed, rnd, purpose).random(4))
    assert not np.array_equal(a, seeds.rng("sampling", seed, rnd, 1 - purpose).random(4))


def test_no_module_seeds_a_generator_from_an_inline_formula():
    """Seeded NumPy generators are made by fedapp.core.seeds (the registry), not by a formula at
    the call site; tasks/ take the seeds they are given (they import no fedapp)."""
    allowed = {
        "fedapp/core/seeds.py",
        "fedapp/features/audit.py",
        "fedapp/features/privacy.py",
    }  # audit: offline tool
    pattern = re.compile(r"default_rng\(\s*\[")
    offenders = []
    for pkg in ("fedapp", "strategies"):
        for path in sorted((PROJECT_ROOT / pkg).rglob("*.py")):
            rel = str(Path(path).relative_to(PROJECT_ROOT))
            if rel not in allowed and pattern.search(path.read_text()):
                offenders.append(rel)
    assert offenders == []
