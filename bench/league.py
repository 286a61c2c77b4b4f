"""One league table: every strategy and peer that runs on a task, on the same splits and
seeds in one run, ranked, with the reference rows a tabular data scientist fits first.

Regimes (credit default, the fast task): the natural split (7 education levels as clients),
label skew (Dirichlet alpha 0.1 over 10 clients; `partition.min_partition_size=1`, as
credit's two classes give some seeds clients of a few rows only), and attackers on the
natural split (30% of the clients flip their labels; `fedapp.features.attacks`, the same
clients for every strategy; `scaled0.3`, updates scaled by the attack's factor, is defined
but not in the default run: robustness.md has every attack). Every strategy runs
`--rounds` rounds with its shipped defaults, all clients every round, in the in-process engine
(`fedapp.cli.inline`), one single-threaded CPU process per run, `--jobs` at a time. Metric: the
server's test ROC-AUC, final and mean of the last 3 rounds; mean ± sd over seeds; rank within a
regime by the mean of the last 3 rounds (1 = best). Reference rows, not ranked: scikit-learn's
`HistGradientBoostingClassifier` (defaults, `random_state=seed`) fitted on the pooled training
rows of the same seed's split and scored on the same test rows, and the majority class
(ROC-AUC 0.5 by definition).

    nice -n 10 .venv/bin/python bench/league.py --jobs 2          # ~20 min on 2 cores
    .venv/bin/python bench/league.py --summarize-only              # tables from the runs

Device heterogeneity is a regime of its own where time matters: its rows (time to target on
the virtual clock, per device profile: FedAvg, FedAsync, FedBuff, TiFL, tiered, ...) come from
bench/hetero.py's run (bench/results/hetero.json: one run, the same splits, seeds and profiles
for its strategies), ranked here by mean time to target; this script does not rerun them.

Writes bench/results/league.{json,md}; runs stay under bench/results/runs_league/ (ignored by
git). Not in it: FEMNIST (robustness.md, femnist_baselines.md and hetero.md have its cells).
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
from bench.hetero import STRATEGIES as HETERO_ORDER  # noqa: E402

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
    "label_flip0.3": ["partition=natural", "attack=label_flip", "attack.fraction=0.3"],
    "scaled0.3": ["partition=natural", "attack=scaled", "attack.fraction=0.3"],
}
HETERO_STRATEGIES = HETERO_ORDER  # bench/hetero.py's strategies, in its order
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


def rank(
    rows: list[dict], key: str = "last3", group: str = "regime", higher_is_better: bool = True
) -> None:
    """Rank within each `group` by the mean over seeds of `key` (1 = best: the highest, or
    the lowest when not `higher_is_better`); a row with a missing seed is not ranked."""
    sign = -1.0 if higher_is_better else 1.0
    for value in {r[group] for r in rows}:
        ranked = [r for r in rows if r[group] == value and all(v is not None for v in r[key])]
        ranked.sort(key=lambda r: sign * float(np.mean(r[key])))
        for i, r in enumerate(ranked, start=1):
            r["rank"] = i


def hetero_rows(task: str) -> dict | None:
    """Device heterogeneity, per profile and strategy, from bench/hetero.py's run: time to
    target (simulated seconds to `target_frac` x synchronous FedAvg's final metric, same
    seed), the final metric at the time budget and the aggregation success rate, per seed;
    ranked by mean time to target (a strategy that missed the target in a seed is unranked)."""
    path = RESULTS / "hetero.json"
    if not path.exists():
        return None
    h = json.loads(path.read_text())
    cells = [c for c in h["cells"] if c["task"] == task]
    profiles = list(dict.fromkeys(c["profile"] for c in cells))
    out = []
    for profile in profiles:
        rows = []
        for strategy in HETERO_STRATEGIES:
            mine = sorted(
                (c for c in cells if c["profile"] == profile and c["strategy"] == strategy),
                key=lambda c: c["seed"],
            )
            if not mine:
                continue
            rows.append(
                {
                    "profile": profile,
                    "strategy": strategy,
                    "seeds": [c["seed"] for c in mine],
                    "time_to_target_s": [c["time_to_target_s"] for c in mine],
                    "final": [c["final"] for c in mine],
                    "success_rate": [c["success_rate"] for c in mine],
                    "kept": bool(mine[0].get("kept")),
                }
            )
        rank(rows, "time_to_target_s", "profile", higher_is_better=False)
        for r in rows:
            r.setdefault("rank", None)
        out += rows
    return {
        "source": "bench/results/hetero.json",
        "target_frac": h["target_frac"],
        "rounds": h["rounds"],
        "round_factor": h["round_factor"],
        "kept_from": h.get("kept_from"),
        "rows": out,
    }


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
        "hetero": hetero_rows(args.task),
        "strategies": list(args.strategies),
    }
    save(data)


def save(data: dict) -> None:
    """league.json and league.md (the tables from `data` alone)."""
    (RESULTS / "league.json").write_text(json.dumps(data, indent=1))
    rows, refs, wall_min = data["rows"], data["reference"], data["wall_minutes"]
    # league.json files from before "strategies" was stored: the rows' order
    strategies = data.get("strategies") or list(dict.fromkeys(r["strategy"] for r in rows))
    lines = [
        f"# League table: {data['task']}, seeds {data['seeds']}, {data['rounds']} rounds",
        "",
        f"`{data['command']}` (`bench/league.py`; see its docstring)"
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
    for regime in data["regimes"]:
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
            star = "*" if r.get("kept") else ""
            lines.append(
                f"| {r['rank'] or '-'} | {r['strategy']}{star} | {fmt_mean_sd(r['final'])} | "
                f"{fmt_mean_sd(r['last3'])} | {done}/{len(r['status'])} |"
            )
        lines += [
            f"| ref. | pooled HistGradientBoosting | {fmt_mean_sd(refs['hgb_pooled'])} | | |",
            "| ref. | majority class | 0.500 | 0.500 | |",
            "",
        ]
    lines += [
        "The pooled gradient-boosted trees see every training row at once (no federation); "
        "the same number for every regime, since the pooled rows are the same. The majority "
        f"class scores accuracy {fmt_mean_sd(refs['majority_acc'])} on the test rows.",
        "",
    ]
    het = data["hetero"]
    if het:
        lines += [
            "## device heterogeneity",
            "",
            f"From `{het['source']}` (bench/hetero.py: 30 IID clients, 10 at a time, FedAvg's "
            f"{het['rounds']} rounds set the time budget, the others up to "
            f"{het['round_factor']}x as many; rows marked * kept from an earlier run of it). "
            f"Time to {het['target_frac']:g} x synchronous FedAvg's final ROC-AUC on the virtual "
            "clock (simulated seconds, mean ± sd over seeds; rank by it, 1 = soonest), the "
            "ROC-AUC at the budget and the share of rounds that aggregated.",
            "",
        ]
        for profile in dict.fromkeys(r["profile"] for r in het["rows"]):
            rr = sorted(
                (r for r in het["rows"] if r["profile"] == profile),
                key=lambda r: (r["rank"] is None, r["rank"] or 0),
            )
            lines += [
                f"### {profile}",
                "",
                "| rank | strategy | time to target (s) | ROC-AUC at the budget | success |",
                "|---|---|---|---|---|",
            ]
            for r in rr:
                missed = sum(t is None for t in r["time_to_target_s"])
                ttt = fmt_mean_sd(r["time_to_target_s"], 0) + (
                    f" ({missed} seed(s) missed)" if missed else ""
                )
                lines.append(
                    f"| {r['rank'] or '-'} | {r['strategy']}{'*' if r['kept'] else ''} | {ttt} | "
                    f"{fmt_mean_sd(r['final'])} | {fmt_mean_sd(r['success_rate'], 2)} |"
                )
            lines.append("")
    if any(r.get("kept") for r in rows):
        lines += [
            "Rows marked * are kept from an earlier run of this script (`--keep-from`; same "
            "seeds and rounds, deterministic runs: the code of those strategies has not changed "
            "since, bench/behaviour_digest.py).",
            "",
        ]
    left = [s for s in STRATEGIES if s not in strategies]
    if left:
        lines += [f"Not in this run (`--strategies`): {', '.join(left)}.", ""]
    (RESULTS / "league.md").write_text("\n".join(lines))
    print(f"[league] wrote {RESULTS / 'league.md'}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="credit")
    p.add_argument(
        "--regimes",
        nargs="+",
        default=["natural", "dirichlet0.1", "label_flip0.3"],
        choices=list(REGIMES),
    )
    p.add_argument("--strategies", nargs="+", default=STRATEGIES)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument(
        "--hetero-only",
        action="store_true",
        help="re-read bench/results/hetero.json into league.json's device-heterogeneity rows; "
        "every other row stays as it is",
    )
    p.add_argument(
        "--keep-from",
        type=Path,
        help="an earlier league.json: its rows for (regime, strategy) pairs not run here are "
        "kept (marked; the runs are deterministic, so the same seeds give the same numbers)",
    )
    args = p.parse_args()
    args.argv = sys.argv[1:]
    if args.hetero_only:
        data = json.loads((RESULTS / "league.json").read_text())
        save({**data, "hetero": hetero_rows(data["task"])})
        return 0
    t0 = time.perf_counter()
    earlier = {}
    if args.keep_from:
        old = json.loads(args.keep_from.read_text())
        if old["seeds"] != args.seeds or old["rounds"] != args.rounds:
            raise SystemExit("--keep-from: that run had other seeds or rounds")
        earlier = {(r["regime"], r["strategy"]): r for r in old["rows"]}
    todo = [
        (regime, strategy, seed)
        for seed in args.seeds
        for regime in args.regimes
        for strategy in args.strategies
        if (regime, strategy) not in earlier
        and completed(
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
        {**earlier[(regime, strategy)], "kept": True}
        if (regime, strategy) in earlier
        else collect(args.task, regime, strategy, args.seeds, args.rounds)
        for regime in args.regimes
        for strategy in args.strategies
    ]
    write(args, rows, reference_rows(args.task, args.seeds), wall)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
