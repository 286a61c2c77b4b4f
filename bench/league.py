"""One league table: every strategy and peer that runs on a task, on the same splits and
seeds in one run, ranked, with the reference rows a tabular data scientist fits first.

Regimes (credit default, the fast task): the natural split (7 education levels as clients)
and label skew (Dirichlet alpha 0.1 over 10 clients; `partition.min_partition_size=1`, as
credit's two classes give some seeds clients of a few rows only). Every strategy runs
`--rounds` rounds with its shipped defaults, all clients every round, in the in-process engine
(`fedapp.cli.inline`), one single-threaded CPU process per run, `--jobs` at a time. Metric: the
server's test ROC-AUC, final and mean of the last 3 rounds; mean ± sd over seeds; rank within a
regime by the mean of the last 3 rounds (1 = best). Reference rows, not ranked: scikit-learn's
`HistGradientBoostingClassifier` (defaults, `random_state=seed`) fitted on the pooled training
rows of the same seed's split and scored on the same test rows, and the majority class
(ROC-AUC 0.5 by definition).

    nice -n 10 .venv/bin/python bench/league.py --jobs 2          # ~20 min on 2 cores
    .venv/bin/python bench/league.py --summarize-only              # tables from the runs

Writes bench/results/league.{json,md}; runs stay under bench/results/runs_league/ (ignored by
git). Not yet in it (issue 34 part 6): the attacker and device-heterogeneity regimes, FEMNIST,
time to target.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import completed, fmt_mean_sd, run_inline_job, run_pool  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RUNS = RESULTS / "runs_league"
REGIMES = {
    "natural": ["partition=natural"],
    "dirichlet0.1": [
        "partition=dirichlet",
        "partition.alpha=0.1",
        "partition.num_partitions=10",
        "partition.min_partition_size=1",
    ],
}
# every strategy of conf/strategy/ that trains one global model in synchronous rounds
# (personalised ones score per site, event-driven ones need a device profile, synthetic
# shares rows)
STRATEGIES = [
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "qfedavg",
    "fednova",
    "scaffold",
    "moon",
    "trust",
    "contribution",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
]
METRIC = "test_roc_auc"


def run_name(task: str, regime: str, strategy: str, seed: int) -> str:
    return f"{task}-{regime}-{strategy}-s{seed}"


def overrides(task: str, regime: str, strategy: str, seed: int, rounds: int) -> list[str]:
    return [
        f"task={task}",
        *REGIMES[regime],
        f"strategy={strategy}",
        f"seed={seed}",
        f"rounds={rounds}",
        "clients_per_round=50",  # all of them (capped at the clients there are)
        "checkpoint=false",
    ]


def reference_rows(task: str, seeds: list[int]) -> dict[str, list[float]]:
    """Pooled HistGradientBoostingClassifier and the majority class, per seed, on the
    federated runs' split of that seed (tasks.tabular: `train_idx` / the central test rows)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    from fedapp.core.config import compose, resolve_data_dir
    from tasks import get_task

    hgb, majority_acc = [], []
    for seed in seeds:
        cfg = compose([f"task={task}", *REGIMES["natural"], f"seed={seed}"])
        t = get_task(cfg, resolve_data_dir(cfg))
        train, test = t.load_centralized_train(), t.load_central_test()
        n_num = train.numeric.shape[1]
        x_tr = np.hstack([train.numeric, train.codes.astype(np.float64)])
        x_te = np.hstack([test.numeric, test.codes.astype(np.float64)])
        cat = [False] * n_num + [True] * train.codes.shape[1]
        model = HistGradientBoostingClassifier(categorical_features=cat, random_state=seed)
        model.fit(x_tr, train.y)
        hgb.append(float(roc_auc_score(test.y, model.predict_proba(x_te)[:, 1])))
        share = float(np.mean(test.y == np.bincount(train.y).argmax()))
        majority_acc.append(share)
    return {"hgb_pooled": hgb, "majority_roc_auc": [0.5] * len(seeds), "majority_acc": majority_acc}


def collect(task: str, regime: str, strategy: str, seeds: list[int], rounds: int) -> dict:
    finals, last3, statuses = [], [], []
    for seed in seeds:
        res = completed(RUNS / run_name(task, regime, strategy, seed) / "results.json", rounds)
        if res is None:
            finals.append(None)
            last3.append(None)
            statuses.append("missing")
            continue
        curve = [r.get(METRIC) for r in res["rounds"] if r["round"] > 0]
        finals.append(res["final"].get(METRIC))
        tail = [v for v in curve[-3:] if v is not None]
        last3.append(float(np.mean(tail)) if tail else None)
        statuses.append(res["meta"]["status"])
    return {
        "regime": regime,
        "strategy": strategy,
        "final": finals,
        "last3": last3,
        "status": statuses,
    }


