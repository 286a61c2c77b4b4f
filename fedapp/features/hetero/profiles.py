"""Device profiles: what each client's hardware and link are (drawn from `conf/hetero` classes with
the run's seed, or stated by a SuperNode's node config), and the seeded draws of when a
client is unavailable or crashes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import Message

from fedapp.core import seeds

MBIT = 1e6 / 8  # bytes per second in one Mbit/s


@dataclass(frozen=True)
class DeviceProfile:
    """One client's device and link. speed 1.0 = the reference device of `step_time_s`."""

    tier_class: str = "default"
    speed: float = 1.0
    down_mbps: float = math.inf
    up_mbps: float = math.inf
    latency_s: float = 0.0
    p_unavailable: float = 0.0
    p_crash: float = 0.0

    def __post_init__(self) -> None:
        if not self.speed > 0:
            raise ValueError(f"profile {self.tier_class}: speed must be > 0, got {self.speed}")
        if not (self.down_mbps > 0 and self.up_mbps > 0):
            raise ValueError(f"profile {self.tier_class}: bandwidths must be > 0")
        if self.latency_s < 0:
            raise ValueError(f"profile {self.tier_class}: latency_s must be >= 0")
        for name in ("p_unavailable", "p_crash"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"profile {self.tier_class}: {name} must be in [0, 1]")

    def transfer_s(self, bytes_down: int, bytes_up: int) -> float:
        """Latency both ways plus the payloads over the link (seconds)."""
        return (
            2 * self.latency_s
            + bytes_down / (self.down_mbps * MBIT)
            + bytes_up / (self.up_mbps * MBIT)
        )

    def compute_s(self, steps: float, step_time_s: float) -> float:
        return float(steps) * step_time_s / self.speed


@dataclass(frozen=True)
class HeteroSpec:
    """The `hetero` config group."""

    name: str = "none"
    clock: str = "real"  # real | virtual
    compute: str = "steps"  # steps | measured
    step_time_s: float = 0.05
    detect_s: float = 30.0
    availability_period_s: float = 60.0
    jitter: float = 0.0
    classes: tuple[tuple[str, float, DeviceProfile], ...] = field(default_factory=tuple)

    @property
    def active(self) -> bool:
        return bool(self.classes)

    @property
    def virtual(self) -> bool:
        return self.clock == "virtual"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> HeteroSpec:
        if not cfg:
            return cls()
        clock = str(cfg.get("clock", "real"))
        if clock not in ("real", "virtual"):
            raise ValueError(f"hetero.clock must be 'real' or 'virtual', got {clock!r}")
        compute = str(cfg.get("compute", "steps"))
        if compute not in ("steps", "measured"):
            raise ValueError(f"hetero.compute must be 'steps' or 'measured', got {compute!r}")
        classes = []
        for name, c in (cfg.get("classes") or {}).items():
            c = dict(c)
            share = float(c.pop("share"))
            if share < 0:
                raise ValueError(f"hetero class {name}: share must be >= 0")
            classes.append((str(name), share, DeviceProfile(tier_class=str(name), **c)))
        if classes and sum(s for _, s, _ in classes) <= 0:
            raise ValueError("hetero classes: shares must add up to a positive number")
        if clock == "virtual" and not classes:
            raise ValueError("hetero.clock=virtual needs device classes (or use hetero=none)")
        return cls(
            name=str(cfg.get("name", "custom")),
            clock=clock,
            compute=compute,
            step_time_s=float(cfg.get("step_time_s", 0.05)),
            detect_s=float(cfg.get("detect_s", 30.0)),
            availability_period_s=float(cfg.get("availability_period_s", 60.0)),
            jitter=float(cfg.get("jitter", 0.0)),
            classes=tuple(classes),
        )


def assign_profiles(spec: HeteroSpec, num_clients: int, seed: int) -> list[DeviceProfile]:
    """Profiles of clients 0..num_clients-1: classes in the configured shares (largest
    remainder rounding), shuffled by the seed; speed and bandwidths get a log-normal spread
    of `jitter` around the class values. Same (spec, n, seed) -> same profiles everywhere."""
    if not spec.active:
        return [DeviceProfile() for _ in range(num_clients)]
    shares = np.array([s for _, s, _ in spec.classes], dtype=float)
    exact = shares / shares.sum() * num_clients
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: num_clients - counts.sum()]:
        counts[i] += 1
    labels = np.repeat(np.arange(len(spec.classes)), counts)
    rng = seeds.rng("hetero.profiles", seed)
    rng.shuffle(labels)
    out = []
    for label in labels:
        base = spec.classes[int(label)][2]
        if spec.jitter > 0:
            f = np.exp(rng.normal(0.0, spec.jitter, size=3))
            base = replace(
                base,
                speed=base.speed * f[0],
                down_mbps=base.down_mbps * f[1],
                up_mbps=base.up_mbps * f[2],
            )
        out.append(base)
    return out


NODE_CONFIG_KEYS = {
    "speed": "speed",
    "down-mbps": "down_mbps",
    "up-mbps": "up_mbps",
    "latency-s": "latency_s",
    "p-unavailable": "p_unavailable",
    "p-crash": "p_crash",
}


def profile_from_node_config(
    node_config: Mapping[str, Any], default: DeviceProfile
) -> DeviceProfile:
    """A deployed SuperNode's own profile (`--node-config "speed=0.3 up-mbps=5"`) over `default`."""
    given = {
        attr: float(node_config[k]) for k, attr in NODE_CONFIG_KEYS.items() if k in node_config
    }
    return replace(default, **given) if given else default


def _uniform(*key: int | str) -> float:
    """A reproducible U(0,1) draw for a key (seed, client, slot, ...)."""
    seed, *rest = key
    return float(seeds.rng("hetero.event", int(seed), *rest).random())


def is_unavailable(profile: DeviceProfile, seed: int, pid: int, slot: int) -> bool:
    """Whether client `pid` is offline in availability slot `slot` (a period of time, or a
    round in real-clock mode): independent draws per (seed, client, slot)."""
    return (
        profile.p_unavailable > 0 and _uniform(seed, pid, slot, "offline") < profile.p_unavailable
    )


def crash_point(profile: DeviceProfile, seed: int, pid: int, attempt: int) -> float | None:
    """Fraction of its compute after which the client crashes on this attempt, or None."""
    if profile.p_crash > 0 and _uniform(seed, pid, attempt, "crash") < profile.p_crash:
        return _uniform(seed, pid, attempt, "crash-at")
    return None


def payload_bytes(msg: Message) -> int:
    """Bytes of the arrays a message carries (what dominates transfer time)."""
    if msg.has_error():
        return 0
    return int(sum(r.count_bytes() for r in msg.content.array_records.values()))
