"""Re-run one published cell of each benchmark with the code of this checkout and compare its
numbers with the committed report: the check that a refactor left the benches' results alone.

    .venv/bin/python bench/recheck.py                 # ~10 min on 2 cores; writes recheck.json
    .venv/bin/python bench/recheck.py --only hetero
    .venv/bin/python bench/recheck.py --baseline OTHER/bench/results/recheck.json

`--baseline`: the same cells run by another checkout on this machine (e.g. the previous main,
`git worktree add /tmp/old <commit>`, then in /tmp/old `PYTHONPATH=/tmp/old
.venv/bin/python bench/recheck.py`): the published cells were measured on another machine, and
a different library build can move the last digits of a float.

Cells (seed 0, the benches' own run plans and settings):
- robustness: credit, trust under the scaled (-4) attack at 30% (`bench/results/robustness.json`);
- hetero: credit, compute profile, synchronous FedAvg and the tiered scheduler at its budget
  (`bench/results/hetero.json`);
- contribution: credit, Dirichlet(0.5) over 10 clients, contribution-aware aggregation
  (`bench/results/contribution_credit.json`).
Writes `bench/results/recheck.json`: every compared number, before and after.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import contribution, hetero, robustness  # noqa: E402
from bench.common import run_inline_job  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def _compare(name: str, before: dict, after: dict) -> dict:
    same = {k: before[k] == after.get(k) for k in before}
    return {"cell": name, "identical": all(same.values()), "before": before, "after": after}


def robustness_cell(work: Path) -> dict:
    args = Namespace(
        tasks=["credit"],
        rounds=20,
        seeds=[0],
        fractions=[0.3],
        attacks=["scaled"],
        strategies=["trust"],
    )
    ((_, ovr, name),) = robustness.plan(args)
    out = work / name
    out.mkdir(parents=True)
    assert run_inline_job(ovr, out, out / "inline.log", ROOT), f"see {out}/inline.log"
    res = json.loads((out / "results.json").read_text())
    report = json.loads((RESULTS / "robustness.json").read_text())
    (cell,) = [
        c
        for c in report["cells"]
        if (c["task"], c["attack"], c["fraction"], c["strategy"])
        == ("credit", "scaled", 0.3, "trust")
    ]
    i = cell["seeds"].index(0)
    before = {k: v[i] for k, v in cell["final"].items()}
    before["attacker_weight_by_round"] = cell["attacker_weight_by_round"][i]
    after = {k: res["rounds"][-1][k] for k in cell["final"]}
    after["attacker_weight_by_round"] = [r["attacker_weight"] for r in res["rounds"][1:]]
    return _compare(name, before, after)


def hetero_cell(work: Path) -> dict:
    published = json.loads((RESULTS / "hetero.json").read_text())
    args = Namespace(
        tasks=["credit"],
        profiles=["compute"],
        seeds=[0],
        strategies=["fedavg", "tiered"],
        rounds=published["rounds"],
        round_factor=published["round_factor"],  # the published run's cap (50 since 9f004b6)
        target_frac=published["target_frac"],
        jobs=2,
        out=work,
        reuse=False,
    )
    hetero.execute(args)
    cells = hetero.summarize(args)["cells"]
    report = json.loads((RESULTS / "hetero.json").read_text())
    out = []
    keys = ("final", "time_to_target_s", "rounds", "sim_time_s", "bytes", "success_rate", "curve")
    for strategy in ("fedavg", "tiered"):
        (new,) = [c for c in cells if c["strategy"] == strategy]
        (old,) = [
            c
            for c in report["cells"]
            if (c["task"], c["profile"], c["seed"], c["strategy"])
            == ("credit", "compute", 0, strategy)
        ]
        old = json.loads(json.dumps({k: old[k] for k in keys}))  # tuples as JSON lists
        new = json.loads(json.dumps({k: new[k] for k in keys}))
        out.append(_compare(f"hetero-credit-compute-{strategy}-s0", old, new))
    return {"cell": "hetero", "identical": all(c["identical"] for c in out), "parts": out}


def contribution_args() -> Namespace:
    """bench/contribution.py's arguments for the published cell (every one its `plan` reads)."""
    return Namespace(
        tasks=["credit"],
        alphas=[0.5],
        only_splits=["dirichlet0.5"],
        clients=[10],
        per_round=20,
        seeds=[0],
        strategies=["contribution"],
        rounds=20,
        early=5,
        server_val=0.1,
        min_partition_size=10,  # bench/contribution.py's default: the config's
    )


def contribution_cell(work: Path) -> dict:
    args = contribution_args()
    ((_, ovr, name),) = contribution.plan(args)
    out = work / name
    out.mkdir(parents=True)
    assert run_inline_job(ovr, out, out / "inline.log", ROOT), f"see {out}/inline.log"
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    report = json.loads((RESULTS / "contribution_credit.json").read_text())
    (cell,) = [
        c
        for c in report["cells"]
        if (c["split"], c["clients"], c["strategy"]) == ("dirichlet0.5", 10, "contribution")
    ]
    i = cell["seeds"].index(0)
    before = {"final": cell["final"][i], "early": cell["early"][i], "curves": cell["curves"][i]}
    after = {
        "final": rounds[-1]["test_roc_auc"],
        "early": rounds[5]["test_roc_auc"],
        "curves": [r["test_roc_auc"] for r in rounds],
    }
    return _compare(name, before, after)


def _afters(cell: dict):
    return [p["after"] for p in cell["parts"]] if "parts" in cell else cell["after"]


CELLS = {"robustness": robustness_cell, "hetero": hetero_cell, "contribution": contribution_cell}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=list(CELLS), default=list(CELLS))
    parser.add_argument("--out", type=Path, default=RESULTS / "recheck.json")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another checkout's recheck.json (run on this machine): also compare with its "
        "numbers, which separates a change of the code from a change of the machine or the "
        "libraries (the published cells were measured elsewhere)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedapp-recheck-"))
    results = [CELLS[name](work / name) for name in args.only]
    if args.baseline is not None:
        base = {c["cell"]: c for c in json.loads(args.baseline.read_text())}
        for r in results:
            if r["cell"] in base:
                r["identical_to_baseline"] = _afters(r) == _afters(base[r["cell"]])
    args.out.write_text(json.dumps(results, indent=1))
    for r in results:
        same = r.get("identical_to_baseline")
        tail = (
            ""
            if same is None
            else f"; the baseline checkout's: {'identical' if same else 'DIFFERENT'}"
        )
        print(f"{r['cell']}: {'identical' if r['identical'] else 'DIFFERENT'}{tail}")
    print(f"details in {args.out}; runs in {work}")
    return 0 if all(r["identical"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
