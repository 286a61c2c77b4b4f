"""bench/robustness.py's merging of new seeds into published cells (pure)."""

from __future__ import annotations

from bench.robustness import add_seeds


def _cell(strategy: str, seeds: list[int], acc: list[float], attack="gaussian") -> dict:
    return {
        "task": "femnist",
        "attack": attack,
        "fraction": 0.3,
        "strategy": strategy,
        "seeds": seeds,
        "final": {"test_accuracy": acc},
        "mean_attacker_weight": [a / 10 for a in acc],
        "attacker_weight_by_round": [[a] for a in acc],
    }


def test_new_seeds_join_the_published_cell_in_seed_order():
    published = [_cell("fedtrimmedavg", [0], [0.64]), _cell("bulyan", [0], [0.53])]
    fresh = [_cell("fedtrimmedavg", [2, 1], [0.60, 0.58])]
    out = {c["strategy"]: c for c in add_seeds(published, fresh)}
    t = out["fedtrimmedavg"]
    assert t["seeds"] == [0, 1, 2]
    assert t["final"]["test_accuracy"] == [0.64, 0.58, 0.60]
    assert t["mean_attacker_weight"] == [0.64 / 10, 0.58 / 10, 0.60 / 10]
    assert t["attacker_weight_by_round"] == [[0.64], [0.58], [0.60]]
    assert out["bulyan"] == published[1]  # a cell not run here is kept as it was


def test_a_seed_run_again_replaces_its_published_value_and_new_cells_are_added():
    published = [_cell("multikrum", [0, 1], [0.5, 0.4])]
    fresh = [_cell("multikrum", [1], [0.45]), _cell("multikrum", [0], [0.3], attack="crash")]
    out = add_seeds(published, fresh)
    by_attack = {c["attack"]: c for c in out}
    assert by_attack["gaussian"]["seeds"] == [0, 1]
    assert by_attack["gaussian"]["final"]["test_accuracy"] == [0.5, 0.45]
    assert by_attack["crash"] == fresh[1]
    assert len(out) == 2
