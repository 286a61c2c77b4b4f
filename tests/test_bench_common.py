"""bench/common.py's run_and_audit: what it does with a folder an earlier attempt left."""

from __future__ import annotations

import json

import pytest

from bench import common


@pytest.fixture
def calls(monkeypatch):
    """Records the job and audit launches instead of running them; the job writes a finished
    results.json of 3 rounds, as a real one would."""
    seen: list[str] = []

    def fake_job(overrides, out, log_path, cwd):
        seen.append("job")
        assert not (out / "client_state").exists(), "a new run must not see old client state"
        (out / "results.json").write_text(
            json.dumps({"rounds": [{"round": r} for r in (1, 2, 3)], "final": {"acc": 0.5}})
        )
        return True

    def fake_call(cmd, **kwargs):
        seen.append("audit")
        return 0

    monkeypatch.setattr(common, "run_inline_job", fake_job)
    monkeypatch.setattr(common.subprocess, "call", fake_call)
    return seen


def _leftover(out, rounds_done, final):
    (out / "client_state").mkdir(parents=True)
    (out / "client_state" / "ledger.json").write_text("{}")
    res = {"rounds": [{"round": r} for r in range(1, rounds_done + 1)], "final": final}
    (out / "results.json").write_text(json.dumps(res))


def test_unfinished_attempt_is_removed_and_rerun(tmp_path, calls, capsys):
    out = tmp_path / "run"
    _leftover(out, rounds_done=2, final=None)
    assert common.run_and_audit([], out, tmp_path, rounds=3)
    assert calls == ["job", "audit"]
    assert not (out / "client_state").exists()
    assert "removing an earlier attempt" in capsys.readouterr().out


def test_finished_run_is_only_audited(tmp_path, calls):
    out = tmp_path / "run"
    _leftover(out, rounds_done=3, final={"acc": 0.7})
    assert common.run_and_audit([], out, tmp_path, rounds=3)
    assert calls == ["audit"]
    assert (out / "client_state" / "ledger.json").exists()
    assert json.loads((out / "results.json").read_text())["final"] == {"acc": 0.7}


def test_finished_run_is_redone_without_reuse(tmp_path, calls):
    out = tmp_path / "run"
    _leftover(out, rounds_done=3, final={"acc": 0.7})
    assert common.run_and_audit([], out, tmp_path, rounds=3, reuse=False)
    assert calls == ["job", "audit"]
    assert json.loads((out / "results.json").read_text())["final"] == {"acc": 0.5}


def test_failed_job_is_not_audited(tmp_path, monkeypatch, calls):
    monkeypatch.setattr(common, "run_inline_job", lambda *a: calls.append("job") or False)
    assert not common.run_and_audit([], tmp_path / "run", tmp_path, rounds=3)
    assert calls == ["job"]


def test_recheck_plans_the_published_contribution_cell():
    """bench/recheck.py builds bench/contribution.py's arguments by hand: every one `plan`
    reads must be there (a new option of contribution.py broke it once)."""
    import bench.contribution as contribution
    import bench.recheck as recheck

    ((_, overrides, name),) = contribution.plan(recheck.contribution_args())
    assert "partition.min_partition_size=10" in overrides and "contribution" in name


def test_the_femnist_dp_bench_names_no_privacy_key_without_dp():
    """Without DP the privacy group has no clipping norm: naming it fails the run."""
    import bench.dp_femnist as dp_femnist

    setting = next(iter(dp_femnist.GRID))
    assert not [o for o in dp_femnist.overrides(setting, "inf", 0) if o.startswith("privacy.")]
    assert "privacy.max_grad_norm=1.0" in dp_femnist.overrides(setting, "8", 0)
