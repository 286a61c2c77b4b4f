"""Secret DP noise against the published privacy cells (issue 30's "must keep").

The DP noise used to be seeded from the run seed; now it is drawn from fresh OS entropy, so a
DP result changes by its noise draw only. This script compares the privacy bench's cells
re-run with secret noise (`bench/privacy.py ... --out bench/results/privacy_secret_noise`)
with the committed ones (`bench/results/privacy.json`): per cell, the mean of each metric
before and after over the same seeds, the old spread (sd over seeds) and whether the new mean
lies within two old standard deviations of the old mean. Epsilon spent must be equal (it does
not depend on the noise).

    .venv/bin/python bench/privacy.py --tasks credit medical --epsilons 3 8 --strategies fedavg \\
        --seeds 0 1 2 --jobs 2 --out bench/results/privacy_secret_noise
    .venv/bin/python bench/privacy_recheck.py

Writes bench/results/privacy_secret_noise/compare.{json,md}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
METRICS = ("metric", "pr_auc", "epsilon_spent", "mia_auc")


def _key(cell: dict) -> tuple:
    return cell["task"], str(cell["epsilon"]), cell["strategy"]


def compare(old: list[dict], new: list[dict]) -> list[dict]:
    before = {_key(c): c for c in old}
    rows = []
    for cell in new:
        ref = before.get(_key(cell))
        if ref is None:
            continue
        row = {"task": cell["task"], "epsilon": cell["epsilon"], "strategy": cell["strategy"]}
        for m in METRICS:
            a, b = np.asarray(ref[m], float), np.asarray(cell[m], float)
            sd = float(a.std(ddof=1)) if len(a) > 1 else 0.0
            row[m] = {
                "before_mean": float(a.mean()),
                "before_sd": sd,
                "after_mean": float(b.mean()),
                "after_sd": float(b.std(ddof=1)) if len(b) > 1 else 0.0,
                "within_2sd": bool(abs(b.mean() - a.mean()) <= 2 * sd + 1e-9),
            }
        rows.append(row)
    return rows


def main() -> int:
    old = json.loads((RESULTS / "privacy.json").read_text())["cells"]
    out = RESULTS / "privacy_secret_noise"
    new = json.loads((out / "privacy.json").read_text())["cells"]
    rows = compare(old, new)
    (out / "compare.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# Privacy cells with secret DP noise against the published ones",
        "",
        "`bench/privacy_recheck.py` (see its docstring for the runs). Mean ± sd over seeds 0-2;",
        "'within' = the new mean is within 2 old sd of the old mean.",
        "",
        "| task | epsilon | metric before | metric after | within | PR-AUC before | PR-AUC after "
        "| within | epsilon spent before / after | MIA AUC before / after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, p, e, a = (r[k] for k in METRICS)
        lines.append(
            f"| {r['task']} | {r['epsilon']} | {m['before_mean']:.3f} ± {m['before_sd']:.3f} | "
            f"{m['after_mean']:.3f} ± {m['after_sd']:.3f} | {'yes' if m['within_2sd'] else 'NO'} | "
            f"{p['before_mean']:.3f} ± {p['before_sd']:.3f} | {p['after_mean']:.3f} ± "
            f"{p['after_sd']:.3f} | {'yes' if p['within_2sd'] else 'NO'} | "
            f"{e['before_mean']:.3f} / {e['after_mean']:.3f} | "
            f"{a['before_mean']:.3f} / {a['after_mean']:.3f} |"
        )
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
