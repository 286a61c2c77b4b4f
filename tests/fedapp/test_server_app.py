"""Node discovery: partition ids come from the nodes; a wrongly sized federation stops at once."""

from __future__ import annotations

import pytest
from flwr.app import Message, MetricRecord, RecordDict

from fedapp.config import ConfigError
from fedapp.flower_compat import set_task_identity
from fedapp.server_app import discover_nodes


class QueryGrid:
    """A grid whose nodes answer the discovery QUERY from their node config."""

    def __init__(self, node_configs: dict[int, dict]):
        self.node_configs = node_configs

    def get_node_ids(self):
        return list(self.node_configs)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            nc = self.node_configs[msg.metadata.dst_node_id]
            set_task_identity(node_id=msg.metadata.dst_node_id)
            metrics = {
                "partition-id": nc.get("partition-id", -1),
                "num-partitions": nc.get("num-partitions", -1),
                "has-data-path": int("data-path" in nc),
            }
            replies.append(Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg))
        set_task_identity(node_id=0)
        return replies


def test_maps_node_ids_to_partition_ids():
    grid = QueryGrid({900 + p: {"partition-id": p, "num-partitions": 5} for p in range(5)})
    assert discover_nodes(grid, min_nodes=3, wait_s=5, num_partitions=5) == {
        900 + p: p for p in range(5)
    }


def test_flower_default_two_supernodes_fail_fast_with_the_fix():
    grid = QueryGrid(
        {1: {"partition-id": 0, "num-partitions": 2}, 2: {"partition-id": 1, "num-partitions": 2}}
    )
    with pytest.raises(ConfigError, match="num-supernodes=201"):
        discover_nodes(grid, min_nodes=20, wait_s=600, num_partitions=201)


def test_deployment_nodes_with_own_data_are_not_checked_against_the_partitioner():
    grid = QueryGrid(
        {
            7: {"data-path": "/x", "partition-id": 0, "num-partitions": 2},
            8: {"data-path": "/y", "partition-id": 1, "num-partitions": 2},
        }
    )
    assert discover_nodes(grid, min_nodes=20, wait_s=5, num_partitions=201) == {7: 0, 8: 1}


def test_duplicate_partition_ids_are_rejected():
    grid = QueryGrid(
        {1: {"partition-id": 0, "num-partitions": 2}, 2: {"partition-id": 0, "num-partitions": 2}}
    )
    with pytest.raises(ConfigError, match="both claim"):
        discover_nodes(grid, min_nodes=2, wait_s=5, num_partitions=2)


def test_too_few_nodes_times_out_with_a_clear_error():
    grid = QueryGrid({1: {"data-path": "/x", "partition-id": 0, "num-partitions": 3}})
    with pytest.raises(ConfigError, match="only 1 SuperNodes"):
        discover_nodes(grid, min_nodes=3, wait_s=1.5)
