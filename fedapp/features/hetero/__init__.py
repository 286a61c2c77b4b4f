"""Device heterogeneity: per-client device profiles and the clock every strategy runs on.

A federation mixes fast data-centre nodes with slow branch-office machines on poor links, and
nodes drop out. This module models that, for every strategy alike:

- **Profiles** (`conf/hetero/*.yaml`, `hetero=<name>`): each client gets a compute speed
  factor, download/upload bandwidth, latency, a probability of being unavailable and a
  probability of crashing mid-training. In simulation they are drawn from the config's
  hardware classes with the run's seed (`assign_profiles`); in deployment a SuperNode states
  its own with `--node-config "speed=0.3 down-mbps=10 ..."` (`profile_from_node_config`).
- **Clock** (`ClockGrid`, wrapping Flower's `Grid`): every strategy talks to the clients
  through it, so every strategy is timed the same way.
  - `clock: virtual` (simulation): no one sleeps. A message's simulated duration is
    latency + model bytes / download bandwidth + compute + latency + bytes / upload bandwidth,
    with compute = local steps x `step_time_s` / speed (`compute: steps`, deterministic, the
    default) or the client's measured training time / speed (`compute: measured`). Replies
    are released in simulated-arrival order and a `timeout` is a simulated deadline.
    Unavailable nodes and mid-training crashes become error replies at the moment the
    SuperLink would notice (`detect_s`, Flower's node heartbeat interval). Federated
    *evaluation* messages are measurement, not training, and cost no simulated time.
  - `clock: real`: the ClientApp itself waits and fails as its profile says
    (`device_emulation_mod`, a Flower mod around the training, probe and heartbeat handlers),
    and simulated time is wall time.
    With `hetero=none` nothing is emulated and `sim_time_s` is plain wall time.

Flower has no notion of simulated time or device profiles; this is the smallest layer that
gives one clock to synchronous strategies (through `send_and_receive`, which Flower's
`Strategy.start` loop calls) and to event-driven ones (FedAsync, tiered scheduling: `submit`,
`next_event`, `now`), while the messages themselves still travel through Flower's Grid.

The modules: `profiles` (device profiles and their seeded draws), `emulation` (the real
clock's waits and failures in the ClientApp), `clock` (the virtual clock, `ClockGrid`).
"""

from __future__ import annotations

from fedapp.features.hetero.clock import ClockGrid, Event, Flight
from fedapp.features.hetero.emulation import (
    InjectedNodeCrash,
    NodeUnavailable,
    device_emulation_mod,
    emulate_after_training,
    emulate_before_training,
    real_clock_profile,
)
from fedapp.features.hetero.profiles import (
    MBIT,
    NODE_CONFIG_KEYS,
    DeviceProfile,
    HeteroSpec,
    assign_profiles,
    crash_point,
    is_unavailable,
    payload_bytes,
    profile_from_node_config,
)

__all__ = [
    "ClockGrid",
    "DeviceProfile",
    "Event",
    "Flight",
    "HeteroSpec",
    "InjectedNodeCrash",
    "MBIT",
    "NODE_CONFIG_KEYS",
    "NodeUnavailable",
    "assign_profiles",
    "crash_point",
    "device_emulation_mod",
    "emulate_after_training",
    "emulate_before_training",
    "is_unavailable",
    "payload_bytes",
    "profile_from_node_config",
    "real_clock_profile",
]
