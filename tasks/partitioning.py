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


class _DirichletPartitioner(DirichletPartitioner):
    """flwr-datasets' partitioner, with its give-up after 10 draws turned into a DataError that
    says which settings to change (the library's own error only says "update alpha")."""

    def _determine_partition_id_to_indices_if_needed(self) -> None:
        try:
            super()._determine_partition_id_to_indices_if_needed()
        except ValueError as err:
            if "max number of attempts" not in str(err):
                raise
            raise DataError(
                f"partition=dirichlet could not give each of {self._num_partitions} clients "
                f"partition.min_partition_size={self._min_partition_size} rows in 10 draws "
                f"(alpha={float(self._alpha.min()):g}, seed={self._seed}): with few classes and "
                "a small alpha most clients draw almost nothing. Raise partition.alpha, lower "
                "partition.num_partitions or partition.min_partition_size, or try another seed."
            ) from err


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
        return _DirichletPartitioner(
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
