"""Behaviour digest: run a fixed set of small jobs through the in-process engine and write every
number they produce (per round and per client, minus wall-clock times) and a hash of each final
model, so that a refactor can be checked to change nothing.

    .venv/bin/python bench/behaviour_digest.py --out /tmp/after.json            # this checkout
    .venv/bin/python bench/behaviour_digest.py --compare /tmp/before.json /tmp/after.json

To digest another checkout (e.g. the commit before a refactor), run the script from that
checkout's root with the same virtual environment: `cd ../other && python bench/...`; the
jobs import the code of the folder they run in (`python -m fedapp.cli.inline` with that cwd).

Each job runs in its own single-threaded subprocess (as the benchmarks do), `--jobs` at a time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CREDIT = (
    "task=credit partition=iid partition.num_partitions=6 rounds=3 clients_per_round=4 "
    "eval_clients_per_round=2 train.local_epochs=1"
)
HETERO = (
    "task=credit partition=iid partition.num_partitions=9 rounds=3 clients_per_round=4 "
    "eval_clients_per_round=0 train.local_epochs=1 hetero=both"
)
FEMNIST = (
    "task=femnist partition=dirichlet partition.alpha=0.5 partition.num_partitions=8 rounds=2 "
    "clients_per_round=4 eval_clients_per_round=2 train.max_steps=8"
)
MEDICAL = "task=medical rounds=2 clients_per_round=4 eval_clients_per_round=4"

JOBS: dict[str, str] = {
    **{
        f"credit-{s}": f"{CREDIT} strategy={s}"
        for s in (
            "fedavg",
            "fedprox",
            "qfedavg",
            "fedmedian",
            "fedtrimmedavg",
            "krum",
            "multikrum",
            "trust",
            "fednova",
            "scaffold",
        )
    },
    "credit-bulyan": f"{CREDIT} strategy=bulyan clients_per_round=6 attack=scaled attack.fraction=0.2",
    "credit-contribution": f"{CREDIT} strategy=contribution server_val_fraction=0.1",
    "credit-contribution-nova": (
        f"{CREDIT} strategy=contribution strategy.normalize_steps=true "
        "strategy.local.distill_weight=0.5 partition=size_skew partition.num_partitions=6"
    ),
    "credit-trust-label_flip": f"{CREDIT} strategy=trust attack=label_flip attack.fraction=0.34",
    "credit-trust-gaussian": f"{CREDIT} strategy=trust attack=gaussian attack.fraction=0.34",
    "credit-fedavg-scaled": f"{CREDIT} strategy=fedavg attack=scaled attack.fraction=0.34",
    "credit-trust-stale": (
        f"{CREDIT} strategy=trust attack=free_rider attack.mode=stale attack.fraction=0.34"
    ),
    "credit-scaffold-crash": (
        f"{CREDIT} strategy=scaffold attack=crash attack.mode=exception attack.fraction=0.34 "
        "attack.probability=0.5"
    ),
    "credit-fedmedian-nan": f"{CREDIT} strategy=fedmedian attack=crash attack.mode=nan attack.fraction=0.2",
    "hetero-fedavg": f"{HETERO} strategy=fedavg",
    "hetero-fedavg_deadline": f"{HETERO} strategy=fedavg_deadline strategy.deadline_s=20",
    "hetero-fedasync": f"{HETERO} strategy=fedasync",
    "hetero-tifl": f"{HETERO} strategy=tifl",
    "hetero-tiered": f"{HETERO} strategy=tiered rounds=4",
    "hetero-tiered-drop": f"{HETERO} strategy=tiered strategy.late_policy=drop hetero=compute",
    "femnist-fedavg": f"{FEMNIST} strategy=fedavg",
    "femnist-scaffold": f"{FEMNIST} strategy=scaffold",
    "femnist-contribution-ntd": (
        f"{FEMNIST} strategy=contribution server_val_fraction=0.1 "
        "strategy.local.distill_weight=0.5 strategy.local.distill_not_true=1"
    ),
    "medical-contribution": f"{MEDICAL} strategy=contribution server_val_fraction=0.1",
    "medical-trust-flip": f"{MEDICAL} strategy=trust attack=label_flip attack.fraction=0.25",
    # what Architecture II moves (issue 32): compression codecs, DP (seeded test mode, see
    # SEEDED), rare-class augmentation, strategy=synthetic, MOON, mixed precision
    **{
        f"credit-fedavg-{c}": f"{CREDIT} strategy=fedavg compression={c}"
        for c in ("fp16", "int8", "topk")
    },
    "credit-scaffold-topk": f"{CREDIT} strategy=scaffold compression=topk",
    "credit-sample_dp": f"{CREDIT} strategy=fedavg privacy=sample_dp privacy.target_epsilon=3",
    "medical-contribution-sample_dp": (
        f"{MEDICAL} strategy=contribution server_val_fraction=0.1 privacy=sample_dp "
        "privacy.target_epsilon=3 privacy.levels={cleveland:1.5}"
    ),
    "credit-central_dp": (
        f"{CREDIT} strategy=fedavg privacy=central_dp privacy.noise_multiplier=1 "
        "privacy.target_epsilon=50"
    ),
    "credit-augment": (
        f"{CREDIT} strategy=fedavg augment=rare_class augment.generator.rounds=1 "
        "augment.generator.epochs=1"
    ),
    "credit-synthetic-hybrid": (
        f"{CREDIT} strategy=synthetic strategy.mode=hybrid strategy.generator.rounds=1 "
        "strategy.generator.epochs=1 strategy.generator.finetune_epochs=1"
    ),
    # strategy=synthetic under sample_dp does not repeat bit for bit even with seeded noise
    # (the last digits of the final model differ between two runs of one commit): not here
    "femnist-moon": f"{FEMNIST} strategy=moon",
    "credit-bf16": f"{CREDIT} strategy=fedprox train.precision=bf16",
}
# DP jobs run in the seeded-noise test mode (tasks.dp_sgd.SEEDED_NOISE_ENV): real DP noise is
# secret, so two runs differ by design; seeded, everything else about them must repeat.
SEEDED = {k for k, v in JOBS.items() if "privacy=" in v}
# Wall-clock numbers differ from run to run; everything else must not.
VOLATILE_ROUND = {"wall_s", "elapsed_s", "aggregate_s"}
VOLATILE_CLIENT = {"train_time_s", "crypto_s"}
VOLATILE_FINAL = {"total_wall_s", "mean_round_s", "wall_s", "elapsed_s", "aggregate_s"}
# timings found at any depth (evaluation, the server's training on synthetic rows)
VOLATILE_ANY = {"eval_time_s", "server_eval_s", "server_train_s"}


def digest_run(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    hetero_virtual = (res.get("meta") or {}).get("clock") == "virtual"
    rounds = []
    for r in res["rounds"]:
        row = {k: v for k, v in r.items() if k not in VOLATILE_ROUND and k != "clients"}
        if not hetero_virtual:
            row.pop("sim_time_s", None)  # wall time without a virtual clock
        row["clients"] = [
            {k: _first_line(v) for k, v in c.items() if k not in VOLATILE_CLIENT}
            for c in r["clients"]
        ]
        if hetero_virtual:  # the virtual clock's replies carry simulated (deterministic) times
            for c, raw in zip(row["clients"], r["clients"], strict=True):
                if "train_time_s" in raw:
                    c["train_time_s"] = raw["train_time_s"]
        rounds.append(row)
    final = {k: v for k, v in (res.get("final") or {}).items() if k not in VOLATILE_FINAL}
    if not hetero_virtual:
        for k in ("sim_time_s", "total_sim_time_s"):
            final.pop(k, None)
    model = out / "final_model.pt"
    sha = hashlib.sha256(model.read_bytes()).hexdigest() if model.exists() else None
    meta = res.get("meta") or {}
    return {
        "rounds": rounds,
        "final": final,
        "final_model_sha256": _tensor_hash(model) if model.exists() else sha,
        "attackers": meta.get("attackers"),
        "status": meta.get("status"),
    }


def _first_line(value):
    """Error statuses carry a traceback whose file paths differ between checkouts."""
    return value.split("\n")[0] if isinstance(value, str) else value


def _tensor_hash(path: Path) -> str:
    """Hash of the tensors' values (torch.save's zip container is not byte-stable)."""
    import torch

    state = torch.load(path, map_location="cpu")
    h = hashlib.sha256()
    for k in state:
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def run_job(name: str, overrides: str, root: Path, work: Path) -> tuple[str, dict]:
    out = work / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if name in SEEDED:
        env["FEDAPP_INSECURE_SEEDED_DP_NOISE"] = "1"
    log = work / f"{name}.log"
    with log.open("w") as fh:
        rc = subprocess.call(
            [
                sys.executable,
                "-m",
                "fedapp.cli.inline",
                *overrides.split(),
                "--output-dir",
                str(out),
            ],
            cwd=root,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    if rc != 0:
        return name, {"error": f"exit code {rc}; see {log}"}
    return name, digest_run(out)


def compare(a: dict, b: dict) -> list[str]:
    """Differences between two digests, as readable lines (empty: identical)."""
    lines = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            lines.append(f"{name}: only in {'second' if name not in a else 'first'}")
            continue
        diffs = _diff(a[name], b[name], name)
        lines.extend(diffs[:20])
        if len(diffs) > 20:
            lines.append(f"{name}: ... {len(diffs) - 20} more")
    return lines


def _diff(x, y, path: str) -> list[str]:
    if isinstance(x, dict) and isinstance(y, dict):
        out = []
        for k in sorted(set(x) | set(y), key=str):
            if k in VOLATILE_ANY:
                continue
            if k not in x:
                out.append(f"{path}.{k}: added ({_short(y[k])})")
            elif k not in y:
                out.append(f"{path}.{k}: removed (was {_short(x[k])})")
            else:
                out.extend(_diff(x[k], y[k], f"{path}.{k}"))
        return out
    if isinstance(x, list) and isinstance(y, list):
        if len(x) != len(y):
            return [f"{path}: length {len(x)} -> {len(y)}"]
        out = []
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            out.extend(_diff(u, v, f"{path}[{i}]"))
        return out
    return [] if x == y else [f"{path}: {_short(x)} -> {_short(y)}"]


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) < 80 else s[:77] + "..."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the digest here")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="job names (default: all)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        diffs = compare(before, after)
        # results.json only ever gains keys: an added key is reported, and is not a change
        added = [d for d in diffs if ": added (" in d]
        changed = [d for d in diffs if ": added (" not in d]
        print("\n".join(changed) if changed else f"identical: {len(before)} jobs")
        if added:
            keys = sorted({d.split(": added")[0].split(".", 1)[1] for d in added})
            print(f"{len(added)} values of keys added since BEFORE: {', '.join(keys)}")
        return 1 if changed else 0
    if not args.out:
        parser.error("--out or --compare is required")
    root = Path.cwd()
    jobs = {k: v for k, v in JOBS.items() if not args.only or k in args.only}
    work = Path(tempfile.mkdtemp(prefix="fedapp-digest-"))
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(pool.map(lambda kv: run_job(*kv, root, work), jobs.items()))
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True))
    failed = [k for k, v in results.items() if "error" in v]
    print(f"{len(results) - len(failed)} jobs digested into {args.out}; runs in {work}")
    for k in failed:
        print(f"  {k}: {results[k]['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
