"""attack=inflate: clients that train honestly but claim 1e12 examples, against the default caps
on claimed examples (strategies/claims.py), for FedAvg, trust and contribution.

Credit default (UCI Taiwan), 20 IID clients, all of them every round, 10/20/30% attackers,
3 seeds, `--rounds` rounds, in-process engine (`fedapp.cli.inline`), one single-threaded CPU run per
job. For each cell: the attackers' weight share (per round, summed over the attackers; the
criterion: at most twice their head count), whether the run completed, the final ROC-AUC next
to the same strategy's run without attackers; the same attack with the caps switched off
(`claims.stats_slack=0 claims.max_examples_ratio=0`, seed 0: what the caps prevent); an
honest natural split (credit's 7 natural clients, largest 49.5x the median) with the caps on
and off (identical results expected: honest claims equal their statistics counts); and the
cost of the checks per round (the screening of types, ranges and layouts plus the caps,
timed on 20 replies of the credit model and of the FEMNIST CNN).

    .venv/bin/python bench/inflate.py --jobs 2            # ~15 min on 2 cores
    .venv/bin/python bench/inflate.py --summarize-only

Writes bench/results/inflate.{json,md}; runs stay under bench/results/runs/inflate/ (ignored).
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

STRATEGIES = ["fedavg", "trust", "contribution"]
FRACTIONS = [0.1, 0.2, 0.3]
CLIENTS = 20
BASE = [
    "task=credit",
    "partition=iid",
    f"partition.num_partitions={CLIENTS}",
    f"clients_per_round={CLIENTS}",
    "eval_clients_per_round=0",
    "checkpoint=false",
]
NATURAL = ["task=credit", "partition=natural", "clients_per_round=7", "eval_clients_per_round=7"]
NATURAL += ["checkpoint=false"]
OFF = ["claims.stats_slack=0", "claims.max_examples_ratio=0"]  # the caps switched off
METRIC = "test_roc_auc"


def plan(args) -> list[tuple[str, list[str]]]:
    """(run name, overrides) of every run."""
    jobs = []
    rounds = f"rounds={args.rounds}"
    for strategy in args.strategies:
        for seed in args.seeds:
            common = [*BASE, rounds, f"strategy={strategy}", f"seed={seed}"]
            jobs.append((f"clean-{strategy}-s{seed}", common))
            for frac in args.fractions:
                attack = ["attack=inflate", f"attack.fraction={frac}"]
                jobs.append((f"inflate{frac:g}-{strategy}-s{seed}", [*common, *attack]))
                if seed == args.seeds[0]:
                    jobs.append(
                        (f"inflate{frac:g}-{strategy}-off-s{seed}", [*common, *attack, *OFF])
                    )
            natural = [*NATURAL, rounds, f"strategy={strategy}", f"seed={seed}"]
            jobs.append((f"natural-{strategy}-s{seed}", natural))
            jobs.append((f"natural-{strategy}-off-s{seed}", [*natural, *OFF]))
    return jobs


def execute(args, jobs) -> None:
    runs = args.out / "runs" / "inflate"
    runs.mkdir(parents=True, exist_ok=True)
    todo = [
        (name, ovr)
        for name, ovr in jobs
        if not (args.reuse and completed(runs / name / "results.json", args.rounds))
    ]
    print(
        f"[bench] {len(jobs)} runs planned, {len(todo)} to run, {args.jobs} at a time", flush=True
    )

    def work(item):
        name, ovr = item
        out = runs / name
        out.mkdir(parents=True, exist_ok=True)
        return name, run_inline_job(ovr, out, out / "inline.log", ROOT)

    run_pool(todo, args.jobs, work)


def _load(path: Path) -> dict | None:
    if not path.exists():
        return None
    return json.loads(path.read_text())


def summarize_runs(args, jobs) -> dict:
    runs = args.out / "runs" / "inflate"
    cells: dict[str, dict] = {}
    for name, _ in jobs:
        res = _load(runs / name / "results.json")
        if res is None:
            continue
        key = name.rsplit("-s", 1)[0]
        cell = cells.setdefault(key, {"runs": []})
        rounds = res.get("rounds") or []
        trained = [r for r in rounds if r.get("round", 0) >= 1]
        weights = [r.get("attacker_weight") for r in trained]
        attackers = res["meta"].get("attackers") or []
        capped = sum(
            1
            for r in trained
            for c in r.get("clients", [])
            if c.get("phase") == "train" and "num_examples_claimed" in c
        )
        cell["runs"].append(
            {
                "seed": int(res["config"]["seed"]),
                "status": res["meta"].get("status"),
                "rounds_completed": len(trained),
                "final": (res.get("final") or {}).get(METRIC),
                "attackers": attackers,
                "head_share": len(attackers) / max(int(res["meta"].get("num_clients") or 1), 1),
                "attacker_weight_by_round": weights,
                "max_attacker_weight": max((w for w in weights if w is not None), default=None),
                "mean_attacker_weight": (
                    float(np.mean([w for w in weights if w is not None]))
                    if any(w is not None for w in weights)
                    else None
                ),
                "claims_capped": capped,
                "aggregate_s": [r.get("aggregate_s") for r in trained],
                "wall_s": [r.get("wall_s") for r in trained],
            }
        )
    return cells


def check_cost(repeats: int = 20) -> dict:
    """Seconds per round of the checks, on 20 accepted replies: the metric screening (types,
    ranges, forms, list lengths), the decoded-layout check of the arrays and the claim caps;
    and the whole screening of the round for scale."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

    from fedapp.core.config import compose
    from fedapp.core.flower_compat import set_task_identity
    from strategies import build_strategy
    from strategies.base import decoded_layout_refusal, reply_metrics
    from strategies.claims import ClaimPolicy
    from strategies.screening import list_length_refusals, metrics_refusal

    class Nodes:  # the connected clients, for configure_train
        def __init__(self, ids):
            self.ids = list(ids)

        def get_node_ids(self):
            return list(self.ids)

    def reply(node, arrays, metrics):
        set_task_identity(run_id=1, task_id=1, node_id=0)
        sent = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
        set_task_identity(node_id=node)
        content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)})
        out = Message(content, reply_to=sent)
        set_task_identity(node_id=0)
        return out

    out = {}
    models = {"credit": _credit_model(), "femnist": _femnist_model()}
    for name, state in models.items():
        arrays = [v.numpy() for v in state.values()]
        cfg = compose(f"strategy=fedavg clients_per_round={CLIENTS}")
        s = build_strategy(cfg, num_nodes=CLIENTS)
        nodes = list(range(100, 100 + CLIENTS))
        s.bind({n: p for p, n in enumerate(nodes)}, seed=0)
        s.bind_claims(ClaimPolicy(), {p: 1000.0 for p in range(CLIENTS)})
        g = ArrayRecord([np.zeros_like(a) for a in arrays])
        metrics = {
            "num-examples": 1000,
            "train_loss": 0.5,
            "train_steps": 100.0,
            "train_time_s": 1.0,
            "label-counts": [700, 300],
        }
        replies = [reply(n, arrays, metrics) for n in nodes]
        list(s.configure_train(1, g, ConfigRecord({}), Nodes(nodes)))
        t = {"metrics": 0.0, "layout": 0.0, "caps": 0.0, "screen_replies": 0.0}
        for _ in range(repeats):
            t0 = time.perf_counter()
            for m in replies:
                metrics_refusal(reply_metrics(m))
            list_length_refusals([reply_metrics(m) for m in replies])
            t1 = time.perf_counter()
            for m in replies:
                decoded_layout_refusal(m.content["arrays"])
            t2 = time.perf_counter()
            rec = s.round_log(1)
            s.cap_claims(rec, replies, "train")
            t3 = time.perf_counter()
            s.rounds.clear()
            s.screen_replies(1, replies, "train")
            t4 = time.perf_counter()
            t["metrics"] += t1 - t0
            t["layout"] += t2 - t1
            t["caps"] += t3 - t2
            t["screen_replies"] += t4 - t3
        out[name] = {
            "parameters": int(sum(a.size for a in arrays)),
            "replies": CLIENTS,
            **{f"{k}_s": v / repeats for k, v in t.items()},
        }
    return out


