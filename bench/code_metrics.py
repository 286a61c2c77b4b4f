"""Size and branching of the project's functions: the largest ones, for refactoring reports.

    .venv/bin/python bench/code_metrics.py                    # this checkout, top 5 -> stdout
    .venv/bin/python bench/code_metrics.py --root ../other --top 10 --out metrics.json

Lines are a function's source lines (decorators excluded, nested functions included);
branches count the decision points a reader has to follow: `if`/`elif`, conditional
expressions, loops, `except` clauses, `match` cases, comprehension filters and each extra
operand of `and`/`or`. Nested functions are also listed on their own.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

PACKAGES = ("fedapp", "strategies", "tasks")


def branches(node: ast.AST) -> int:
    count = 0
    for n in ast.walk(node):
        decision = ast.If | ast.IfExp | ast.For | ast.AsyncFor | ast.While | ast.ExceptHandler
        if isinstance(n, decision | ast.match_case):
            count += 1
        elif isinstance(n, ast.comprehension):
            count += 1 + len(n.ifs)
        elif isinstance(n, ast.BoolOp):
            count += len(n.values) - 1
    return count


def functions(root: Path) -> list[dict]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            stack: list[tuple[ast.AST, str]] = [(tree, "")]
            while stack:
                node, prefix = stack.pop()
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                        name = f"{prefix}{child.name}"
                        out.append(
                            {
                                "function": name,
                                "file": str(path.relative_to(root)),
                                "lines": child.end_lineno - child.lineno + 1,
                                "branches": branches(child),
                            }
                        )
                        stack.append((child, f"{name}."))
                    elif isinstance(child, ast.ClassDef):
                        stack.append((child, f"{prefix}{child.name}."))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    funcs = functions(args.root)
    top = sorted(funcs, key=lambda f: (-f["lines"], f["function"]))[: args.top]
    for f in top:
        print(f"{f['lines']:5d} lines {f['branches']:4d} branches  {f['file']}::{f['function']}")
    if args.out:
        args.out.write_text(json.dumps({"top": top, "functions": len(funcs)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
