"""fedapp-audit: the attacks tell members from non-members on a model that memorised its
training rows, and do not on a model that never saw them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fedapp.checks import compose
from fedapp.features.audit import attack_report, audit, main
from tasks import get_task

OVERRIDES = "task=medical task.hidden=[256,256] task.dropout=0.0"


def _run_dir(tmp_path, data_dir, train_on: str):
    """A run folder as a run leaves it, with a model trained centrally (Adam, full batch, long:
    it memorises) on the clients' training rows ("members") or on their validation rows."""
    cfg = compose(OVERRIDES)
    task = get_task(cfg, data_dir)
    parts = [task.load_partition(p) for p in range(task.num_partitions())]
    prep = task.aggregate_stats([task.client_stats(d) for d in parts])
    rows = [d.train if train_on == "members" else d.val for d in parts]
    from fedapp.features.audit import _concat

    data = task.eval_dataset(_concat(rows), prep)
    torch.manual_seed(0)
    model = task.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = data.tensors
    for _ in range(600):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    out = tmp_path / train_on
    out.mkdir()
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (out / "preprocessing.json").write_text(json.dumps(prep))
    torch.save(model.state_dict(), out / "final_model.pt")
    return out


def test_a_memorising_model_gives_its_members_away(tmp_path, data_dir):
    report = audit(_run_dir(tmp_path, data_dir, "members"), n=500)
    # 184 members and non-members: an AUC's standard error under guessing is about 0.03
    assert report["mia_auc"] > 0.65
    assert report["attacks"]["loss_threshold"]["auc"] > 0.55
    assert report["attacks"]["correctness"]["auc"] > 0.58  # all members right, ~78% of the rest
    assert report["members"] == report["non_members"] == 184  # balanced: the test set's size
    assert (tmp_path / "members" / "audit.json").exists()
    assert (tmp_path / "members" / "audit_roc.png").stat().st_size > 0


def test_a_model_that_never_saw_the_members_does_not(tmp_path, data_dir):
    report = audit(_run_dir(tmp_path, data_dir, "validation"), n=500)
    for name, attack in report["attacks"].items():
        assert abs(attack["auc"] - 0.5) < 0.1, name


def test_attack_report_measures():
    labels = np.r_[np.ones(100), np.zeros(100)]
    perfect = attack_report(labels, labels)
    assert perfect["auc"] == 1.0 and perfect["tpr_at_1pct_fpr"] == 1.0
    rng = np.random.default_rng(0)
    guess = attack_report(labels, rng.random(200))
    assert 0.4 < guess["auc"] < 0.6


def test_a_folder_without_a_model_gets_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "config.yaml not found" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