def _credit_model():
    from fedapp.core.config import compose
    from tasks import get_task

    task = get_task(compose("task=credit partition=iid partition.num_partitions=20"), _data_dir())
    return _arrays(task.make_model().state_dict())


def _femnist_model():
    from tasks.models import MODELS

    return _arrays(MODELS["cnn_small"](62).state_dict())  # the FEMNIST runs' model


def _arrays(state):
    from flwr.app import ArrayRecord

    return ArrayRecord(state)


def _data_dir():
    from fedapp.core.config import compose, resolve_data_dir

    return resolve_data_dir(compose(""), {})


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def write_report(args, cells: dict, cost: dict | None) -> dict:
    summary = {"rounds": args.rounds, "seeds": args.seeds, "cells": cells, "check_cost": cost}
    (args.out / "inflate.json").write_text(json.dumps(summary, indent=1))
    lines = [
        "# attack=inflate: claimed examples against the default caps",
        "",
        f"`bench/inflate.py`: credit (UCI Taiwan), {CLIENTS} IID clients, all of them every "
        f"round, {args.rounds} rounds, seeds {args.seeds}, in-process engine, CPU. Attackers "
        "train honestly and claim 1e12 examples (label histogram scaled to match). `w`: the "
        "attackers' total aggregation weight, mean over rounds / largest round (criterion: at "
        "most twice their head count); ROC-AUC of the final model on the server test set "
        "(mean ± sd over seeds) next to the same strategy's run without attackers; "
        "`completed`: runs whose results.json says completed. The `caps off` row: the same "
        "attack with `claims.stats_slack=0 claims.max_examples_ratio=0` (seed "
        f"{args.seeds[0]}).",
        "",
        "| strategy | attackers | head share | w mean / max (caps on) | ROC-AUC (caps on) | "
        "ROC-AUC without attack | completed | w mean (caps off) | ROC-AUC (caps off) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for strategy in args.strategies:
        clean = cells.get(f"clean-{strategy}", {"runs": []})["runs"]
        clean_auc = fmt_mean_sd([r["final"] for r in clean])
        for frac in args.fractions:
            on = cells.get(f"inflate{frac:g}-{strategy}", {"runs": []})["runs"]
            off = cells.get(f"inflate{frac:g}-{strategy}-off", {"runs": []})["runs"]
            if not on:
                continue
            head = _mean([r["head_share"] for r in on])
            wmean = _mean([r["mean_attacker_weight"] for r in on])
            wmax = max((r["max_attacker_weight"] or 0.0) for r in on)
            ok = sum(r["status"] == "completed" for r in on)
            within = wmax <= 2 * head + 1e-9
            verdicts.append(within)
            lines.append(
                f"| {strategy} | {frac:.0%} ({len(on[0]['attackers'])}) | {head:.2f} | "
                f"{wmean:.3f} / {wmax:.3f}{'' if within else ' **over 2x**'} | "
                f"{fmt_mean_sd([r['final'] for r in on])} | {clean_auc} | {ok}/{len(on)} | "
                f"{_fmt(_mean([r['mean_attacker_weight'] for r in off]))} | "
                f"{fmt_mean_sd([r['final'] for r in off])} |"
            )
    lines += [
        "",
        f"Every cell within twice the attackers' head count: {all(verdicts) if verdicts else '-'}.",
        "",
        "## An honest natural split, caps on and off",
        "",
        "Credit's natural split (7 clients by education level; the largest holds 47% of the rows, "
        "49.5x the median). Honest claims equal the clients' statistics counts, so the caps "
        "never bind: the runs should be identical.",
        "",
        "| strategy | ROC-AUC caps on | ROC-AUC caps off | identical per seed | claims capped |",
        "|---|---|---|---|---|",
    ]
    for strategy in args.strategies:
        on = cells.get(f"natural-{strategy}", {"runs": []})["runs"]
        off = cells.get(f"natural-{strategy}-off", {"runs": []})["runs"]
        if not on:
            continue
        by_seed = {r["seed"]: r["final"] for r in off}
        same = all(by_seed.get(r["seed"]) == r["final"] for r in on) and len(on) == len(off)
        lines.append(
            f"| {strategy} | {fmt_mean_sd([r['final'] for r in on], 4)} | "
            f"{fmt_mean_sd([r['final'] for r in off], 4)} | {same} | "
            f"{sum(r['claims_capped'] for r in on)} |"
        )
    if cost:
        lines += [
            "",
            "## Cost of the checks per round",
            "",
            f"{CLIENTS} accepted training replies, mean of 20 repetitions on this machine. "
            "`metrics`: types, ranges and forms of every reply metric and the list lengths; "
            "`layout`: every array decoded and compared with its header; `caps`: the claim "
            "caps; `screen_replies`: the whole screening of the round (all checks, as a run "
            "does it), for scale. A credit round of these runs takes "
            f"{_fmt(_round_wall(cells))} s of wall time.",
            "",
            "| model | parameters | metrics (ms) | layout (ms) | caps (ms) | "
            "whole screening (ms) |",
            "|---|---|---|---|---|---|",
        ]
        for name, c in cost.items():
            lines.append(
                f"| {name} | {c['parameters']:,} | {1e3 * c['metrics_s']:.2f} | "
                f"{1e3 * c['layout_s']:.2f} | {1e3 * c['caps_s']:.2f} | "
                f"{1e3 * c['screen_replies_s']:.2f} |"
            )
    (args.out / "inflate.md").write_text("\n".join(lines) + "\n")
    return summary


def _round_wall(cells) -> float | None:
    walls = [
        w
        for key, c in cells.items()
        if key.startswith("inflate")
        for r in c["runs"]
        for w in r["wall_s"]
        if w is not None
    ]
    return float(np.median(walls)) if walls else None


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategies", nargs="+", default=STRATEGIES)
    p.add_argument("--fractions", type=float, nargs="+", default=FRACTIONS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--reuse", action="store_true", help="skip runs already completed")
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument("--no-cost", action="store_true", help="skip the timing of the checks")
    args = p.parse_args()
    jobs = plan(args)
    if not args.summarize_only:
        execute(args, jobs)
    cost = None if args.no_cost else check_cost()
    write_report(args, summarize_runs(args, jobs), cost)
    print(f"[bench] wrote {args.out / 'inflate.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
