"""Server-side aggregation time per round for each strategy (no Flower run needed).

Builds `--clients` replies carrying a model of the chosen task (default: FEMNIST cnn_small,
1.18 M parameters) and times `strategy.aggregate_train`, including fedapp's reply screening.
With `--attackers K` the first K clients are declared attackers, so the robust aggregators also
compute the per-client shares they report as `attacker_weight` (what a robustness run pays).

    .venv/bin/python bench/aggregation_speed.py --clients 20 --repeats 3

Writes bench/results/aggregation_speed.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedapp.core.flower_compat import set_task_identity

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from fedapp.checks import compose  # noqa: E402
from strategies import build_strategy  # noqa: E402
from tasks.models import MODELS  # noqa: E402

DEFAULT_STRATEGIES = (
    "fedavg",
    "fedprox",
    "qfedavg",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
    "bulyan",
    "trust",
)


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def time_strategy(
    name: str, clients: int, model: str, repeats: int, attackers: int = 0
) -> list[float]:
    set_task_identity(run_id=1, task_id=1, node_id=0)
    state = MODELS[model](62).state_dict()
    global_arrays = ArrayRecord(state)
    nodes = list(range(1000, 1000 + clients))
    rng = np.random.default_rng(0)
    times = []
    for _ in range(repeats):
        strategy = build_strategy(compose(f"strategy={name} clients_per_round={clients}"), clients)
        strategy.bind({n: i for i, n in enumerate(nodes)}, seed=0, attackers=range(attackers))
        msgs = list(strategy.configure_train(1, global_arrays, ConfigRecord({}), _Grid(nodes)))
        replies = []
        for msg in msgs:
            set_task_identity(node_id=msg.metadata.dst_node_id)
            arrays = ArrayRecord(
                {
                    k: Array(v + 0.01 * rng.standard_normal(v.shape).astype(v.dtype))
                    for k, v in ((k, a.numpy()) for k, a in global_arrays.items())
                }
            )
            metrics = MetricRecord({"num-examples": 100, "train_loss": 2.0})
            replies.append(
                Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
            )
        t0 = time.perf_counter()
        strategy.aggregate_train(1, replies)
        times.append(time.perf_counter() - t0)
    assert msgs and msgs[0].metadata.message_type == MessageType.TRAIN
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--model", default="cnn_small")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES))
    p.add_argument("--attackers", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args()
    results = {}
    for name in args.strategies:
        t = time_strategy(name, args.clients, args.model, args.repeats, args.attackers)
        results[name] = {"median_s": float(np.median(t)), "all_s": t}
        print(
            f"{name:8s} aggregate_train, {args.clients} clients x {args.model}: median {np.median(t):.3f} s"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = f"_attackers{args.attackers}" if args.attackers else ""
    (args.out / f"aggregation_speed{suffix}.json").write_text(
        json.dumps(
            {
                "clients": args.clients,
                "model": args.model,
                "repeats": args.repeats,
                "attackers": args.attackers,
                "strategies": results,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
