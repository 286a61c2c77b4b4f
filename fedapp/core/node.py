"""What a ClientApp knows about the node it runs on: the run's config, the task, this node's
partition id, its policy and its data (cached per process, so a Ray actor or SuperNode loads
them once).

The run's config is composed on the node from the node's own `conf/` with only the overrides a
client takes from a server (`fedapp.core.policy.client_overrides`), the node's own task folders and
validation share, and is then checked against the node's policy (`NodePolicy.enforce`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, RecordDict
from omegaconf import DictConfig

from fedapp.core import seeds
from fedapp.core.config import compose, resolve_data_dir
from fedapp.core.policy import NodePolicy, client_overrides, client_searchpath, searchpath_override
from tasks import ClientData, DataError, Task, get_task


@dataclass(frozen=True)
class Node:
    cfg: DictConfig
    task: Task
    partition_id: int  # -1: a deployed node with its own data and no partition id
    data_path: str  # "" in simulation
    federation_size: int = -1  # `num-partitions` of the node config (-1: not given)
    policy: NodePolicy = NodePolicy()

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


@lru_cache(maxsize=8)
def _cfg(overrides: tuple[str, ...]) -> DictConfig:
    return compose(list(overrides))


@lru_cache(maxsize=8)
def _task(overrides: tuple[str, ...], data_dir: str) -> Task:
    # get_task's own cache is keyed by the resolved config's YAML, which took ~40 ms to
    # render on every message; the overrides name the same config.
    return get_task(_cfg(overrides), Path(data_dir))


@lru_cache(maxsize=64)
def _client_overrides(overrides: str) -> tuple[str, ...]:
    return tuple(client_overrides(overrides))


def node_overrides(context: Context, policy: NodePolicy | None = None) -> tuple[str, ...]:
    """The overrides this node composes its config with: what it takes from the server's,
    then its own task folders and validation share."""
    node_config = context.node_config
    policy = policy or NodePolicy.from_node_config(node_config)
    out = [*_client_overrides(str(context.run_config.get("overrides", "")))]
    out += searchpath_override(client_searchpath(node_config))
    if policy.val_fraction is not None:
        out.append(f"task.client_val_fraction={policy.val_fraction!r}")
    return tuple(out)


def node_cfg(context: Context) -> DictConfig:
    """The run's config as this node composes it (its own conf/, the overrides its policy
    accepts); needs neither the task's data nor a partition id. Whether the policy accepts
    it is the handlers' check (`load_node`)."""
    return _cfg(node_overrides(context))


def node_data_dir(cfg: DictConfig, context: Context, policy: NodePolicy) -> Path:
    """Where this node reads datasets: a node with its own configuration never takes the
    folder from the run config (the server's); its `data-dir`, $FEDAPP_DATA_DIR or the
    default."""
    if policy.own:
        return resolve_data_dir(cfg, {"data-dir": context.node_config.get("data-dir")})
    return resolve_data_dir(cfg, context.run_config)


@lru_cache(maxsize=256)
def _data(task: Task, partition_id: int, data_path: str) -> ClientData:
    if data_path:
        return task.load_node_data(Path(data_path))
    return task.load_partition(partition_id)


def load_node(context: Context, with_data: bool = True) -> Node:
    """The node of this message's context; checks that it can serve the configured task and
    that the run's configuration is not weaker than the node's policy (PolicyRefusal)."""
    node_config = context.node_config
    policy = NodePolicy.from_node_config(node_config)
    overrides = node_overrides(context, policy)
    cfg = _cfg(overrides)
    policy.enforce(cfg)
    torch.set_num_threads(max(int(cfg.simulation.client_num_cpus), 1))
    task = _task(overrides, str(node_data_dir(cfg, context, policy)))
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
                "and the message did not name its client (fedapp.features.clients maps clients to "
                "SuperNodes); is the ServerApp from another fedapp version?"
            )
    node = Node(cfg, task, pid, data_path, int(node_config.get("num-partitions", -1)), policy)
    if with_data:
        _ = node.data  # load (and validate) now, so errors surface at the start
    return node


def natural_names(context: Context, node_config: dict, partition_id: int) -> list[str]:
    """The natural ids (hospital, state...) of simulation partition `partition_id`, read with
    the node's own configuration (for looking up its policy)."""
    ctx = Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=node_config,
        state=RecordDict(),
        run_config=context.run_config,
    )
    policy = NodePolicy.from_node_config(node_config)
    overrides = node_overrides(ctx, policy)
    task = _task(overrides, str(node_data_dir(_cfg(overrides), ctx, policy)))
    return [str(n) for n in task.natural_ids(partition_id)]


def client_seed(config: ConfigRecord, partition_id: int) -> int:
    """This client's seed in this round: (run seed, round, partition id)."""
    return seeds.torch_seed(
        "client", int(config.get("seed", 0)), int(config.get("server-round", 0)), partition_id
    )


def round_prep(config: ConfigRecord | None) -> dict[str, list[float]]:
    """Federated preprocessing parameters (global means, class weights...) sent by the server."""
    return {k: list(v) for k, v in (config or {}).items() if k.startswith("prep.")}
