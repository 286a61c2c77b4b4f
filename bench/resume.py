"""Resume correctness: a run killed after round k and resumed vs the same run uninterrupted.

For each task and strategy, on the in-process engine (`fedapp-inline`, the engine whose
models equal Flower's simulation bit for bit, tests/test_e2e.py): the uninterrupted run, then
the same run in a process of its own that is SIGKILLed once round k is checkpointed and a
client has already trained in round k+1, then `resume=<run dir>`. Reported: whether every
round's test loss, accuracy and ROC-AUC and the final model are identical, and the largest
absolute difference of the round metrics.

    .venv/bin/python bench/resume.py                    # credit and FEMNIST, 4 strategies

Writes bench/results/resume.{json,md}; runs stay under bench/results/runs_resume/.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

OUT = ROOT / "bench" / "results"
RUNS = OUT / "runs_resume"
TASKS = {
    "credit": "task=credit partition=iid partition.num_partitions=10 clients_per_round=4 "
    "eval_clients_per_round=3 rounds=5",
    "femnist": "task=femnist partition=iid partition.num_partitions=20 clients_per_round=5 "
    "eval_clients_per_round=3 rounds=5 train.max_steps=20",
}
STRATEGIES = {
    "fedavg": "strategy=fedavg",
    "trust": "strategy=trust attack=free_rider attack.mode=stale attack.fraction=0.2",
    "scaffold": "strategy=scaffold",
    "tiered": "strategy=tiered hetero=both",
}
METRICS = ("test_loss", "test_accuracy", "test_roc_auc", "train_loss")


def inline(overrides: str, out: Path, resume: bool = False) -> subprocess.Popen:
    """fedapp-inline in a process of its own (a resumed run writes into its own folder)."""
    cmd = [sys.executable, "-m", "fedapp.cli.inline", *overrides.split()]
    cmd += [f"resume={out}"] if resume else ["--output-dir", str(out)]
    log = open(out.with_name(f"{out.name}{'-resume' if resume else ''}.log"), "wb")  # noqa: SIM115
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def kill_after(overrides: str, out: Path, k: int) -> str:
    """SIGKILL the run once round k is checkpointed and round k+1 has started on a client."""
    proc = inline(overrides, out)
    marker = out / "checkpoint.json"
    while proc.poll() is None:
        done = json.loads(marker.read_text())["round"] if marker.exists() else 0
        if done == k and list(out.glob(f"client_state/client-*/r{k + 1:06d}-*.state")):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return "killed"
        time.sleep(0.02)
    return f"ended by itself (exit {proc.returncode})"


def compare(a: Path, b: Path) -> dict:
    ra = json.loads((a / "results.json").read_text())["rounds"]
    rb = json.loads((b / "results.json").read_text())["rounds"]
    diffs = [
        abs(x[m] - y[m])
        for x, y in zip(ra, rb, strict=True)
        for m in METRICS
        if x.get(m) is not None and y.get(m) is not None
    ]
    ma, mb = torch.load(a / "final_model.pt"), torch.load(b / "final_model.pt")
    return {
        "rounds": len(ra) - 1,
        "identical_rounds": all(
            {m: x.get(m) for m in METRICS} == {m: y.get(m) for m in METRICS}
            for x, y in zip(ra, rb, strict=True)
        ),
        "identical_model": all(torch.equal(ma[n], mb[n]) for n in ma),
        "max_abs_diff": max(diffs, default=0.0),
    }


def one(task: str, strategy: str, k: int) -> dict:
    overrides = f"{TASKS[task]} {STRATEGIES[strategy]}"
    base = RUNS / f"{task}-{strategy}"
    full, cut = base / "full", base / "killed"
    for d in (full, cut):
        d.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    inline(overrides, full).wait()
    row: dict = {"task": task, "strategy": strategy, "killed_after_round": k}
    meta = json.loads((full / "results.json").read_text())["meta"]
    if not str(meta.get("checkpoint", "")).startswith("round"):
        row.update(resumable=False, why=meta.get("checkpoint"))
        return row
    row["kill"] = kill_after(overrides, cut, k)
    resumed = inline(overrides, cut, resume=True)
    row["resume_exit"] = resumed.wait()
    row.update(resumable=True, **compare(full, cut), wall_s=time.monotonic() - t0)
    return row


def report(rows: list[dict]) -> str:
    lines = [
        "# Resume: killed after round k and resumed vs uninterrupted (in-process engine)",
        "",
        "| task | strategy | k | result | rounds identical | final model identical | max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["resumable"]:
            lines.append(f"| {r['task']} | {r['strategy']} | - | {r['why']} | - | - | - |")
            continue
        lines.append(
            f"| {r['task']} | {r['strategy']} | {r['killed_after_round']} | {r['kill']}, "
            f"resume exit {r['resume_exit']} | {r['identical_rounds']} | "
            f"{r['identical_model']} | {r['max_abs_diff']:.2g} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--k", type=int, default=2)
    args = parser.parse_args()
    # Cells measured by earlier invocations are kept; a cell run again replaces its row.
    path = OUT / "resume.json"
    kept = json.loads(path.read_text()) if path.exists() else {"commands": [], "runs": []}
    done: dict[tuple[str, str], dict] = {(r["task"], r["strategy"]): r for r in kept["runs"]}
    for t in args.tasks:
        for s in args.strategies:
            done[(t, s)] = one(t, s, args.k)
            rows = list(done.values())
            commands = [*kept.get("commands", []), " ".join(sys.argv)]
            path.write_text(json.dumps({"commands": commands, "runs": rows}, indent=1))
    (OUT / "resume.md").write_text(report(rows))
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
