"""What the trust boundary costs (issue 30): the node-side checks of every message, and the
floating-point-attack mitigation of DP-SGD's noise (Opacus' `secure_mode`: four summed draws).

    .venv/bin/python bench/trust_boundary.py            # ~2 min on 2 CPU cores
    .venv/bin/python bench/trust_boundary.py --device cuda

Writes bench/results/trust_boundary.{json,md}:
- checks: microseconds per message of what a ClientApp does before any work (parse and
  screen the server's overrides, read its policy, check the composed config against it,
  check the lineage), uncached, against a round of local training on the medical task;
- noise: seconds per DP-SGD local step with and without the mitigation (same model, batch,
  steps; median of repeats), FEMNIST's cnn_small (1.2 M parameters) and the tabular MLP.
Needs PyTorch and Opacus; the checks part also needs fedapp's config (Hydra, OmegaConf).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasks.dp_sgd import DPSGDHook  # noqa: E402
from tasks.models import MODELS  # noqa: E402
from tasks.tabular import MLP  # noqa: E402
from tasks.training import TrainSettings, train_classifier  # noqa: E402

OVERRIDES = (
    "task=medical strategy=fedprox rounds=20 clients_per_round=4 privacy=sample_dp "
    "privacy.target_epsilon=3 train.lr=0.05 data_dir=/srv/x output_dir=/srv/y "
    "hydra.searchpath=[file:///srv/z] task.client_val_fraction=0.5"
)


def checks(repeats: int) -> dict:
    from fedapp.core.config import compose
    from fedapp.core.policy import NodePolicy, check_lineage, client_overrides

    node = {
        "data-path": "/data/h.csv",
        "max-epsilon": 3,
        "require-secure": "false",
        "accept-tasks": "medical",
        "ledger-dir": "/var/lib/fedapp",
    }
    cfg = compose(client_overrides(OVERRIDES))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        client_overrides(OVERRIDES)
        policy = NodePolicy.from_node_config(node)
        policy.enforce(cfg)
        check_lineage("0123456789ab")
        times.append(time.perf_counter() - t0)
    return {"per_message_us": statistics.median(times) * 1e6, "repeats": repeats}


def noise(device: str, steps: int, repeats: int) -> list[dict]:
    out = []
    g = torch.Generator().manual_seed(0)
    cases = [
        (
            "cnn_small",
            62,
            10,
            TensorDataset(
                torch.rand(2000, 1, 28, 28, generator=g), torch.randint(0, 62, (2000,), generator=g)
            ),
        ),
        (
            "mlp",
            2,
            32,
            TensorDataset(
                torch.rand(4000, 30, generator=g), torch.randint(0, 2, (4000,), generator=g)
            ),
        ),
    ]
    for name, classes, batch, data in cases:
        row = {"model": name, "batch": batch, "steps": steps, "device": device}
        walls_of = {False: [], True: []}
        # plain and mitigated alternate within each repeat (the first repeat warms up), so a
        # load that comes and goes on the machine falls on both alike
        for rep in range(repeats + 1):
            for secure in (False, True):
                walls = walls_of[secure]
                torch.manual_seed(rep)
                model = (
                    MODELS[name](classes)
                    if name == "cnn_small"
                    else MLP(30, [64, 32], classes, 0.0)
                )
                hook = DPSGDHook(1.0, 1.0, rep, secure_noise=secure)
                work = TrainSettings(
                    local_epochs=1000, max_steps=steps, batch_size=batch, lr=0.01, seed=rep
                )
                t0 = time.perf_counter()
                train_classifier(model, data, work, device=torch.device(device), hooks=[hook])
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if rep:
                    walls.append((time.perf_counter() - t0) / steps)
        for secure, walls in walls_of.items():
            row["secure" if secure else "plain"] = statistics.median(walls)
        row["overhead"] = row["secure"] / row["plain"] - 1
        out.append(row)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--skip-checks", action="store_true", help="noise only (no fedapp config)")
    args = p.parse_args(argv)
    result: dict = {"noise": noise(args.device, args.steps, args.repeats)}
    if not args.skip_checks:
        result["checks"] = checks(200)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else f"_{args.device.replace(':', '')}"
    (args.out / f"trust_boundary{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Trust boundary: cost", "", "`.venv/bin/python bench/trust_boundary.py`", ""]
    if "checks" in result:
        lines += [
            f"Node-side checks per message: {result['checks']['per_message_us']:.0f} µs "
            "(median of 200; parse and screen the overrides, policy, lineage).",
            "",
        ]
    lines += [
        "| model | device | batch | s/step plain | s/step mitigated | overhead |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["noise"]:
        lines.append(
            f"| {r['model']} | {r['device']} | {r['batch']} | {r['plain']:.4f} | "
            f"{r['secure']:.4f} | {100 * r['overhead']:+.0f}% |"
        )
    (args.out / f"trust_boundary{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
