"""strategy=synthetic: privacy-distilled synthetic data instead of (or before) model updates.

Seed 004's method (fedapp/features/synthetic/ has the generator, its privacy and what was left out):

1. rounds 1..G (`generator.rounds`): the generator is trained federatedly, FedAvg of the
   clients' local (DP-SGD) epochs;
2. round G+1, the sharing round: every client fine-tunes the global generator on its own rows
   (DP-SGD, `generator.finetune_epochs`) and sends `rows_factor` x its training rows of
   synthetic rows, once; the server screens them against the schema, trains the task model
   on their union for `server_epochs` (each client's rows in proportion to its size: the
   weighted aggregation of samples) and evaluates it as any round's model;
3. `mode=oneshot` stops there (rounds G+1 < `rounds`: the stop is stated in results.json);
   `mode=hybrid` continues with FedAvg rounds on real data from that warm start, to `rounds`.

Everything a client sends is in its one DP ledger under privacy=sample_dp (statistics,
generator steps and, in hybrid, DP-SGD of the task model, calibrated for the rounds that
remain). Bytes: the generator both ways in its rounds, the generator down and the rows up in
the sharing round. Synthetic-data quality goes to `synthetic.json` in the run folder.
"""

from __future__ import annotations

import json
import time
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy import Result

from fedapp.core import seeds
from fedapp.core.config import ConfigError
from fedapp.core.plugins import SyntheticRows
from strategies.base import FedappStrategyMixin, reply_metrics
from tasks.base import ClientData
from tasks.training import TrainSettings

MODES = ("oneshot", "hybrid")
# dtype kinds of the synthetic rows' arrays as rows_record sends them: float z-scores, integer
# category codes and labels
ROW_KINDS = {"numeric": "f", "codes": "iu", "y": "iu"}


class SyntheticRoundFailed(RuntimeError):
    """Too few clients sent usable synthetic rows: the task model could not be trained."""


