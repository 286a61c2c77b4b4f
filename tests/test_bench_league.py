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
