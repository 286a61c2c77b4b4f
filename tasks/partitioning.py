"""Build flwr-datasets partitioners from the `partition` config group (shared by all tasks)."""

from __future__ import annotations

from contextlib import contextmanager

from datasets import Dataset
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


class ExplainedDirichletPartitioner(Partitioner):
    """flwr-datasets' Dirichlet partitioner behind its public interface, with its give-up
    after 10 draws turned into a DataError that says which settings to change (the
    library's own error only says "update alpha"). It delegates to the library's partitioner
    and only translates that error."""

    def __init__(self, inner: DirichletPartitioner, settings: str) -> None:
        super().__init__()
        self.inner = inner
        self.settings = settings

    @property
    def dataset(self) -> Dataset:
        return self.inner.dataset

    @dataset.setter
    def dataset(self, value: Dataset) -> None:
        self.inner.dataset = value

    def is_dataset_assigned(self) -> bool:
        return self.inner.is_dataset_assigned()

    def load_partition(self, partition_id: int) -> Dataset:
        with self._explained():
            return self.inner.load_partition(partition_id)

    @property
    def num_partitions(self) -> int:
        with self._explained():
            return self.inner.num_partitions

    @contextmanager
    def _explained(self):
        try:
            yield
        except ValueError as err:
            if "max number of attempts" not in str(err):
                raise
            raise DataError(
                f"partition=dirichlet could not give each of {self.settings}: "
                "with few classes and a small alpha most clients draw almost nothing. Raise "
                "partition.alpha, lower partition.num_partitions or "
                "partition.min_partition_size, or try another seed."
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
        alpha, min_size = float(pcfg.alpha), int(pcfg.get("min_partition_size", 10))
        inner = DirichletPartitioner(
            num_partitions=int(n),
            partition_by=label,
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=bool(pcfg.get("self_balancing", False)),
            shuffle=True,
            seed=seed,
        )
        settings = (
            f"{int(n)} clients partition.min_partition_size={min_size} rows in 10 draws "
            f"(alpha={alpha:g}, seed={seed})"
        )
        return ExplainedDirichletPartitioner(inner, settings)
    if name == "size_skew":
        kind = str(pcfg.get("kind", "exponential"))
        if kind not in SIZE_SKEW:
            raise DataError(f"partition.kind={kind}: use one of {', '.join(SIZE_SKEW)}")
        return SIZE_SKEW[kind](num_partitions=int(n))
    raise DataError(f"unknown partition '{name}'; choose one of {', '.join(PARTITIONERS)}")
