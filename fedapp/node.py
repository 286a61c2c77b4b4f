"""What a ClientApp knows about the node it runs on: the run's config, the task, this node's
partition id and its data (cached per process, so a Ray actor or SuperNode loads them once).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context
from omegaconf import DictConfig

from fedapp.config import compose, resolve_data_dir
from tasks import ClientData, DataError, Task, get_task


@dataclass(frozen=True)
class Node:
    cfg: DictConfig
    task: Task
    partition_id: int  # -1: a deployed node with its own data and no partition id
    data_path: str  # "" in simulation
    federation_size: int = -1  # `num-partitions` of the node config (-1: not given)

    @property
    def num_clients(self) -> int:
        """The federation's number of clients: a deployed node (its own data) is told in its
        node config and never reads the pooled data; in simulation the partitioner says."""
        if not self.data_path:
            return self.task.num_partitions()
        if self.federation_size <= 0:
            raise DataError(
                "this node holds its own data: give the federation's size in its node config, "
                "e.g. --node-config 'data-path=... partition-id=0 num-partitions=3'"
            )
        return self.federation_size

    @property
    def data(self) -> ClientData:
        return _data(self.task, self.partition_id, self.data_path)


@lru_cache(maxsize=4)
def _cfg(overrides: str) -> DictConfig:
    return compose(overrides)


@lru_cache(maxsize=4)
def _task(overrides: str, data_dir: str) -> Task:
    # get_task's own cache is keyed by the resolved config's YAML, which took ~40 ms to
    # render on every message; the overrides string names the same config.
    return get_task(_cfg(overrides), Path(data_dir))


@lru_cache(maxsize=256)
def _data(task: Task, partition_id: int, data_path: str) -> ClientData:
    if data_path:
        return task.load_node_data(Path(data_path))
    return task.load_partition(partition_id)


def load_node(context: Context, with_data: bool = True) -> Node:
    """The node of this message's context; checks that it can serve the configured task."""
    overrides = str(context.run_config.get("overrides", ""))
    cfg = _cfg(overrides)
    torch.set_num_threads(max(int(cfg.simulation.client_num_cpus), 1))
    task = _task(overrides, str(resolve_data_dir(cfg, context.run_config)))
    node_config = context.node_config
    data_path = str(node_config.get("data-path", ""))
    if "partition-id" not in node_config and not data_path:
        raise DataError("node_config needs 'partition-id' (simulation) or 'data-path' (deployment)")
    pid = int(node_config.get("partition-id", -1))
    if not data_path:
        expected, have = task.num_partitions(), int(node_config.get("num-partitions", -1))
        if have != expected:
            raise DataError(
                f"this node is partition-id={pid} of num-partitions={have}, but "
                f"partition={cfg.partition.name} of task {cfg.task.name} makes {expected} clients "
                "and the message did not name its client (fedapp.clients maps clients to "
                "SuperNodes); is the ServerApp from another fedapp version?"
            )
    node = Node(cfg, task, pid, data_path, int(node_config.get("num-partitions", -1)))
    if with_data:
        _ = node.data  # load (and validate) now, so errors surface at the start
    return node


def client_seed(config: ConfigRecord, partition_id: int) -> int:
    """This client's seed in this round: (run seed, round, partition id)."""
    return (
        int(config.get("seed", 0)) * 1_000_003
        + int(config.get("server-round", 0)) * 10_007
        + partition_id
    )


def round_prep(config: ConfigRecord | None) -> dict[str, list[float]]:
    """Federated preprocessing parameters (global means, class weights...) sent by the server."""
    return {k: list(v) for k, v in (config or {}).items() if k.startswith("prep.")}
