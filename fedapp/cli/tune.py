"""Privacy-accounted hyperparameter search over the federation: `fedapp-tune`.

Tuning spends privacy: every trial trains on the clients' rows, and the choice of the best
trial depends on them. `fedapp-tune` runs Papernot and Steinke's random search with a random
number of trials ("Hyperparameter Tuning with Renyi Differential Privacy", ICLR 2022): the
number of trials K is drawn from a Poisson distribution of mean `--mean-trials` (from OS
entropy, never from the run seed), each trial draws its settings uniformly from the search
space (`--space KEY=V1,V2,...`, e.g. `train.lr`, `privacy.max_grad_norm`, `train.batch_size`,
`train.local_epochs`) and is one inline run of the federation under `privacy=sample_dp` at a
per-trial epsilon, and only the best trial is released. The total epsilon of each client
including the search is the Renyi DP of repeat-and-select (their Theorem 6, Poisson case, as
`dp_accounting`'s `RepeatAndSelectDpEvent` computes it) over the RDP of one trial: the
statistics release composed with the client's DP-SGD, at every Renyi order the largest over
every setting the space can draw (a trial is a mixture over settings). The per-trial epsilon
is chosen, by bisection, as the largest whose total meets `--target-epsilon` for every client.

Selection reads validation metrics only: the final round's federated evaluation on the
clients' validation rows (`client_loss`, or `--metric`, a `client_*` key); the tuner never
reads a test metric (`validation_score`). Those validation metrics are, as in every run,
outside the DP guarantee (results.json `meta.privacy.outside`): the total epsilon covers the
clients' training rows.

What the total covers (`SCOPE`, also in tune.json): the released best trial, against anyone
who sees only it. The server running the search sees every trial's updates; against it the
cost is the composition of the trials run. The output folder holds every trial.

Writes OUTPUT_DIR/tune.json (every trial, its validation score, the choice, the epsilons) and
OUTPUT_DIR/best_overrides.txt, the chosen settings as Hydra overrides, one a line:
`fedapp-run $(cat OUTPUT_DIR/best_overrides.txt)` runs them (a new run spends its per-trial
epsilon again; the chosen trial's own model is in its run folder, already paid for).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import secrets
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedapp.checks import compose
from fedapp.core import seeds
from fedapp.core.config import ConfigError, parse_overrides, resolve_data_dir
from fedapp.features.audit import planned_history
from fedapp.features.privacy import DEFAULT_ORDERS, PrivacySpec
from tasks import DataError, get_task
from tasks.dp_sgd import opacus

DEFAULT_SPACE = {
    "train.lr": ["0.02", "0.05", "0.1", "0.2"],
    "privacy.max_grad_norm": ["0.5", "1.0", "2.0"],
    "train.batch_size": ["32", "64", "128"],
    "train.local_epochs": ["1", "2"],
}
ORDERS = [float(a) for a in DEFAULT_ORDERS]


# -- accounting (pure functions) ---------------------------------------------------------------------
def repeat_and_select_rdp(orders: Sequence[float], rdp: Sequence[float], mean: float) -> np.ndarray:
    """RDP of running a mechanism K ~ Poisson(`mean`) times and releasing only the best run:
    Papernot and Steinke (ICLR 2022), Theorem 6: rdp(l) + mean * delta_hat + log(mean) / (l - 1),
    delta_hat the mechanism's delta at epsilon_hat = log(1 + 1 / (l - 1)); as
    dp_accounting's RdpAccountant computes `RepeatAndSelectDpEvent(event, mean, inf)`."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_delta

    if not mean >= 1:
        raise ValueError(f"mean={mean}: the mean number of trials must be at least 1")
    orders, rdp = np.asarray(orders, dtype=float), np.asarray(rdp, dtype=float)
    out = np.full_like(orders, np.inf)
    for i, order in enumerate(orders):
        if order <= 1:
            continue
        delta_hat, _ = compute_delta(orders, rdp, math.log1p(1 / (order - 1)))
        out[i] = rdp[i] + mean * delta_hat + math.log(mean) / (order - 1)
    return out


def rdp_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float) -> float:
    """(epsilon, delta) from an RDP curve (dp_accounting's conversion)."""
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

    return float(compute_epsilon(orders, rdp, delta)[0])


History = list[tuple[float, float, int]]


def history_rdp(history: History, orders: Sequence[float] = ORDERS) -> np.ndarray:
    """RDP curve of a history of subsampled Gaussian steps (Opacus' analysis, the clients')."""
    compute_rdp = opacus("opacus.accountants.analysis.rdp").compute_rdp
    total = np.zeros(len(orders))
    for sigma, q, steps in history:
        total += np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders))
    return total


def search_epsilon(histories: Sequence[History], mean: float, delta: float) -> float:
    """Total epsilon of the search for one client: repeat-and-select over one trial whose RDP
    is, at every order, the largest of the trial histories its settings can give."""
    worst = np.max([history_rdp(h) for h in histories], axis=0)
    return rdp_epsilon(ORDERS, repeat_and_select_rdp(ORDERS, worst, mean), delta)


