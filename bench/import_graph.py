"""The import graph of fedapp, strategies and tasks, with every import counted, those inside
function bodies included: edges that point up the layers, and cycles (issue 32).

    .venv/bin/python bench/import_graph.py                 # summary to stdout
    .venv/bin/python bench/import_graph.py --out graph.json --root ../other

Layers, from the bottom (a module may import its own layer and those below):
`LAYERS` below. A cycle is a strongly connected component of more than one module.
`tests/test_layers.py` holds the tree to what this finds.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

PACKAGES = ("fedapp", "strategies", "tasks")
# (layer, module prefixes); the first prefix that matches a module decides its layer. The
# layers are the tree's folders: fedapp/core, fedapp/features, fedapp/cli; a module directly
# under fedapp/ is a composition root, except fedapp.sweep (a launcher: conf/config.yaml's
# `_target_: fedapp.sweep.SweepSummary` is a contract, so it stays where configs name it).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("tasks", ("tasks",)),
    ("core", ("fedapp.core",)),
    ("strategies", ("strategies",)),
    ("features", ("fedapp.features",)),
    (
        "roots",
        (
            "fedapp.checks",
            "fedapp.recorder",
            "fedapp.checkpoint",
            "fedapp.server_app",
            "fedapp.client_app",
        ),
    ),
    ("cli", ("fedapp.cli", "fedapp.sweep")),
]
RANK = {name: k for k, (name, _) in enumerate(LAYERS)}


def layer(module: str) -> str:
    for name, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    if module in ("fedapp", "strategies"):  # the packages' __init__
        return "core" if module == "fedapp" else "strategies"
    raise KeyError(f"{module}: in no layer (add it to bench/import_graph.py LAYERS)")


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(path: Path, module: str, known: set[str]) -> dict[str, list[int]]:
    """Project modules `module` imports (anywhere in the file) -> the lines."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, list[int]] = {}

    def add(name: str, line: int) -> None:
        while name and name not in known:  # `from a.b import c`: module a.b.c, or a.b
            name = name.rpartition(".")[0]
        if name and name != module:
            found.setdefault(name, []).append(line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            for a in node.names:
                full = f"{base}.{a.name}" if base else a.name
                add(full if full in known else base, node.lineno)
    return found


def graph(root: Path) -> dict[str, dict[str, list[int]]]:
    mods = modules(root)
    known = set(mods)
    return {m: imports(p, m, known) for m, p in mods.items()}


def cycles(g: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return sorted(out)


def upward(g: dict[str, dict[str, list[int]]]) -> list[dict]:
    out = []
    for a, targets in sorted(g.items()):
        for b, lines in sorted(targets.items()):
            if RANK[layer(b)] > RANK[layer(a)]:
                out.append({"from": a, "to": b, "lines": lines, "layers": [layer(a), layer(b)]})
    return out


def largest_functions(root: Path, top: int = 5) -> list[dict]:
    """The `top` longest functions and methods (lines from `def` to their last line)."""
    found = []
    for module, path in modules(root).items():
        tree = ast.parse(path.read_text())
        stack = [(tree, module)]
        while stack:
            node, prefix = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    name = f"{prefix}.{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        found.append((child.end_lineno - child.lineno + 1, name))
                    stack.append((child, name))
    return [{"function": n, "lines": k} for k, n in sorted(found, reverse=True)[:top]]


def summary(root: Path) -> dict:
    g = graph(root)
    per_layer: dict[str, int] = {}
    for m in g:
        per_layer[layer(m)] = per_layer.get(layer(m), 0) + 1
    mods = modules(root)
    sizes = sorted(((len(p.read_text().splitlines()), m) for m, p in mods.items()), reverse=True)
    per_package: dict[str, int] = {}
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rpartition(".")[0]
        per_package[package] = per_package.get(package, 0) + 1
    return {
        "modules": len(g),
        "modules_per_layer": per_layer,
        "modules_per_package": dict(sorted(per_package.items())),
        "edges": sum(len(t) for t in g.values()),
        "edges_up": upward(g),
        "cycles": cycles(g),
        "largest_modules": [{"module": m, "lines": n} for n, m in sizes[:5]],
        "largest_functions": largest_functions(root),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    s = summary(args.root)
    if args.out:
        args.out.write_text(json.dumps(s, indent=1))
    print(f"{s['modules']} modules, {s['edges']} edges; per layer {s['modules_per_layer']}")
    print(f"edges up: {len(s['edges_up'])}")
    for e in s["edges_up"]:
        print(
            f"  {e['from']} -> {e['to']} ({e['layers'][0]} -> {e['layers'][1]}) lines {e['lines']}"
        )
    print(f"cycles: {len(s['cycles'])}")
    for c in s["cycles"]:
        print(f"  {len(c)}: {', '.join(c)}")
    print("per package:", ", ".join(f"{k} {v}" for k, v in s["modules_per_package"].items()))
    print("largest:", ", ".join(f"{m['module']} {m['lines']}" for m in s["largest_modules"]))
    print(
        "largest functions:",
        ", ".join(f"{f['function']} {f['lines']}" for f in s["largest_functions"]),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
