"""The layers of the tree (bench/import_graph.py: tasks < core < strategies < features < roots
< cli): every import counted, those inside function bodies included. No edge points up
(KNOWN_UP, the debt list, is empty and may only stay so); a new upward edge, or any cycle,
fails."""

from __future__ import annotations

import sys

from fedapp.core.config import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "bench"))
import import_graph  # noqa: E402

# (from, to): the feature mods and checks core and strategies still reach up to
KNOWN_UP: set[tuple[str, str]] = set()
KNOWN_CYCLE: set[str] = set()


def test_no_new_edge_points_up_the_layers():
    graph = import_graph.graph(PROJECT_ROOT)
    up = {(e["from"], e["to"]) for e in import_graph.upward(graph)}
    assert up - KNOWN_UP == set(), "new imports up the layers"
    assert KNOWN_UP - up == set(), "gone from the code: strike them from KNOWN_UP"


def test_no_import_cycle():
    cycles = import_graph.cycles(import_graph.graph(PROJECT_ROOT))
    for cycle in cycles:
        assert set(cycle) <= KNOWN_CYCLE, f"an import cycle: {sorted(cycle)}"
    assert len(cycles) <= (1 if KNOWN_CYCLE else 0)


def test_the_graph_sees_imports_inside_functions(tmp_path):
    """The check can fail: a module importing a higher layer inside a function is found."""
    for pkg in ("fedapp", "strategies", "tasks"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "fedapp" / "server_app.py").write_text("")
    (tmp_path / "tasks" / "base.py").write_text("def f():\n    from fedapp import server_app\n")
    up = import_graph.upward(import_graph.graph(tmp_path))
    assert [(e["from"], e["to"]) for e in up] == [("tasks.base", "fedapp.server_app")]