class SyntheticData(FedappStrategyMixin, flwr_strategy.FedAvg):
    """See the module docstring."""

    schedules_rounds = True
    shares_synthetic_rows = True

    def __init__(
        self,
        mode: str = "oneshot",
        generator: dict[str, Any] | None = None,
        rows_factor: float = 1.0,
        max_rows: int = 20000,
        server_epochs: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ConfigError(f"strategy.mode={mode}: use oneshot or hybrid")
        if not rows_factor > 0 or int(max_rows) < 1 or int(server_epochs) < 1:
            raise ConfigError("strategy.rows_factor must be > 0, max_rows and server_epochs >= 1")
        self.mode = mode
        # strategy.generator is the feature's (fedapp.features.synthetic.GeneratorSpec, checked
        # when the config is composed); its phase brings it parsed (`bind_task`)
        self.rows_factor, self.max_rows = float(rows_factor), int(max_rows)
        self.server_epochs = int(server_epochs)
        self.phase: SyntheticRows | None = None
        self.report: dict[str, Any] = {}
        self.synthetic_rows = None  # the union the server trained on (tasks.tabular.Rows)
        self._received: dict[int, Any] = {}  # sharing round: rows by the reply's node id
        self._sharing = False  # replies being screened are synthetic rows

    def bind_task(self, task, prep, settings: TrainSettings, phase: SyntheticRows) -> None:
        """The server-side pieces (fedapp.features.synthetic.attach): the task (model, training,
        test set), the federated preprocessing parameters, the clients' training settings, the
        generator's phase (its rounds, its settings, the screening of rows)."""
        self.task, self.prep, self.settings, self.phase = task, dict(prep), settings, phase

    @property
    def spec(self):
        """The generator's settings (fedapp.features.synthetic.GeneratorSpec)."""
        return self.phase.spec

    @property
    def share_round(self) -> int:
        return self.phase.rounds + 1

    def round_config(self, server_round: int, config: ConfigRecord) -> dict[str, Any]:
        # hybrid: DP-SGD of the task model is planned for the rounds after the sharing round
        return {"dp-rounds": max(1, self._num_rounds - self.share_round)}

    # -- the run: the mixin's round loop, with the generator's rounds first --------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn=None,
        start_round: int = 1,
    ) -> Result:
        if num_rounds < self.share_round:
            raise ConfigError(
                f"rounds={num_rounds} leaves no sharing round after generator.rounds="
                f"{self.phase.rounds}; set rounds >= {self.share_round}"
            )
        return super().start(
            grid,
            initial_arrays,
            num_rounds,
            timeout,
            train_config,
            evaluate_config,
            evaluate_fn,
            start_round,
        )

    def round_phase(self):
        return self.phase

    def planned_stop(self, server_round: int) -> str | None:
        if self.mode == "oneshot" and server_round > self.share_round:
            return (
                f"one-shot mode: {self.phase.rounds} generator rounds and one sharing round; "
                f"rounds={self._num_rounds} are for mode=hybrid"
            )
        return None

    def train_round(
        self,
        server_round: int,
        arrays: ArrayRecord,
        grid: Grid,
        config: ConfigRecord,
        timeout: float,
    ) -> tuple[ArrayRecord | None, list[Message]]:
        if server_round == self.share_round:
            return self.sharing_round(grid, arrays, config, timeout), []
        return super().train_round(server_round, arrays, grid, config, timeout)

    def sharing_round(
        self, grid: Grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float
    ) -> ArrayRecord:
        """Every client sends synthetic rows once; the server trains the task model on them."""
        rnd = self.share_round
        self._round = rnd
        rec = self.round_log(rnd)
        rec.aggregation["phase"] = "synthesize"
        chosen = sorted(
            self.node_partitions[n] for n in grid.get_node_ids() if n in self.node_partitions
        )
        rec.expected, rec.dispatched = chosen, len(chosen)
        # no generator rounds: clients start from the run's common initial generator, unsent
        generator = self.phase.arrays if self.spec.rounds else ArrayRecord()
        rec.bytes_down += generator.count_bytes() * len(chosen)
        content_config = ConfigRecord({**dict(config), "server-round": rnd})
        messages = [
            Message(
                content=RecordDict({"arrays": generator, "config": content_config}),
                message_type=f"{MessageType.TRAIN}.synthesize",
                dst_node_id=self.partition_nodes[p],
            )
            for p in chosen
        ]
        self._received = {}
        self._sharing = True
        try:
            accepted = self.screen_replies(
                rnd, list(grid.send_and_receive(messages, timeout=timeout)), "train"
            )
        finally:
            self._sharing = False
        rec.num_replies = len(accepted)
        rec.num_failures = len(chosen) - len(accepted)
        if len(accepted) < self.min_replies:
            raise SyntheticRoundFailed(
                f"round {rnd}: {len(accepted)} clients sent usable synthetic rows (min_replies="
                f"{self.min_replies}); the task model was not trained. See results.json "
                "rounds[].clients for each client's status"
            )
        parts = [self._received[m.metadata.src_node_id] for m in accepted]
        union = self.phase.concat_rows(parts)
        sizes = np.array([len(p) for p in parts], dtype=np.float64)
        self.set_weights(rec, accepted, (sizes / sizes.sum()).tolist())
        t0 = time.perf_counter()
        model = self.task.make_model()
        model.load_state_dict(arrays.to_torch_state_dict())
        settings = TrainSettings(
            **{**self.settings.__dict__, "local_epochs": self.server_epochs, "max_steps": 0}
        )
        data = ClientData(
            train=union,
            val=union.take(np.arange(0)),
            label_counts=np.bincount(union.y, minlength=self.task.num_classes),
        )
        # The same bits in every engine: dropout draws independent of whatever else ran in this
        # process, and one thread (a ServerApp process's default thread count sums in
        # another order than the in-process engine's)
        threads = torch.get_num_threads()
        with torch.random.fork_rng():
            torch.manual_seed(seeds.torch_seed("synthetic.round", self.seed, rnd))
            torch.set_num_threads(1)
            try:
                trained = self.task.train(model, data, settings, self.prep)
            finally:
                torch.set_num_threads(threads)
        rec.aggregated = True
        rec.train_metrics = {"server_train_loss": float(trained["train_loss"])}
        rec.aggregation.update(
            synthetic_rows=int(len(union)),
            server_train_s=time.perf_counter() - t0,
            rows_bytes=int(sum(m.content["rows"].count_bytes() for m in accepted)),
        )
        self.synthetic_rows = union
        self.report = {
            "mode": self.mode,
            "sharing_round": rnd,
            "generator": self.spec.__dict__,
            "clients": len(accepted),
            "rows": int(len(union)),
            "rows_per_client": {
                str(self.partition_of(m.metadata.src_node_id)): int(len(p))
                for m, p in zip(accepted, parts, strict=True)
            },
            "label_counts": np.bincount(union.y, minlength=self.task.num_classes).tolist(),
            # train on synthetic, test on real: the test metrics of this round's model
            "quality_vs_server_test": self.phase.quality(
                union, self.task.load_central_test(), self.task, self.prep
            ),
        }
        log(
            INFO,
            "round %d: task model trained on %d synthetic rows from %d clients",
            rnd,
            len(union),
            len(accepted),
        )
        return ArrayRecord(model.state_dict())

    def _screen_train_arrays(self, msg: Message, rec) -> str | None:
        if not self._sharing:
            return super()._screen_train_arrays(msg, rec)
        record = msg.content.array_records.get("rows")
        if record is None or len(msg.content.array_records) != 1:
            return "rejected: a sharing-round reply must carry exactly the ArrayRecord 'rows'"
        rec.bytes_up += record.count_bytes()
        kinds = {k: record[k].numpy().dtype.kind for k in record if k in ROW_KINDS}
        odd = sorted(k for k, kind in kinds.items() if kind not in ROW_KINDS[k])
        if odd:  # float labels or codes would be truncated into valid-looking ones
            return f"rejected: synthetic rows {odd} of the wrong dtype ({[kinds[k] for k in odd]})"
        rows, why = self.phase.screen_rows(record, self.prep, self.max_rows)
        if why:
            return why
        metrics = reply_metrics(msg)
        if metrics is not None and int(metrics.get("synthetic-rows", -1)) != len(rows):
            return "rejected: 'synthetic-rows' does not match the rows sent"
        self._received[msg.metadata.src_node_id] = rows
        return None

    def write_reports(self, out_dir: Path) -> None:
        if not self.report:
            return
        (Path(out_dir) / "synthetic.json").write_text(json.dumps(self.report, indent=1))
        rows = self.synthetic_rows
        np.savez_compressed(
            Path(out_dir) / "synthetic_rows.npz", numeric=rows.numeric, codes=rows.codes, y=rows.y
        )
