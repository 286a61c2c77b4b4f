"""Tabular tasks: centralized vs FedAvg vs FedProx, natural and Dirichlet(0.5) splits, over seeds.

Every number sits next to the trivial baselines (majority class accuracy; balanced accuracy 0.5,
ROC-AUC 0.5) so that a high accuracy on imbalanced data cannot pass for a good model.

    .venv/bin/python bench/tabular_baselines.py --seeds 0 1 2
    .venv/bin/python bench/tabular_baselines.py --tasks medical --seeds 0 --rounds 5   # smoke
    .venv/bin/python bench/tabular_baselines.py --tasks insurance_image --partitions dirichlet0.5 \
        --rounds 30 --centralized-epochs 15 --out bench/results/image   # photos (own defaults)

Writes bench/results/tabular_baselines.{json,md}; runs stay under bench/results/runs/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import completed  # noqa: E402
from bench.common import fmt_mean_sd as fmt  # noqa: E402
from fedapp.cli.centralized import train_centralized  # noqa: E402
from fedapp.cli.launch import exit_cleanly_on_sigterm, run_simulation  # noqa: E402

METRICS = (
    "test_accuracy",
    "test_balanced_accuracy",
    "test_roc_auc",
    "test_pr_auc",
    "test_f1",
    "test_recall",
)
PARTITIONS = {
    "natural": ["partition=natural"],
    "dirichlet0.5": ["partition=dirichlet", "partition.alpha=0.5", "partition.num_partitions=10"],
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tasks",
        nargs="+",
        default=["credit", "credit_lending", "insurance", "bankruptcy", "medical"],
    )
    p.add_argument("--strategies", nargs="+", default=["fedavg", "fedprox"])
    p.add_argument("--partitions", nargs="+", default=list(PARTITIONS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=20, help="same as the tasks' default")
    p.add_argument("--centralized-epochs", type=int, default=20)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--reuse", action="store_true", help="reuse completed runs under <out>/runs")
    args = p.parse_args()
    exit_cleanly_on_sigterm()

    common: list[str] = []  # each task's own training defaults (conf/task/_tabular_train.yaml)
    rows = []
    for task in args.tasks:
        majority = None
        central: list[dict] = []
        for seed in args.seeds:
            run_dir = args.out / "runs" / f"{task}-centralized-s{seed}"
            c = (
                args.reuse and completed(run_dir / "results.json", args.centralized_epochs, "epoch")
            ) or (
                train_centralized(
                    [
                        f"task={task}",
                        f"seed={seed}",
                        f"centralized.epochs={args.centralized_epochs}",
                        # tasks without a natural split still need a partitioner to load; the
                        # pooled training rows are the same whichever one it is
                        *PARTITIONS[args.partitions[0]],
                    ],
                    run_dir,
                )
            )
            central.append(c["final"])
            majority = c["meta"]["majority_accuracy"]
        rows.append(
            {
                "task": task,
                "partition": "-",
                "method": "centralized",
                **{m: [r.get(m) for r in central] for m in METRICS},
                "majority_accuracy": majority,
            }
        )
        for part in args.partitions:
            for strategy in args.strategies:
                finals = []
                for seed in args.seeds:
                    ovr = [
                        f"task={task}",
                        f"strategy={strategy}",
                        f"seed={seed}",
                        f"rounds={args.rounds}",
                        *PARTITIONS[part],
                        *common,
                    ]
                    run_dir = args.out / "runs" / f"{task}-{part}-{strategy}-s{seed}"
                    if args.reuse and (res := completed(run_dir / "results.json", args.rounds)):
                        finals.append(res["final"])
                        continue
                    outcome = run_simulation(ovr, run_dir)
                    if outcome.ok:
                        res = json.loads((outcome.output_dir / "results.json").read_text())
                        finals.append(res["final"])
                rows.append(
                    {
                        "task": task,
                        "partition": part,
                        "method": strategy,
                        **{m: [r.get(m) for r in finals] for m in METRICS},
                        "majority_accuracy": majority,
                        "runs": len(finals),
                    }
                )
    (args.out / "tabular_baselines.json").write_text(
        json.dumps({"seeds": args.seeds, "rounds": args.rounds, "rows": rows}, indent=2)
    )
    lines = [
        f"# Tabular tasks: centralized vs federated, seeds {args.seeds}, {args.rounds} rounds",
        "",
        "Global model on the held-out stratified test set (20% of rows), mean ± sd over seeds. "
        "Majority class: its accuracy; its balanced accuracy and ROC-AUC are 0.5, its F1 and recall 0.",
        "",
        "| task | split | method | accuracy | majority acc. | balanced acc. | ROC-AUC | PR-AUC | F1 | recall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['partition']} | {r['method']} | {fmt(r['test_accuracy'])} | "
            f"{r['majority_accuracy']:.3f} | {fmt(r['test_balanced_accuracy'])} | {fmt(r['test_roc_auc'])} | "
            f"{fmt(r['test_pr_auc'])} | {fmt(r['test_f1'])} | {fmt(r['test_recall'])} |"
        )
    (args.out / "tabular_baselines.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
