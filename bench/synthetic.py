"""DP synthetic data (strategy=synthetic, augment=rare_class) against FedAvg on real data.

Grid: task x target epsilon x method x seed, every run under privacy=sample_dp at that
epsilon (one ledger per client covering everything it sends), on the task's natural split,
through the in-process engine (single-threaded subprocesses, `--jobs` at a time). Epsilon
`none` runs without DP, only `fedavg`, `oneshot` and `oneshot_refined` (whether the
discriminator's refinement helps when its training is not noised):

- `fedavg`: FedAvg on real data, 30 rounds (the tabular tasks' class-weighted loss: the
  weighted-loss baseline of rare-class augmentation);
- `oneshot`: strategy=synthetic, mode=oneshot: each client trains its own DP generator and
  sends synthetic rows once (one communication round); the server trains on their union;
- `oneshot_refined`: `oneshot` with generator.refine=discriminator: each client draws 4
  candidates per row it sends and a DP discriminator (30 % of its epsilon) picks which to send;
- `oneshot_70pct`: `oneshot` whose generator may spend only 70 % of the epsilon, what the VAE
  gets inside `oneshot_refined` (the ablation: `oneshot_refined` minus it is the
  discriminator's selection at an equal VAE budget; not run without DP);
- `hybrid`: strategy=synthetic, mode=hybrid: the one-shot model, then 9 FedAvg rounds on real
  data (10 rounds in all; half of each client's epsilon for the generator);
- `rare_class`: FedAvg with augment=rare_class: 3 federated generator rounds (30 % of the
  epsilon), then 30 FedAvg rounds whose clients add synthetic minority rows up to 30 %.

Reported per cell (mean ± sd over seeds): ROC-AUC, PR-AUC, recall at the prevalence operating
point (the model flags as many test rows as there are positives among them), total bytes (both ways) and the ratio to FedAvg's, communication rounds, the largest
epsilon any client spent, the best membership-inference AUC of `fedapp-audit` on the final
model, and, for the synthetic rows, the share whose nearest real record is a member (a
client's training row) rather than a non-member (a validation row of the same client, never
trained on), with equally many of each per client (0.5: no sign of copied records) and the
median distance to the closest member.

    .venv/bin/python bench/synthetic.py --jobs 2                       # the whole grid
    .venv/bin/python bench/synthetic.py --tasks credit --epsilons 3 --jobs 2
    .venv/bin/python bench/synthetic.py --summarize-only

The report always covers the whole grid: a partial invocation runs its part and reports it
with every other cell. Runs are reused when finished (`--no-reuse` to redo). Writes bench/results/synthetic.{json,md}
and synthetic_bytes.png (metric against total bytes per method); runs stay under
bench/results/runs_synthetic/ (ignored by git). A (task, epsilon, method, seed) whose run is not
on this machine keeps its numbers from the existing synthetic.json, so re-running some cells
in a fresh checkout does not drop the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import completed, fmt_mean_sd, run_and_audit, run_pool  # noqa: E402

TASKS = ["credit", "insurance", "bankruptcy", "medical"]
EPSILONS = ["3", "1", "8", "none"]
NO_DP_METHODS = ("fedavg", "oneshot", "oneshot_refined")  # oneshot_70pct: no budget to split
SEEDS = [0, 1, 2]
EXTRA_VERSION = 2  # of extra.json; older files are recomputed from the run folder
METHODS = {
    "fedavg": (["strategy=fedavg"], 30),
    "oneshot": (["strategy=synthetic", "strategy.mode=oneshot"], 1),
    "oneshot_refined": (
        ["strategy=synthetic", "strategy.mode=oneshot", "strategy.generator.refine=discriminator"],
        1,
    ),
    "oneshot_70pct": (
        ["strategy=synthetic", "strategy.mode=oneshot", "strategy.generator.epsilon_share=0.7"],
        1,
    ),
    "hybrid": (
        ["strategy=synthetic", "strategy.mode=hybrid", "strategy.generator.epsilon_share=0.5"],
        10,
    ),
    "rare_class": (["strategy=fedavg", "augment=rare_class"], 33),
}


def plan(args) -> list[tuple[dict, list[str], str, int]]:
    """Jobs in the order they matter: every task and method at the first epsilon first."""
    jobs = []
    for eps in args.epsilons:
        for seed in args.seeds:
            for task in args.tasks:
                for method in args.methods:
                    if eps == "none" and method not in NO_DP_METHODS:
                        continue
                    ovr, rounds = METHODS[method]
                    overrides = [
                        f"task={task}",
                        *ovr,
                        f"rounds={rounds}",
                        *(
                            ["privacy=none"]
                            if eps == "none"
                            else ["privacy=sample_dp", f"privacy.target_epsilon={eps}"]
                        ),
                        f"seed={seed}",
                        "eval_clients_per_round=0",
                    ]
                    key = {"task": task, "epsilon": eps, "method": method, "seed": seed}
                    jobs.append((key, overrides, f"{task}-eps{eps}-{method}-s{seed}", rounds))
    # the first epsilon over every seed, then the others seed by seed
    first = args.epsilons[0]
    jobs.sort(key=lambda j: (j[0]["epsilon"] != first, j[0]["seed"]))
    return jobs


def finished(out: Path, rounds: int) -> dict | None:
    res = completed(out / "results.json", rounds)
    if res is None or not (out / "audit.json").exists():
        return None
    extra = out / "extra.json"
    if not extra.exists() or json.loads(extra.read_text()).get("version") != EXTRA_VERSION:
        extra.write_text(json.dumps(extra_metrics(out)))  # what this script measures changed
    return res


def execute(args, jobs) -> None:
    runs = args.out / "runs_synthetic"
    runs.mkdir(parents=True, exist_ok=True)
    todo = [(o, runs / n, r) for _, o, n, r in jobs if not (args.reuse and finished(runs / n, r))]
    print(f"[bench] {len(jobs)} runs planned, {len(todo)} to run", flush=True)

    def work(item):
        ovr, out, n_rounds = item
        ok = run_and_audit(ovr, out, ROOT, n_rounds, args.reuse)
        if ok:
            (out / "extra.json").write_text(json.dumps(extra_metrics(out)))
        return out.name, ok

    run_pool(todo, args.jobs, work)


def extra_metrics(run_dir: Path, n: int = 2000, seed: int = 0) -> dict:
    """Recall at the prevalence operating point of the final model and, for synthetic rows,
    their distances to members and non-members."""
    import torch
    from omegaconf import OmegaConf

    from fedapp.core.config import resolve_data_dir
    from fedapp.features.audit import draw
    from fedapp.features.synthetic import closest_distances, concat_rows, feature_matrix
    from tasks import get_task
    from tasks.tabular import Rows
    from tasks.training import predict_logits

    cfg = OmegaConf.load(run_dir / "config.yaml")
    task = get_task(cfg, resolve_data_dir(cfg))
    prep = json.loads((run_dir / "preprocessing.json").read_text())
    test = task.load_central_test()  # first: a schema's `numeric: all` is resolved on reading
    model = task.make_model()
    model.load_state_dict(torch.load(run_dir / "final_model.pt", map_location="cpu"))
    logits, y = predict_logits(model, task.eval_dataset(test, prep))
    score = logits[:, 1] - logits[:, 0]
    # flag as many test rows as there are positives (recall = precision there). Not the
    # federation's DP-released prevalence: for wide tables its noise can swamp the count.
    k = int(y.sum())
    flagged = np.argsort(-score, kind="stable")[:k]
    out = {
        "version": EXTRA_VERSION,
        "recall_at_prevalence": float(y[flagged].sum() / max(k, 1)),
        "flagged": k,
    }
    npz = run_dir / "synthetic_rows.npz"
    if npz.exists():
        data = np.load(npz)
        synth = Rows(data["numeric"], data["codes"], data["y"])
        # members: each client's training rows (the generator saw them); non-members: the same
        # client's validation rows (same distribution, never trained on), as many of each
        inside, outside = [], []
        per = max(1, n // task.num_partitions())
        for p in range(task.num_partitions()):
            part = task.load_partition(p)
            k = min(per, len(part.train), len(part.val))
            if k:
                inside.append(draw(task, part.train, k, seed + p))
                outside.append(draw(task, part.val, k, seed + 1000 + p))
        rng = np.random.default_rng(seed)
        synth = synth.take(rng.permutation(len(synth))[:n])
        fs = feature_matrix(task, synth, prep)
        d_in = closest_distances(fs, feature_matrix(task, concat_rows(inside), prep))
        d_out = closest_distances(fs, feature_matrix(task, concat_rows(outside), prep))
        out.update(
            dcr_member_median=float(np.median(d_in)),
            dcr_nonmember_median=float(np.median(d_out)),
            dcr_member_share=float(np.mean(d_in < d_out) + 0.5 * np.mean(d_in == d_out)),
        )
    return out


PER_SEED = (
    "roc_auc",
    "pr_auc",
    "recall_at_prevalence",
    "bytes",
    "rounds",
    "epsilon_spent",
    "mia_auc",
    "dcr_member_share",
    "dcr_member_median",
    "majority",
)


def stored_records(path: Path) -> dict:
    """Per-seed numbers of an earlier report (its `cells`), by (task, epsilon, method, seed):
    the run folders are not in git, so a fresh checkout that re-runs some cells keeps the
    others from the committed report."""
    if not path.exists():
        return {}
    out = {}
    for cell in json.loads(path.read_text()).get("cells", []):
        for i, seed in enumerate(cell["seeds"]):
            key = (cell["task"], cell["epsilon"], cell["method"], seed)
            out[key] = {m: cell[m][i] for m in PER_SEED if m in cell}
    return out


def summarize(args, jobs) -> dict:
    runs = args.out / "runs_synthetic"
    # a run on disk replaces the stored numbers of its cell and seed
    records = stored_records(args.out / "synthetic.json")
    for key, _, name, rounds in jobs:
        res = finished(runs / name, rounds)
        if res is None:
            continue
        last, final = res["rounds"][-1], res["final"]
        extra = json.loads((runs / name / "extra.json").read_text())
        records[(key["task"], key["epsilon"], key["method"], key["seed"])] = {
            "roc_auc": last.get("test_roc_auc"),
            "pr_auc": last.get("test_pr_auc"),
            "recall_at_prevalence": extra["recall_at_prevalence"],
            "bytes": final["total_bytes_up"] + final["total_bytes_down"],
            "rounds": sum(1 for r in res["rounds"] if r["round"] > 0),
            "epsilon_spent": final.get("dp_epsilon"),
            "mia_auc": json.loads((runs / name / "audit.json").read_text())["mia_auc"],
            "dcr_member_share": extra.get("dcr_member_share"),
            "dcr_member_median": extra.get("dcr_member_median"),
            "majority": last.get("majority_accuracy"),
        }
    cells = []
    for task in args.tasks:
        for eps in args.epsilons:
            base = {s: records.get((task, eps, "fedavg", s)) for s in args.seeds}
            for method in args.methods:
                recs = {
                    s: records[(task, eps, method, s)]
                    for s in args.seeds
                    if (task, eps, method, s) in records
                }
                if not recs:
                    continue
                seeds = sorted(recs)
                cell = {"task": task, "epsilon": eps, "method": method, "seeds": seeds}
                for metric in recs[seeds[0]]:
                    cell[metric] = [recs[s][metric] for s in seeds]
                cell["roc_auc_gap"] = [
                    base[s]["roc_auc"] - recs[s]["roc_auc"] for s in seeds if base.get(s)
                ]
                cell["pr_auc_gain"] = [
                    recs[s]["pr_auc"] - base[s]["pr_auc"] for s in seeds if base.get(s)
                ]
                cell["bytes_ratio"] = [
                    base[s]["bytes"] / recs[s]["bytes"] for s in seeds if base.get(s)
                ]
                cells.append(cell)
    # oneshot_refined against oneshot (all it changes) and against oneshot_70pct (its VAE's
    # budget: the discriminator's selection alone), and oneshot_70pct against oneshot (the
    # budget the VAE gives up); each paired by seed over the seeds both have
    comparisons = {
        "": ("oneshot_refined", "oneshot"),
        "_vs_70pct": ("oneshot_refined", "oneshot_70pct"),
        "_70pct_vs_oneshot": ("oneshot_70pct", "oneshot"),
    }
    refinement = []
    for task in args.tasks:
        for eps in args.epsilons:
            row = {"task": task, "epsilon": eps}
            for suffix, (a, b) in comparisons.items():
                seeds = [
                    s
                    for s in args.seeds
                    if (task, eps, a, s) in records and (task, eps, b, s) in records
                ]
                if not seeds:
                    continue
                row[f"seeds{suffix}"] = seeds
                for metric in ("roc_auc", "pr_auc"):
                    row[f"{metric}_diff{suffix}"] = [
                        records[(task, eps, a, s)][metric] - records[(task, eps, b, s)][metric]
                        for s in seeds
                    ]
            if "seeds" in row:
                refinement.append(row)
    return {
        "cells": cells,
        "refinement": refinement,
        "methods": {m: METHODS[m][0] + [f"rounds={METHODS[m][1]}"] for m in METHODS},
    }


def write_report(args, summary: dict) -> None:
    (args.out / "synthetic.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "# DP synthetic data vs FedAvg on real data",
        "",
        "`bench/synthetic.py` (commands in its docstring): in-process engine, CPU, natural "
        "splits, every run under privacy=sample_dp at the given epsilon (delta 1e-5; eps none: "
        "without DP). AUC gap "
        "= FedAvg's ROC-AUC minus the method's (paired by seed; positive = worse than FedAvg); "
        "PR gain = the method's PR-AUC minus FedAvg's. recall@prev = recall when the model "
        "flags as many test rows as there are positives. bytes = total both ways; "
        "x fewer = FedAvg's bytes / the method's. MIA AUC = best fedapp-audit attack (0.5 = "
        "guessing). member share = share of synthetic rows nearer a member than a non-member "
        "(0.5 = no sign of copying). Mean ± sd over seeds.",
        "",
        "| task | eps | method | ROC-AUC | AUC gap | PR-AUC | PR gain | recall@prev | bytes | "
        "x fewer | rounds | eps spent | MIA AUC | member share | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in summary["cells"]:
        lines.append(
            f"| {c['task']} | {c['epsilon']} | {c['method']} | {fmt_mean_sd(c['roc_auc'])} | "
            f"{fmt_mean_sd(c['roc_auc_gap']) if c['method'] != 'fedavg' else '-'} | "
            f"{fmt_mean_sd(c['pr_auc'])} | "
            f"{fmt_mean_sd(c['pr_auc_gain']) if c['method'] != 'fedavg' else '-'} | "
            f"{fmt_mean_sd(c['recall_at_prevalence'])} | "
            f"{np.mean(c['bytes']) / 1e6:.2f} MB | {fmt_mean_sd(c['bytes_ratio'], 1)} | "
            f"{int(np.mean(c['rounds']))} | {fmt_mean_sd(c['epsilon_spent'], 2)} | "
            f"{fmt_mean_sd(c['mia_auc'])} | {fmt_mean_sd(c['dcr_member_share'])} | "
            f"{len(c['seeds'])} |"
        )
    if summary["refinement"]:
        lines += [
            "",
            "## Refinement by a DP discriminator",
            "",
            "Paired by seed, mean ± sd (positive = the first is better), with the seeds where "
            "it is better. refined = oneshot_refined; 70pct = oneshot_70pct, one-shot with the "
            "VAE's budget inside oneshot_refined (70 % of the epsilon), so refined − 70pct is "
            "the discriminator's selection alone and 70pct − oneshot the budget it takes from "
            "the VAE.",
            "",
            "| task | eps | refined − oneshot: ROC-AUC | PR-AUC | refined − 70pct: ROC-AUC | "
            "PR-AUC | 70pct − oneshot: ROC-AUC | seeds |",
            "|---|---|---|---|---|---|---|---|",
        ]

        def diff(row, key):
            d = row.get(key)
            return f"{fmt_mean_sd(d)} ({sum(x > 0 for x in d)}/{len(d)})" if d else "-"

        for r in summary["refinement"]:
            lines.append(
                f"| {r['task']} | {r['epsilon']} | {diff(r, 'roc_auc_diff')} | "
                f"{diff(r, 'pr_auc_diff')} | {diff(r, 'roc_auc_diff_vs_70pct')} | "
                f"{diff(r, 'pr_auc_diff_vs_70pct')} | {diff(r, 'roc_auc_diff_70pct_vs_oneshot')} | "
                f"{len(r['seeds'])} |"
            )
    (args.out / "synthetic.md").write_text("\n".join(lines) + "\n")
    plot(args, summary)
    print("\n".join(lines))


def plot(args, summary: dict) -> None:
    """ROC-AUC (mean, sd over seeds) against total bytes: a panel per task, the marker says
    the method and the colour the epsilon; one legend for all panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    tasks = sorted({c["task"] for c in summary["cells"]}, key=args.tasks.index)
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    markers = {
        "fedavg": "o",
        "oneshot": "*",
        "oneshot_refined": "P",
        "oneshot_70pct": "x",
        "hybrid": "s",
        "rare_class": "^",
    }
    epsilons = list(dict.fromkeys(c["epsilon"] for c in summary["cells"]))
    colours = {e: ("0.45" if e == "none" else f"C{i}") for i, e in enumerate(epsilons)}
    for ax, task in zip(axes[0], tasks, strict=True):
        for c in (c for c in summary["cells"] if c["task"] == task):
            ax.errorbar(
                np.mean(c["bytes"]) / 1e6,
                np.mean(c["roc_auc"]),
                yerr=np.std(c["roc_auc"], ddof=1) if len(c["roc_auc"]) > 1 else None,
                marker=markers.get(c["method"], "x"),
                color=colours[c["epsilon"]],
                markersize=7,
                alpha=0.85,
                linestyle="none",
            )
        ax.set_xscale("log")
        ax.set_xlabel("total bytes (MB, log)")
        ax.set_ylabel("test ROC-AUC")
        ax.set_title(task)
    methods = [m for m in markers if any(c["method"] == m for c in summary["cells"])]
    handles = [
        Line2D([], [], marker=markers[m], color="k", linestyle="none", label=m) for m in methods
    ] + [
        Line2D([], [], marker="o", color=colours[e], linestyle="none", label=f"eps={e}")
        for e in epsilons
    ]
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    fig.savefig(args.out / "synthetic_bytes.png", dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument(
        "--epsilons", nargs="+", default=EPSILONS, help="target epsilons; none = without DP"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--no-reuse", dest="reuse", action="store_false")
    parser.add_argument("--summarize-only", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if not args.summarize_only:
        execute(args, plan(args))
    # the report covers the whole grid (and anything asked for beyond it), not only this
    # invocation's part: cells run earlier come from their run folders or the stored report
    full = argparse.Namespace(**vars(args))
    for name, grid in (("tasks", TASKS), ("epsilons", EPSILONS), ("seeds", SEEDS)):
        setattr(full, name, union(grid, getattr(args, name)))
    full.methods = union(list(METHODS), args.methods)
    write_report(full, summarize(full, plan(full)))
    return 0


def union(first: list, second: list) -> list:
    """`first`, then what `second` adds, in order."""
    return [*first, *(x for x in second if x not in first)]


if __name__ == "__main__":
    sys.exit(main())
