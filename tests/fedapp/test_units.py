"""Client-side units (fedapp/core/units.py): which units a training message gets, and their order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedapp.checks import compose
from fedapp.client_app import compose_units
from fedapp.core.units import STAGES, ClientUnit, TrainJob, run_units
from fedapp.features.attacks import AttackHarness
from strategies.contribution import Distillation, ValidationGain
from strategies.fedprox import ProximalTerm
from strategies.scaffold import SERVER_CONTROL, ScaffoldClient
from tasks import get_task
from tasks.training import TrainSettings


def _job(data_dir, overrides: str, config: dict, partition_id: int = 0, extra=None) -> TrainJob:
    cfg = compose(f"task=medical {overrides}")
    task = get_task(cfg, data_dir)
    model = task.make_model()
    received = ArrayRecord(model.state_dict())
    content = RecordDict({"arrays": received, "config": ConfigRecord(config)})
    for name, record in (extra or {}).items():
        content[name] = record
    return TrainJob(
        cfg=cfg,
        task=task,
        data=task.load_partition(partition_id),
        partition_id=partition_id,
        content=content,
        config=content["config"],
        received=received,
        model=model,
        settings=TrainSettings(),
        prep={},
        state=RecordDict(),
        seed=0,
        num_clients=task.num_partitions(),
    )


def test_the_stages_are_stated_once_outermost_first(data_dir):
    assert STAGES == ("attack", "augment", "privacy", "strategy")
    # the attack harness corrupts real rows; synthetic rare-class rows are added before
    # DP-SGD samples from them (fedapp.features.synthetic)
    from fedapp.features.privacy import SampleDP
    from fedapp.features.synthetic import RareClassAugment

    job = _job(
        data_dir,
        "strategy=fedavg augment=rare_class privacy=sample_dp attack=label_flip "
        "attack.fraction=1.0",
        {},
    )
    assert [type(u) for u in compose_units(job)] == [AttackHarness, RareClassAugment, SampleDP]


def test_a_strategy_brings_its_client_part_and_each_unit_decides_if_it_takes_part(data_dir):
    config = {"report-val-gain": 1, "proximal-mu": 0.01, "distill-weight": 0.0}
    units = compose_units(_job(data_dir, "strategy=contribution", config))
    assert [type(u) for u in units] == [ValidationGain, ProximalTerm]  # no distillation at 0
    config["distill-weight"] = 0.5
    units = compose_units(_job(data_dir, "strategy=contribution", config))
    assert [type(u) for u in units] == [ValidationGain, ProximalTerm, Distillation]
    assert compose_units(_job(data_dir, "strategy=fedavg", config)) == []  # FedAvg has none


def test_the_attack_harness_wraps_the_strategys_part(data_dir):
    # partition 0 is an attacker of medical (4 clients) at fraction 1
    job = _job(
        data_dir,
        "strategy=scaffold attack=scaled attack.fraction=1.0",
        {},
        extra={SERVER_CONTROL: ArrayRecord({})},
    )
    assert [type(u) for u in compose_units(job)] == [AttackHarness, ScaffoldClient]
    honest = _job(data_dir, "strategy=scaffold", {}, extra={SERVER_CONTROL: ArrayRecord({})})
    assert [type(u) for u in compose_units(honest)] == [ScaffoldClient]


class _Trace(ClientUnit):
    def __init__(self, name, log):
        self.name, self.log = name, log

    def before_train(self, job):
        self.log.append(f"{self.name}.before")

    def after_train(self, job):
        self.log.append(f"{self.name}.after")


def test_units_nest_like_middleware_around_training(data_dir):
    log = []
    job = _job(data_dir, "", {})
    job.task = type(
        "T", (), {"train": lambda self, *a: log.append("train") or {"train_loss": 0.0}}
    )()
    run_units(job, [_Trace("outer", log), _Trace("inner", log)])
    assert log == ["outer.before", "inner.before", "train", "inner.after", "outer.after"]
    job.trains, log[:] = False, []
    run_units(job, [_Trace("outer", log)])
    assert log == ["outer.before", "outer.after"]  # a unit replaced training


def test_a_poisoning_attacker_tampers_after_the_strategy_part_has_run(data_dir):
    """scaled attack: SCAFFOLD's control update sees the honestly trained model; what is sent
    is the poisoned one."""
    job = _job(
        data_dir,
        "strategy=scaffold attack=scaled attack.fraction=1.0 attack.scale=-4",
        {},
        extra={SERVER_CONTROL: ArrayRecord({})},
    )
    job.prep = job.task.aggregate_stats([job.task.client_stats(job.data)])
    received = {k: v.clone() for k, v in job.model.state_dict().items()}
    torch.manual_seed(0)
    run_units(job, compose_units(job))
    sent = job.model.state_dict()
    delta = {k: v.numpy() for k, v in job.reply_records["scaffold-dc"].items()}
    k = next(iter(delta))
    honest = received[k] + (sent[k] - received[k]) / -4  # undo the scaling
    steps, lr = job.metrics["train_steps"], job.settings.lr
    np.testing.assert_allclose(
        delta[k], ((received[k] - honest) / (steps * lr)).numpy(), rtol=1e-4, atol=1e-6
    )
    assert not torch.allclose(sent[k], honest)


@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_fedprox_term_takes_part_only_when_the_server_sends_mu(data_dir, mu):
    job = _job(data_dir, "strategy=fedprox", {"proximal-mu": mu})
    assert [type(u) for u in compose_units(job)] == ([ProximalTerm] if mu else [])
