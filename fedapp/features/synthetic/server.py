"""The server's side: the generator rounds (`GeneratorPhase`, a plug-in the strategy's one round
loop plays, fedapp.core.plugins.PrePhase), the checks a synthetic-data run must pass and the
wiring into the strategy (`check`, `attach`; fedapp.server_app)."""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    MessageType,
)
from flwr.common import log
from omegaconf import DictConfig

from fedapp.features.synthetic import rows
from fedapp.features.synthetic.model import (
    Layout,
    initial_generator,
)
from fedapp.features.synthetic.rows import generator_digest
from fedapp.features.synthetic.spec import (
    GEN_DIGEST,
    GEN_KEY,
    AugmentSpec,
    GeneratorSpec,
    SyntheticError,
    augment_active,
    generator_spec,
    shares_rows,
)
from strategies.aggregation import weighted_aggregate
from strategies.base import layers, num_examples, to_record
from tasks.training import TrainSettings

# -- the server's generator rounds ----------------------------------------------------------------


class GeneratorPhase:
    """Rounds 1..`spec.rounds` of a run: the generator trained federatedly (FedAvg of the
    clients' local, DP, epochs), through the run's strategy's sampling, screening and round
    records, whatever its own aggregation rule (a trust or robust rule is about task-model
    updates). The strategy's one round loop plays these rounds (`play_round`) before its
    first training round, through its public round API (`send_phase_round`, `round_log`,
    `set_weights`). Its state (`arrays`) is an attribute of the strategy, so checkpoints
    carry it.

    augment=rare_class then sends the final generator to each client once: `holders` are the
    partitions whose last training message (after the generator rounds) carried it or found
    it kept, and that replied without an error. A client that errs or does not reply leaves
    them (it may have lost its copy) and gets the generator again the next time.

    strategy=synthetic's sharing round screens and pools the clients' rows with it
    (`screen_rows`, `concat_rows`, `quality`; fedapp.core.plugins.SyntheticRows), so the
    strategy never imports this feature."""

    # fedapp.core.plugins.PrePhase: the generator's record in training messages
    record_key = GEN_KEY
    # the task's table; None in a phase unpickled from a checkpoint written before the phase
    # held it (5a4ea51): `resumed` gives it back
    layout: Layout | None = None

    def __init__(self, spec: GeneratorSpec, initial: ArrayRecord, layout: Layout | None = None):
        self.spec = spec
        self.arrays = initial
        self.holders: set[int] = set()
        self.layout = layout  # the task's table (strategy=synthetic screens rows against it)

    @property
    def rounds(self) -> int:
        return self.spec.rounds

    def train_config(self, num_rounds: int) -> dict[str, Any]:
        """What every training round's ConfigRecord says: the rounds DP-SGD is planned for
        (those after the generator's) and the generator a client must use."""
        return {
            "dp-rounds": max(1, num_rounds - self.spec.rounds),
            GEN_DIGEST: generator_digest(self.arrays),
        }

    def note_replies(self, expected: Iterable[int], ok: Iterable[int]) -> None:
        """A training round's outcome: the partitions that replied without an error hold the
        generator; the other expected ones may not."""
        ok = set(ok)
        self.holders = (self.holders | ok) - (set(expected) - ok)

    def resumed(self) -> None:
        """A resumed run cannot know whether clients kept their copies (a deployed node
        without `state-dir` keeps `Context.state` for one Flower run only): send it again."""
        self.holders = set()

    def play_round(self, strategy, rnd: int, grid, config: ConfigRecord, timeout: float) -> None:
        """Generator round `rnd`: the generator to the round's sample, their local (DP) epochs
        back, screened as the strategy screens any reply, averaged by their examples."""
        accepted = strategy.send_phase_round(
            rnd, self.arrays, config, grid, f"{MessageType.TRAIN}.generator", timeout
        )
        rec = strategy.round_log(rnd)
        rec.aggregation["phase"] = "generator"
        rec.num_replies = len(accepted)
        rec.num_failures = len(rec.expected) - len(accepted)
        if len(accepted) < strategy.min_replies:
            log(
                WARNING,
                "round %d: %d generator updates < min_replies; generator kept",
                rnd,
                len(accepted),
            )
            return
        n = np.array([num_examples(m) for m in accepted])
        keys = list(self.arrays.keys())
        clients = [layers(m.content["arrays"], keys) for m in accepted]
        new = weighted_aggregate(layers(self.arrays, keys), clients, n / n.sum(), np.ones(len(n)))
        self.arrays = to_record(keys, new)
        rec.aggregated = True
        strategy.set_weights(rec, accepted, (n / n.sum()).tolist())
        log(INFO, "round %d: generator averaged over %d clients", rnd, len(accepted))

    # -- strategy=synthetic's sharing round (fedapp.core.plugins.SyntheticRows) ------------------
    def screen_rows(self, record: ArrayRecord, prep, max_rows: int):
        """(Rows, None) for a client's rows that respect the task's table, else (None, why)."""
        if self.layout is None:
            raise SyntheticError("the generator phase was attached without the task's table")
        return rows.screen_rows(record, self.layout, prep, self.spec.zclip, max_rows)

    def concat_rows(self, parts: list):
        return rows.concat_rows(parts)

    def quality(self, synth, real, task, prep) -> dict[str, Any]:
        return rows.quality(synth, real, task, prep)


