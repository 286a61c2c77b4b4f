"""`clock: real`: the ClientApp itself waits and fails as its profile says (a Flower mod around
the training, probe and heartbeat handlers)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from flwr.app import Context, Message

from fedapp.features.hetero.profiles import (
    MBIT,
    NODE_CONFIG_KEYS,
    DeviceProfile,
    HeteroSpec,
    assign_profiles,
    crash_point,
    is_unavailable,
    profile_from_node_config,
)

# -- client side (real clock) -------------------------------------------------------------------


class NodeUnavailable(RuntimeError):
    """Raised by a ClientApp whose profile says it is offline this round (real clock)."""


class InjectedNodeCrash(RuntimeError):
    """Raised by a ClientApp whose profile says it crashes this round (real clock)."""


def emulate_before_training(
    profile: DeviceProfile, seed: int, pid: int, server_round: int, bytes_down: int
) -> None:
    """Real clock: go offline or wait for the download, as the profile says."""
    if is_unavailable(profile, seed, pid, server_round):
        raise NodeUnavailable(f"client {pid} is offline this round (hetero profile)")
    time.sleep(profile.latency_s + bytes_down / (profile.down_mbps * MBIT))


def emulate_after_training(
    profile: DeviceProfile, seed: int, pid: int, server_round: int, train_s: float, bytes_up: int
) -> None:
    """Real clock: stretch compute to the profile's speed, crash if drawn, wait for upload."""
    compute = train_s / profile.speed
    crash = crash_point(profile, seed, pid, server_round)
    if crash is not None:
        time.sleep(max(compute * crash - train_s, 0.0))
        raise InjectedNodeCrash(f"client {pid} crashed mid-training (hetero profile)")
    time.sleep(
        max(compute - train_s, 0.0) + profile.latency_s + bytes_up / (profile.up_mbps * MBIT)
    )


@lru_cache(maxsize=64)
def _profiles(spec: HeteroSpec, num_partitions: int, seed: int) -> tuple[DeviceProfile, ...]:
    return tuple(assign_profiles(spec, num_partitions, seed))


def real_clock_profile(
    cfg: Mapping[str, Any], num_partitions: int, pid: int, node_config: Mapping[str, Any]
) -> DeviceProfile | None:
    """This node's device profile when it must emulate it itself (real clock), else None.

    Simulation draws it from `hetero` with the run's seed (the server draws the same one);
    a deployed SuperNode may state its own in its node config (`speed=0.3 up-mbps=5 ...`).
    """
    spec = HeteroSpec.from_config(cfg.get("hetero"))
    stated = any(k in node_config for k in NODE_CONFIG_KEYS)
    if spec.virtual or not (spec.active or stated):
        return None
    base = DeviceProfile()
    if spec.active and 0 <= pid < num_partitions:
        base = _profiles(spec, num_partitions, int(cfg["seed"]))[pid]
    return profile_from_node_config(node_config, base)


def device_emulation_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower mod: a real-clock node behaves as its device profile says around the handler.

    Offline nodes refuse every message (heartbeats included); for messages that carry a model
    (training, probes) the node waits for the download, then, after the handler, stretches
    its compute to the profile's speed, crashes if drawn, and waits for the upload."""
    from fedapp.core.node import load_node

    node = load_node(context, with_data=False)
    pid = node.partition_id
    profile = real_clock_profile(node.cfg, node.num_clients, pid, context.node_config)
    if profile is None:
        return call_next(msg, context)
    seed = int(node.cfg.seed)
    config = msg.content.config_records.get("config")
    rnd = int(config.get("server-round", 0)) if config is not None else 0
    if "arrays" not in msg.content.array_records:  # a heartbeat: only availability
        if is_unavailable(profile, seed, pid, rnd):
            raise NodeUnavailable(f"client {pid} is offline this round (hetero profile)")
        return call_next(msg, context)
    size = msg.content["arrays"].count_bytes()
    emulate_before_training(profile, seed, pid, rnd, size)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    metrics = next(iter(reply.content.metric_records.values()), None)
    train_s = float(metrics.get("train_time_s", 0.0)) if metrics is not None else 0.0
    emulate_after_training(profile, seed, pid, rnd, train_s, size)
    return reply
