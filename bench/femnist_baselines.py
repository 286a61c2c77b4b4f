"""FEMNIST baselines side by side: FedAvg, FedProx, q-FedAvg vs centralized and majority class.

Same data (the 201-writer LEAF subset, natural split), same seeds, same client sampling for every
strategy. Each (strategy, seed) is one run of `--rounds` rounds; the accuracy after the default
number of rounds (conf/config.yaml `rounds`) is read from the same trajectory, since a run with
the same seed samples the same clients in its first rounds.

    .venv/bin/python bench/femnist_baselines.py --seeds 0 1 2 --rounds 50 [--reuse]
    .venv/bin/python bench/femnist_baselines.py --seeds 0 --rounds 5 --centralized-epochs 1   # smoke
    .venv/bin/python bench/femnist_baselines.py --name femnist_long --rounds 300 --seeds 0 \
        --strategies fedavg contribution --extra server_val_fraction=0.1 \
        --report-rounds 30 50 100 200 300 --reuse                                          # long horizon

Writes bench/results/<name>.{json,md} and <name>.png (name: femnist_baselines); the individual
runs stay under bench/results/runs/ (runs_<name>/ for another name; not committed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import completed  # noqa: E402
from fedapp.checks import compose  # noqa: E402
from fedapp.cli.centralized import train_centralized  # noqa: E402
from fedapp.cli.launch import exit_cleanly_on_sigterm, run_simulation  # noqa: E402
from fedapp.core.config import resolve_data_dir  # noqa: E402
from tasks import get_task  # noqa: E402


def majority_accuracy(overrides: list[str]) -> float:
    """Accuracy of always predicting the most frequent training label."""
    cfg = compose(overrides)
    task = get_task(cfg, resolve_data_dir(cfg))
    train_y = task.load_centralized_train().tensors[1].numpy()
    # the rows the runs report on (without server_val_fraction's validation rows)
    _, test = task.central_test_split(float(cfg.get("server_val_fraction") or 0.0), int(cfg.seed))
    test_y = test.tensors[1].numpy()
    return float(np.mean(test_y == np.bincount(train_y).argmax()))


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else None)


def fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    m, s = mean_sd(values)
    return f"{m * scale:.{digits}f}" + (f" ± {s * scale:.{digits}f}" if s is not None else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--strategies", nargs="+", default=["fedavg", "fedprox", "qfedavg"])
    p.add_argument("--rounds", type=int, default=60, help="length of the longer run")
    p.add_argument("--centralized-epochs", type=int, default=7)
    p.add_argument("--extra", nargs="*", default=[], help="extra Hydra overrides for every run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--name", default="femnist_baselines", help="stem of the report files")
    p.add_argument(
        "--report-rounds",
        type=int,
        nargs="*",
        default=[],
        help="rounds whose accuracy gets a column (default: the config's rounds and --rounds)",
    )
    p.add_argument(
        "--summarize-only",
        action="store_true",
        help="start nothing: tabulate the completed runs under <out>/runs (seeds may be missing)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse completed runs found under <out>/runs instead of running them again",
    )
    args = p.parse_args()
    exit_cleanly_on_sigterm()

    args.out.mkdir(parents=True, exist_ok=True)
    default_rounds = int(compose(args.extra).rounds)
    runs_dir = args.out / ("runs" if args.name == "femnist_baselines" else f"runs_{args.name}")
    report_rounds = sorted(
        {r for r in (args.report_rounds or [default_rounds, args.rounds]) if 0 < r <= args.rounds}
        | {min(default_rounds, args.rounds), args.rounds}
    )
    runs: dict[str, dict[int, dict]] = {}
    for strategy in args.strategies:
        for seed in args.seeds:
            ovr = [*args.extra, f"strategy={strategy}", f"seed={seed}", f"rounds={args.rounds}"]
            run_dir = runs_dir / f"{strategy}-s{seed}"
            reuse = args.reuse or args.summarize_only
            if reuse and (res := completed(run_dir / "results.json", args.rounds)):
                runs.setdefault(strategy, {})[seed] = res
                continue
            if args.summarize_only:
                print(f"[bench] {strategy} seed {seed}: no completed run, left out", flush=True)
                continue
            outcome = run_simulation(ovr, run_dir)
            res = json.loads((outcome.output_dir / "results.json").read_text())
            if not outcome.ok:
                print(
                    f"[bench] {strategy} seed {seed} did not complete ({outcome.status})",
                    flush=True,
                )
                continue
            runs.setdefault(strategy, {})[seed] = res

    central = {}
    for seed in args.seeds:
        run_dir = runs_dir / f"centralized-s{seed}"
        if (args.reuse or args.summarize_only) and (
            c := completed(run_dir / "results.json", args.centralized_epochs, "epoch")
        ):
            central[seed] = c
            continue
        if args.summarize_only:
            print(f"[bench] centralized seed {seed}: no completed run, left out", flush=True)
            continue
        c = train_centralized(
            [*args.extra, f"seed={seed}", f"centralized.epochs={args.centralized_epochs}"],
            run_dir,
        )
        central[seed] = c
    majority = majority_accuracy(args.extra)
    central_acc = [c["final"]["test_accuracy"] for c in central.values()]

    rows = []
    for strategy, by_seed in runs.items():

        def acc_at(res: dict, r: int) -> float:
            return next(x["test_accuracy"] for x in res["rounds"] if x["round"] == r)

        at_default = [acc_at(r, min(default_rounds, args.rounds)) for r in by_seed.values()]
        at_end = [acc_at(r, args.rounds) for r in by_seed.values()]
        fed_rounds = [x for r in by_seed.values() for x in r["rounds"] if x["round"] > 0]
        # The best round is read off the test curve, so it flatters; the mean of the last 10
        # rounds is the steadier reading of where a run ended.
        best = [max(r["rounds"], key=lambda x: x["test_accuracy"]) for r in by_seed.values()]
        last10 = [
            float(np.mean([x["test_accuracy"] for x in r["rounds"][-10:]]))
            for r in by_seed.values()
        ]
        rows.append(
            {
                "strategy": strategy,
                "seeds": sorted(by_seed),
                **{
                    f"acc_round_{k}": [acc_at(r, k) for r in by_seed.values()]
                    for k in report_rounds
                },
                f"acc_round_{default_rounds}": at_default,
                f"acc_round_{args.rounds}": at_end,
                "acc_last10_mean": last10,
                "acc_best": [b["test_accuracy"] for b in best],
                "best_round": [b["round"] for b in best],
                "gap_to_centralized_last10_points": float(
                    (np.mean(central_acc) - np.mean(last10)) * 100
                )
                if central_acc
                else None,
                "ratio_to_centralized_end": float(np.mean(at_end) / np.mean(central_acc)),
                "s_per_round_mean": float(np.mean([x["wall_s"] for x in fed_rounds])),
                "s_per_round_median": float(np.median([x["wall_s"] for x in fed_rounds])),
                "bytes_up_per_round": float(np.mean([x["bytes_up"] for x in fed_rounds])),
                "bytes_down_per_round": float(np.mean([x["bytes_down"] for x in fed_rounds])),
                "failures": int(sum(x["num_failures"] for x in fed_rounds)),
            }
        )

    summary = {
        "setup": {
            "seeds": args.seeds,
            "rounds_default": default_rounds,
            "rounds_long": args.rounds,
            "report_rounds": report_rounds,
            "extra_overrides": args.extra,
            "config": json.loads(
                json.dumps(dict(next(iter(next(iter(runs.values())).values()))["config"]))
            )
            if runs
            else None,
        },
        "centralized": {"epochs": args.centralized_epochs, "test_accuracy": central_acc},
        "majority_class_accuracy": majority,
        "strategies": rows,
    }
    (args.out / f"{args.name}.json").write_text(json.dumps(summary, indent=2))

    cmd = (
        f"bench/femnist_baselines.py --seeds {' '.join(map(str, args.seeds))} --rounds {args.rounds}"
        + (f" --name {args.name}" if args.name != "femnist_baselines" else "")
        + f" --strategies {' '.join(args.strategies)}"
        + (f" --extra {' '.join(args.extra)}" if args.extra else "")
        + (
            f" --report-rounds {' '.join(map(str, args.report_rounds))}"
            if args.report_rounds
            else ""
        )
        + " --reuse"
    )
    if args.name != "femnist_baselines":
        lines = [
            f"# FEMNIST (201 writers, natural split): {args.rounds} rounds, seeds {args.seeds}",
            "",
            f"Test accuracy (%) of the global model on the server's test rows after the given rounds; "
            f"`last 10`: mean over the last 10 rounds; `best`: the highest round (read off the test "
            f"curve, so optimistic). Centralized: the same model trained {args.centralized_epochs} epochs "
            f"on the pooled training data (`fedapp-centralized`, evaluated on the same test rows). "
            f"Generated by `{cmd}`.",
            "",
            "| strategy | seeds | "
            + " | ".join(f"@ {k}" for k in report_rounds)
            + " | last 10 | best (round) | centralized − last 10 (points) | s / round (median) | MB up + down / round |",
            "|---|---|" + "---|" * (len(report_rounds) + 5),
        ]
        for r in rows:
            gap = r["gap_to_centralized_last10_points"]
            lines.append(
                f"| {r['strategy']} | {','.join(map(str, r['seeds']))} | "
                + " | ".join(fmt(r[f"acc_round_{k}"]) for k in report_rounds)
                + f" | {fmt(r['acc_last10_mean'])} | {fmt(r['acc_best'])} ({','.join(map(str, r['best_round']))}) | "
                f"{'-' if gap is None else f'{gap:.1f}'} | {r['s_per_round_median']:.2f} | "
                f"{(r['bytes_up_per_round'] + r['bytes_down_per_round']) / 1e6:.1f} |"
            )
        lines += [
            f"| centralized ({args.centralized_epochs} epochs) | {','.join(map(str, central))} | "
            + " | " * len(report_rounds)
            + f"{fmt(central_acc)} | | | | |",
            "| majority class | | "
            + " | " * len(report_rounds)
            + f"{majority * 100:.1f} | | | | |",
            "",
        ]
        (args.out / f"{args.name}.md").write_text("\n".join(lines))
        plot(runs, central_acc, majority, args.out / f"{args.name}.png")
        print("\n".join(lines))
        return 0

    lines = [
        f"# FEMNIST (201 writers, natural split): baselines, seeds {args.seeds}",
        "",
        f"Test accuracy (%) of the global model on all writers' held-out test data, mean ± sd over seeds. "
        f"Centralized: same model trained {args.centralized_epochs} epochs on the pooled training data. "
        f"Generated by `bench/femnist_baselines.py --seeds {' '.join(map(str, args.seeds))} --rounds {args.rounds}`.",
        "",
        f"| strategy | seeds | acc @ round {default_rounds} | acc @ round {args.rounds} | / centralized | s / round (mean, median) | MB up / round | MB down / round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['strategy']} | {','.join(map(str, r['seeds']))} | {fmt(r[f'acc_round_{default_rounds}'])} | {fmt(r[f'acc_round_{args.rounds}'])} | "
            f"{r['ratio_to_centralized_end']:.3f} | {r['s_per_round_mean']:.2f}, {r['s_per_round_median']:.2f} | "
            f"{r['bytes_up_per_round'] / 1e6:.1f} | {r['bytes_down_per_round'] / 1e6:.1f} |"
        )
    lines += [
        f"| centralized ({args.centralized_epochs} epochs) | {','.join(map(str, central))} | | {fmt(central_acc)} | 1.000 | | | |",
        f"| majority class | | | {majority * 100:.1f} | | | | |",
        "",
    ]
    (args.out / f"{args.name}.md").write_text("\n".join(lines))
    plot(runs, central_acc, majority, args.out / f"{args.name}.png")
    print("\n".join(lines))
    return 0


def plot(runs: dict, central_acc: list[float], majority: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for strategy, by_seed in runs.items():
        curves = np.array([[x["test_accuracy"] for x in r["rounds"]] for r in by_seed.values()])
        rounds = np.arange(curves.shape[1])
        ax.plot(rounds, curves.mean(0), label=f"{strategy} (mean of {len(curves)} seeds)")
        ax.fill_between(rounds, curves.min(0), curves.max(0), alpha=0.2)
    ax.axhline(np.mean(central_acc), color="k", ls="--", label="centralized")
    ax.axhline(majority, color="grey", ls=":", label="majority class")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title("FEMNIST, 201 writers, natural split")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