# -- the run's checks and wiring (fedapp.server_app) -------------------------------------------------


def check(cfg: DictConfig, task=None) -> None:
    """Refuse a synthetic-data run that cannot be honest: on composing the config (no task),
    and with the task at the ServerApp's start, before any statistic is asked for."""
    synthetic = shares_rows(cfg)
    augment = augment_active(cfg)
    if not (synthetic or augment):
        AugmentSpec.from_config(cfg.get("augment"))  # still catch a misspelled augment key
        return
    what = "strategy=synthetic" if synthetic else "augment=rare_class"
    if synthetic and augment:
        raise SyntheticError("strategy=synthetic shares synthetic rows already; use augment=none")
    if task is not None:
        Layout.of(task)
    if generator_spec(cfg).refine != "none" and not synthetic:
        raise SyntheticError(
            "augment.generator.refine: the discriminator refines the rows strategy=synthetic "
            "sends; rare-class augmentation samples from the federation's generator as it is "
            "(set augment.generator.refine=none)"
        )
    privacy = str((cfg.get("privacy") or {}).get("name", "none"))
    if privacy not in ("none", "sample_dp"):
        raise SyntheticError(
            f"{what} runs with privacy=sample_dp (or none): under privacy={privacy} the "
            "generator's updates would not be covered by the guarantee"
        )
    for group in ("secure", "compression"):
        name = str((cfg.get(group) or {}).get("name", "none"))
        if name != "none":
            raise SyntheticError(f"{what} is not built for {group}={name} yet; use {group}=none")
    if augment:
        from hydra.utils import get_class

        cls = get_class(str(cfg.strategy._target_))
        if cls.schedules_rounds:
            raise SyntheticError(
                f"augment=rare_class runs with round-based strategies (fedavg, fedprox, trust, "
                f"...); strategy={cfg.strategy.name} schedules its own rounds"
            )
        rounds = AugmentSpec.from_config(cfg.augment).generator.rounds
        if int(cfg.rounds) <= rounds:
            raise SyntheticError(
                f"rounds={cfg.rounds} leaves no training round after augment.generator.rounds="
                f"{rounds}; set rounds > {rounds}"
            )


def resumed(strategy, task) -> None:
    """A resumed run's generator phase (after the checkpoint's state is back in the strategy):
    augment's clients may have lost their copies of the generator, and a phase from a
    checkpoint written before it held the task's table gets the table again."""
    phase = strategy.round_phase()
    if isinstance(phase, GeneratorPhase) and phase.layout is None:
        phase.layout = Layout.of(task)
    if strategy.generator_phase is not None:
        strategy.generator_phase.resumed()


def attach(strategy, cfg: DictConfig, task, prep, settings: TrainSettings) -> None:
    """Give the strategy its generator phase (and, strategy=synthetic, the task)."""
    synthetic = shares_rows(cfg)
    if not (synthetic or augment_active(cfg)):
        return
    spec = generator_spec(cfg)
    phase = GeneratorPhase(
        spec,
        ArrayRecord(initial_generator(task, spec, int(cfg.seed)).state_dict()),
        Layout.of(task),
    )
    if synthetic:
        strategy.bind_task(task, prep, settings, phase)
    else:
        strategy.generator_phase = phase
