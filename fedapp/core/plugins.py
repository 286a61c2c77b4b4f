"""What the round loop (strategies.base, strategies.scheduler) asks of the features it carries.

The strategies sit below the features (bench/import_graph.py): they call these interfaces and
never import a feature. The ServerApp (a composition root) hands each strategy the objects
that implement them: the run's update codec (fedapp.features.compression.CompressionSpec), the
encrypted aggregation (fedapp.features.secure.SecureAggregator), a phase of rounds before the first
training round (fedapp.features.synthetic.GeneratorPhase), and an event clock as the grid
(fedapp.features.hetero.ClockGrid) for strategies that schedule their own rounds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from flwr.app import ArrayRecord, Message

__all__ = [
    "PLAIN",
    "CodecError",
    "EncryptedAggregation",
    "PlainCodec",
    "PrePhase",
    "UpdateCodec",
    "is_event_clock",
]


class CodecError(ValueError):
    """An update that cannot be decoded (the reply is rejected with this reason)."""


class UpdateCodec(Protocol):
    """How models travel: the global model down, clients' encoded updates up."""

    active: bool  # updates arrive encoded (decode them onto the model they left from)

    def encode_downlink(self, arrays: ArrayRecord) -> ArrayRecord: ...

    def decode_update(self, arrays: ArrayRecord, base: ArrayRecord | None) -> ArrayRecord:
        """The client's model from its encoded reply; raises CodecError."""
        ...


@dataclass(frozen=True)
class PlainCodec:
    """No compression: models travel as they are."""

    active: bool = False

    def encode_downlink(self, arrays: ArrayRecord) -> ArrayRecord:
        return arrays

    def decode_update(self, arrays: ArrayRecord, base: ArrayRecord | None) -> ArrayRecord:
        return arrays


PLAIN = PlainCodec()


class EncryptedAggregation(Protocol):
    """Aggregation of ciphertexts with public weights; the server holds the public key only."""

    fednova_momentum: float | None  # FedNova's rule (its momentum), else FedAvg's

    @property
    def keys(self) -> list[str]:
        """The ArrayRecord keys an encrypted reply carries (uint8 ciphertexts)."""
        ...

    def screen(self, client_id: int, arrays: ArrayRecord) -> str | None: ...

    def aggregate(
        self, accepted: list[Message], weights: list[float], steps: list[float]
    ) -> ArrayRecord: ...


class PrePhase(Protocol):
    """Rounds before the first training round whose state then goes with the model."""

    record_key: ClassVar[str]  # the extra ArrayRecord of training messages
    arrays: ArrayRecord  # the state it sends
    holders: set[int]  # partitions that hold it already

    def train_config(self, num_rounds: int) -> dict[str, Any]:
        """Entries of every training round's ConfigRecord."""
        ...

    def note_replies(self, expected: Iterable[int], ok: Iterable[int]) -> None: ...


def is_event_clock(grid: Any) -> bool:
    """Whether `grid` is an event clock (declares `event_clock = True`): submit, now,
    next_event, as event-driven strategies need."""
    return bool(getattr(type(grid), "event_clock", False))