# -- the clients' plans ------------------------------------------------------------------------------
def trial_history(cfg, task, partition_id: int, rows: int, target: float) -> History:
    """What client `partition_id` spends in one trial at a per-trial `target` epsilon (a fresh
    ledger, as in an inline run): `fedapp.features.audit.planned_history`."""
    return planned_history(cfg, task, partition_id, rows, target)[0]


# What total_epsilon covers, and what it does not (also in tune.json and docs/how-to/dp.md)
SCOPE = (
    "total_epsilon bounds what the released best trial (its settings, model and score) reveals "
    "of a client's rows to anyone who sees only that; the server that runs the search sees "
    "every trial's DP-SGD updates, and against it the cost is the composition of the "
    "trials_drawn trials at per_trial_epsilon each; this folder holds every trial (keep it "
    "with the server's operator, or delete the trials not chosen before releasing anything)"
)
# the search space may vary only what changes no client's accounting beyond the plan the
# tuner computes per setting (batch size, local epochs and steps, the learning rate...)
SPACE_PREFIXES = ("train.", "strategy.")
SPACE_KEYS = ("privacy.max_grad_norm",)


def settings_grid(space: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    keys = sorted(space)
    return [
        dict(zip(keys, values, strict=True))
        for values in itertools.product(*(space[k] for k in keys))
    ]


def trial_overrides(base: Sequence[str], setting: Mapping[str, str], per_trial: float) -> list[str]:
    return [
        *base,
        "privacy=sample_dp",
        f"privacy.target_epsilon={per_trial:.6g}",
        *(f"{k}={v}" for k, v in sorted(setting.items())),
    ]


class Accounting:
    """Per-client histories of every setting of the space (only the settings that change a
    client's steps: the learning rate and clipping norm change no epsilon)."""

    def __init__(self, base: Sequence[str], space: Mapping[str, Sequence[str]], mean: float):
        self.base, self.grid, self.mean = list(base), settings_grid(space), float(mean)
        self.plans: dict[tuple, Any] = {}
        for setting in self.grid:
            cfg = compose(trial_overrides(self.base, setting, 1.0))
            key = (cfg.train.batch_size, cfg.train.local_epochs, cfg.train.get("max_steps", 0))
            self.plans.setdefault(key, cfg)
        self.task = get_task(cfg, resolve_data_dir(cfg))
        self.delta = PrivacySpec.from_config(cfg.privacy).delta
        self.rows = {
            p: self.task.load_partition(p).num_train for p in range(self.task.num_partitions())
        }

    def histories(self, per_trial: float) -> dict[int, list[History]]:
        return {
            p: [trial_history(cfg, self.task, p, n, per_trial) for cfg in self.plans.values()]
            for p, n in self.rows.items()
        }

    def totals(self, per_trial: float) -> dict[int, float]:
        return {
            p: search_epsilon(h, self.mean, self.delta)
            for p, h in self.histories(per_trial).items()
        }

    def per_trial_epsilon(
        self, target: float, iterations: int = 12
    ) -> tuple[float, dict[int, float]]:
        """The largest per-trial epsilon (to 2^-iterations of the target) whose search total
        meets `target` for every client."""
        low, high, best = 0.0, target, None
        for _ in range(iterations):
            mid = (low + high) / 2
            totals = self.totals(mid)
            if max(totals.values()) <= target:
                low, best = mid, totals
            else:
                high = mid
        if best is None:
            raise ConfigError(
                f"no per-trial epsilon meets --target-epsilon {target:g} with a mean of "
                f"{self.mean:g} trials: raise the target or lower --mean-trials"
            )
        return low, best


# -- the search --------------------------------------------------------------------------------------
def validation_score(results: Mapping[str, Any], metric: str) -> float:
    """The selection score of a trial: `metric` of its final round's federated evaluation on
    the clients' validation rows (a `client_*` key; lower is better for losses). Test metrics
    (the server's `test_*`) are never read."""
    if not metric.startswith("client_"):
        raise ConfigError(f"--metric {metric}: select on validation metrics only (client_*)")
    rounds = [r for r in results.get("rounds", []) if r.get("round", 0) > 0]
    value = rounds[-1].get(metric) if rounds else None
    if value is None or not math.isfinite(float(value)):
        return math.inf
    return float(value) if "loss" in metric else -float(value)


def run_trial(overrides: Sequence[str], out: Path) -> Mapping[str, Any]:
    """One inline run of the federation; its results.json."""
    from fedapp.cli.inline import run_inline

    run_inline(list(overrides), out)
    return json.loads((out / "results.json").read_text())


def tune(
    base: Sequence[str],
    space: Mapping[str, Sequence[str]],
    target_epsilon: float,
    mean_trials: float,
    out: Path,
    metric: str = "client_loss",
    seed: int = 0,
    trials: int | None = None,
    runner: Callable[[Sequence[str], Path], Mapping[str, Any]] = run_trial,
) -> dict[str, Any]:
    """Run the search; write tune.json and best_overrides.txt under `out`.

    `trials`: a fixed number of trials instead of the Poisson draw, for tests only (the
    accounting then does not hold; tune.json says so)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    accounting = Accounting(base, space, mean_trials)
    per_trial, totals = accounting.per_trial_epsilon(target_epsilon)
    one_trial = {
        p: max(rdp_epsilon(ORDERS, history_rdp(h), accounting.delta) for h in hs)
        for p, hs in accounting.histories(per_trial).items()
    }
    count = (
        trials
        if trials is not None
        else int(np.random.default_rng(secrets.randbits(63)).poisson(mean_trials))
    )
    rng = seeds.rng("tune.settings", seed)  # the settings: data-independent, seeded
    grid = settings_grid(space)
    done = []
    for k in range(count):
        setting = grid[int(rng.integers(len(grid)))]
        overrides = trial_overrides(base, setting, per_trial)
        results = runner(overrides, out / "trials" / f"{k:03d}")
        done.append(
            {
                "trial": k,
                "settings": setting,
                "overrides": overrides,
                "validation_score": validation_score(results, metric),
                # the clients' own ledgers: the largest epsilon a client spent in the trial
                "spent_epsilon": (results.get("final") or {}).get("dp_epsilon"),
                "run_dir": str(out / "trials" / f"{k:03d}"),
            }
        )
    best = min(done, key=lambda t: t["validation_score"]) if done else None
    report = {
        "target_epsilon": target_epsilon,
        "per_trial_epsilon": per_trial,
        "total_epsilon": max(totals.values()),
        "total_epsilon_per_client": {str(p): e for p, e in totals.items()},
        "single_trial_epsilon": max(one_trial.values()),
        "delta": accounting.delta,
        "mean_trials": mean_trials,
        "trials_drawn": count,
        "distribution": "fixed (test only: the total does not hold)"
        if trials is not None
        else "poisson",
        "accounting": "Papernot and Steinke 2022 (Theorem 6, Poisson) over the largest RDP of a "
        "trial's settings; dp_accounting RepeatAndSelectDpEvent's formula",
        "selection": f"{metric} of the final round, clients' validation rows only (never test)",
        "scope": SCOPE,
        "space": {k: list(v) for k, v in space.items()},
        "base_overrides": list(base),
        "trials": done,
        "chosen": best,
    }
    (out / "tune.json").write_text(json.dumps(report, indent=2))
    if best is not None:
        (out / "best_overrides.txt").write_text("\n".join(best["overrides"]) + "\n")
    return report


def parse_space(items: Sequence[str]) -> dict[str, list[str]]:
    space = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"--space {item}: write KEY=V1,V2,... (e.g. train.lr=0.05,0.1)")
        key = key.strip()
        if not (key.startswith(SPACE_PREFIXES) or key in SPACE_KEYS) or key == "strategy.name":
            raise ConfigError(
                f"--space {key}: the search may vary train.* and strategy.* settings and "
                "privacy.max_grad_norm only (rounds, clients, partitions and the other privacy "
                "settings change what the accounting must plan: set them as fixed overrides)"
            )
        space[key] = [v.strip() for v in values.split(",") if v.strip()]
    return space


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedapp-tune",
        description="Privacy-accounted random search (Papernot and Steinke 2022) over the "
        "federation under privacy=sample_dp; selects on validation rows only. Arguments are "
        "Hydra overrides of every trial.",
    )
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--target-epsilon", type=float, default=8.0, help="total, search included")
    parser.add_argument("--mean-trials", type=float, default=10.0, help="mean of the Poisson count")
    parser.add_argument(
        "--space",
        nargs="+",
        default=[f"{k}={','.join(v)}" for k, v in DEFAULT_SPACE.items()],
        help="KEY=V1,V2,... (default: %(default)s)",
    )
    parser.add_argument("--metric", default="client_loss", help="validation metric (client_*)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the settings' draws")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/tune"))
    args = parser.parse_args(argv)
    try:
        report = tune(
            parse_overrides(args.overrides),
            parse_space(args.space),
            args.target_epsilon,
            args.mean_trials,
            args.output_dir,
            args.metric,
            args.seed,
        )
    except (ConfigError, DataError) as err:
        print(f"fedapp-tune: {err}", file=sys.stderr)
        return 2
    chosen = report["chosen"]
    print(
        f"[fedapp-tune] {report['trials_drawn']} trials at epsilon {report['per_trial_epsilon']:.3f} "
        f"each; total epsilon {report['total_epsilon']:.3f} (target {args.target_epsilon:g}); "
        + (f"chosen {chosen['settings']}; " if chosen else "no trial drawn; ")
        + f"{args.output_dir}/tune.json"
    )
    return 0 if chosen else 1


if __name__ == "__main__":
    raise SystemExit(main())