def rank(rows: list[dict]) -> None:
    """Rank within each regime by the mean over seeds of the last-3-round mean (1 = best);
    a strategy with a missing seed is not ranked."""
    for regime in {r["regime"] for r in rows}:
        ranked = [
            r for r in rows if r["regime"] == regime and all(v is not None for v in r["last3"])
        ]
        ranked.sort(key=lambda r: -float(np.mean(r["last3"])))
        for i, r in enumerate(ranked, start=1):
            r["rank"] = i


def write(args, rows: list[dict], refs: dict, wall_min: float | None) -> None:
    rank(rows)
    for r in rows:
        r.setdefault("rank", None)
        for key in ("final", "last3"):
            vals = [v for v in r[key] if v is not None]
            r[f"{key}_mean"] = float(np.mean(vals)) if vals else None
            r[f"{key}_sd"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else None
    # the command that makes the runs (and this table): --summarize-only only re-reads them
    argv = [a for a in args.argv if a != "--summarize-only"]
    cmd = "nice -n 10 .venv/bin/python bench/league.py " + " ".join(argv)
    data = {
        "task": args.task,
        "seeds": args.seeds,
        "rounds": args.rounds,
        "metric": METRIC,
        "regimes": {k: v for k, v in REGIMES.items() if k in args.regimes},
        "command": cmd.strip(),
        "wall_minutes": wall_min,
        "rows": rows,
        "reference": refs,
    }
    (RESULTS / "league.json").write_text(json.dumps(data, indent=1))
    lines = [
        f"# League table: {args.task}, seeds {args.seeds}, {args.rounds} rounds",
        "",
        f"`{cmd.strip()}` (`bench/league.py`; see its docstring)"
        + (f", {wall_min:.0f} min wall." if wall_min else "."),
        "",
        "Test ROC-AUC of the global model on the server's test rows (20% of the pooled rows, "
        "stratified, the split of each seed), mean ± sd over seeds: after the last round, and "
        "averaged over the last 3 rounds (rank by the latter, 1 = best, within a regime). "
        "Every strategy at its shipped defaults (`conf/strategy/<name>.yaml`), all clients every "
        "round, the same splits and seeds. Regimes: "
        + "; ".join(f"`{k}`: `{' '.join(v)}`" for k, v in data["regimes"].items())
        + ".",
        "",
    ]
    for regime in args.regimes:
        rr = sorted(
            (r for r in rows if r["regime"] == regime),
            key=lambda r: (r["rank"] is None, r["rank"] or 0),
        )
        lines += [
            f"## {regime}",
            "",
            "| rank | strategy | final | last 3 rounds | seeds run |",
            "|---|---|---|---|---|",
        ]
        for r in rr:
            done = sum(s != "missing" for s in r["status"])
            lines.append(
                f"| {r['rank'] or '-'} | {r['strategy']} | {fmt_mean_sd(r['final'])} | "
                f"{fmt_mean_sd(r['last3'])} | {done}/{len(r['status'])} |"
            )
        lines += [
            f"| ref. | pooled HistGradientBoosting | {fmt_mean_sd(refs['hgb_pooled'])} | | |",
            "| ref. | majority class | 0.500 | 0.500 | |",
            "",
        ]
    lines += [
        "The pooled gradient-boosted trees see every training row at once (no federation); "
        "the same number for both regimes, since the pooled rows are the same. The majority "
        f"class scores accuracy {fmt_mean_sd(refs['majority_acc'])} on the test rows.",
        "",
    ]
    left = [s for s in STRATEGIES if s not in args.strategies]
    if left:
        lines += [f"Not in this run (`--strategies`): {', '.join(left)}.", ""]
    (RESULTS / "league.md").write_text("\n".join(lines))
    print(f"[league] wrote {RESULTS / 'league.md'}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="credit")
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    p.add_argument("--strategies", nargs="+", default=STRATEGIES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--summarize-only", action="store_true")
    args = p.parse_args()
    args.argv = sys.argv[1:]
    t0 = time.perf_counter()
    todo = [
        (regime, strategy, seed)
        for seed in args.seeds
        for regime in args.regimes
        for strategy in args.strategies
        if completed(
            RUNS / run_name(args.task, regime, strategy, seed) / "results.json", args.rounds
        )
        is None
    ]
    if not args.summarize_only and todo:
        RUNS.mkdir(parents=True, exist_ok=True)

        def work(item):
            regime, strategy, seed = item
            out = RUNS / run_name(args.task, regime, strategy, seed)
            out.mkdir(parents=True, exist_ok=True)
            ovr = overrides(args.task, regime, strategy, seed, args.rounds)
            return out.name, run_inline_job(ovr, out, out / "inline.log", ROOT)

        run_pool(todo, args.jobs, work)
    wall = (time.perf_counter() - t0) / 60 if not args.summarize_only and todo else None
    if wall is None and (RESULTS / "league.json").exists():  # the runs' own, when summarizing
        wall = json.loads((RESULTS / "league.json").read_text()).get("wall_minutes")
    rows = [
        collect(args.task, regime, strategy, args.seeds, args.rounds)
        for regime in args.regimes
        for strategy in args.strategies
    ]
    write(args, rows, reference_rows(args.task, args.seeds), wall)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
