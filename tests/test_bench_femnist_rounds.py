"""bench/femnist_rounds.py's reading of a run: the first round at or above the target (never
the round-0 initial model), per seed, and a table that says `-` where a seed missed it."""

from __future__ import annotations

from bench.femnist_rounds import render, rounds_to, summarize_runs


def _run(accs: list[float]) -> dict:
    return {
        "rounds": [
            {"round": i, "test_accuracy": a, "wall_s": 1.0, "num_failures": 0}
            for i, a in enumerate(accs)
        ]
    }


def test_rounds_to_is_the_first_crossing_and_none_when_missed():
    assert rounds_to([(1, 0.2), (2, 0.86), (3, 0.84), (4, 0.9)], 0.85) == 2
    assert rounds_to([(1, 0.85)], 0.85) == 1  # at the target counts
    assert rounds_to([(1, 0.2), (2, 0.849)], 0.85) is None


def test_summary_skips_the_initial_model_and_reports_each_seed():
    runs = {
        "fedavgm": {0: _run([0.99, 0.5, 0.86, 0.87]), 1: _run([0.0, 0.5, 0.6, 0.7])},
        "contribution_m": {0: _run([0.0, 0.9, 0.9, 0.9])},
    }
    rows = {r["variant"]: r for r in summarize_runs(runs, 0.85, 3)}
    assert rows["fedavgm"]["rounds_to_target"] == [2, None]  # round 0's 0.99 does not count
    assert rows["fedavgm"]["reached_all_seeds"] is False
    assert rows["contribution_m"]["rounds_to_target"] == [1]
    assert rows["contribution_m"]["ours"] and not rows["fedavgm"]["ours"]
    text = render(
        {
            "target": 0.85,
            "rounds": 3,
            "seeds": [0, 1],
            "command": "x",
            "wall_min": 1.0,
            "variants": list(rows.values()),
            "centralized_bound": None,
        }
    )
    assert "| fedavgm | `strategy=fedavgm` | 0,1 | 2, - |" in text
    assert "| contribution_m* |" in text
