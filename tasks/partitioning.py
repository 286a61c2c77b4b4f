"""Build flwr-datasets partitioners from the `partition` config group (shared by all tasks)."""

from __future__ import annotations

from flwr_datasets.partitioner import (
    DirichletPartitioner,
    ExponentialPartitioner,
    IidPartitioner,
    LinearPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    SquarePartitioner,
)
from omegaconf import DictConfig

from tasks.base import DataError

PARTITIONERS = ("natural", "iid", "dirichlet", "size_skew")
SIZE_SKEW = {
    "linear": LinearPartitioner,
    "square": SquarePartitioner,
    "exponential": ExponentialPartitioner,
}


def make_partitioner(pcfg: DictConfig, *, natural_id: str, label: str, seed: int) -> Partitioner:
    """Return the flwr-datasets partitioner named by `pcfg.name`.

    natural_id: column that identifies a real-world client (writer, state, hospital).
    label: column used for label-skew partitioning.
    """
    name = str(pcfg.name)
    if name == "natural":
        return NaturalIdPartitioner(partition_by=natural_id)
    n = pcfg.get("num_partitions")
    if n is None or int(n) < 1:
        raise DataError(f"partition={name} needs partition.num_partitions >= 1 (got {n})")
    if name == "iid":
        return IidPartitioner(num_partitions=int(n))
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=int(n),
            partition_by=label,
            alpha=float(pcfg.alpha),
            min_partition_size=int(pcfg.get("min_partition_size", 10)),
            self_balancing=bool(pcfg.get("self_balancing", False)),
            shuffle=True,
            seed=seed,
        )
    if name == "size_skew":
        kind = str(pcfg.get("kind", "exponential"))
        if kind not in SIZE_SKEW:
            raise DataError(f"partition.kind={kind}: use one of {', '.join(SIZE_SKEW)}")
        return SIZE_SKEW[kind](num_partitions=int(n))
    raise DataError(f"unknown partition '{name}'; choose one of {', '.join(PARTITIONERS)}")
