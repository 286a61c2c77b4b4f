"""What the round loop (strategies.base, strategies.scheduler) asks of the features it carries.

The strategies sit below the features (bench/import_graph.py): they call these interfaces and
never import a feature. The ServerApp (a composition root) hands each strategy the objects
that implement them: the run's update codec (fedapp.features.compression.CompressionSpec), the
encrypted aggregation (fedapp.features.secure.SecureAggregator), a release mechanism around the
training rounds (fedapp.features.privacy.CentralDP), a phase of rounds before the first
training round (fedapp.features.synthetic.GeneratorPhase), and an event clock as the grid
(fedapp.features.hetero.ClockGrid) for strategies that schedule their own rounds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

__all__ = [
    "PLAIN",
    "CodecError",
    "EncryptedAggregation",
    "PlainCodec",
    "PrePhase",
    "ReleaseMechanism",
    "SyntheticRows",
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


class ReleaseMechanism(Protocol):
    """A server-side mechanism around a strategy's training rounds (central DP: Flower's
    fixed-clipping wrapper clips, averages and noises). The strategy's own round loop sends
    the training messages it makes and keeps the aggregate it returns, asks it before each
    round whether another may start, and tells it when the run resumes; evaluation, records
    and everything else stay the strategy's."""

    def bind(self) -> None:
        """Called once the strategy knows its federation (`FedappStrategyMixin.bind`)."""
        ...

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any
    ) -> Iterable[Message]: ...

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]: ...

    def stop_reason(self) -> str | None:
        """Why no further round may start (a spent budget), or None."""
        ...

    def privacy_epsilon(self) -> float:
        """The epsilon released so far (the run's `dp_epsilon`)."""
        ...

    def resumed(self) -> None:
        """The run resumes from a checkpoint (a release after it may have happened)."""
        ...


class PrePhase(Protocol):
    """Rounds before the first training round whose state then goes with the model. The
    strategy's round loop plays rounds 1..`rounds` through `play_round`, which uses only the
    strategy's public round API (`send_phase_round`, `round_log`, `set_weights`,
    `min_replies`)."""

    record_key: ClassVar[str]  # the extra ArrayRecord of training messages
    arrays: ArrayRecord  # the state it sends
    holders: set[int]  # partitions that hold it already

    @property
    def rounds(self) -> int:
        """How many rounds of the run are this phase's (from round 1)."""
        ...

    def play_round(
        self, strategy: Any, server_round: int, grid: Any, config: ConfigRecord, timeout: float
    ) -> None: ...

    def train_config(self, num_rounds: int) -> dict[str, Any]:
        """Entries of every training round's ConfigRecord."""
        ...

    def note_replies(self, expected: Iterable[int], ok: Iterable[int]) -> None: ...


class SyntheticRows(PrePhase, Protocol):
    """A generator phase that also screens and pools the synthetic rows clients send once
    (strategy=synthetic's sharing round)."""

    spec: Any  # the generator's settings (rounds, zclip, ...)

    def screen_rows(self, record: ArrayRecord, prep: Any, max_rows: int) -> tuple[Any, str | None]:
        """(rows, None) for rows that respect the task's table, else (None, the reason)."""
        ...

    def concat_rows(self, parts: list) -> Any: ...

    def quality(self, synth: Any, real: Any, task: Any, prep: Any) -> dict[str, Any]: ...


def is_event_clock(grid: Any) -> bool:
    """Whether `grid` is an event clock (declares `event_clock = True`): submit, now,
    next_event, as event-driven strategies need."""
    return bool(getattr(type(grid), "event_clock", False))
