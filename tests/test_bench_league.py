"""bench/league.py's ranking: by the mean over seeds of the last-3-round mean, within a
regime; a strategy with a missing seed is left unranked rather than ranked on fewer seeds."""

from __future__ import annotations

from bench.league import rank


def test_rank_within_each_regime_and_not_on_missing_seeds():
    rows = [
        {"regime": "a", "strategy": "x", "last3": [0.70, 0.72]},
        {"regime": "a", "strategy": "y", "last3": [0.75, 0.71]},
        {"regime": "a", "strategy": "z", "last3": [0.99, None]},
        {"regime": "b", "strategy": "x", "last3": [0.60, 0.60]},
    ]
    rank(rows)
    got = {(r["regime"], r["strategy"]): r.get("rank") for r in rows}
    assert got == {("a", "y"): 1, ("a", "x"): 2, ("a", "z"): None, ("b", "x"): 1}


def test_device_heterogeneity_ranks_by_time_to_target_and_not_on_a_missed_target(
    tmp_path, monkeypatch
):
    import json

    import bench.league as league

    cells = [
        {
            "task": "credit",
            "profile": "both",
            "seed": s,
            "strategy": st,
            "time_to_target_s": t,
            "final": 0.77,
            "success_rate": 1.0,
        }
        for st, times in {"fedavg": [300, 320], "fedasync": [50, 60], "tiered": [40, None]}.items()
        for s, t in enumerate(times)
    ]
    (tmp_path / "hetero.json").write_text(
        json.dumps({"cells": cells, "target_frac": 0.97, "rounds": 20, "round_factor": 50})
    )
    monkeypatch.setattr(league, "RESULTS", tmp_path)
    rows = {r["strategy"]: r for r in league.hetero_rows("credit")["rows"]}
    assert (rows["fedasync"]["rank"], rows["fedavg"]["rank"]) == (1, 2)
    assert rows["tiered"]["rank"] is None  # faster when it arrived, but one seed missed
    assert rows["fedavg"]["time_to_target_s"] == [300, 320]
