"""Membership-inference audit of a run's final global model: `fedapp-audit RUN_DIR`.

Can someone holding the trained model tell whether a given customer's record was in some
client's training data? The audit draws members (rows of the clients' training data, as the
run partitioned it) and as many non-members (rows of the central test set: the same
distribution, never trained on), queries the final model on both, and runs attacks that score
each row's likelihood of membership:

- `loss_threshold` (Yeom et al., CSF 2018): members have lower loss; the score is the
  logit-scaled confidence log(p_y / (1 - p_y)) = z_y - logsumexp_{j != y} z_j, a monotone
  transform of -loss that does not saturate at 0 for confident models (as in LiRA, Carlini et
  al., S&P 2022);
- `correctness` (Yeom et al.'s gap attack, label-only): members are the rows the model
  classifies correctly;
- `blackbox_rf` (Shokri et al., S&P 2017, as implemented by the adversarial-robustness-toolbox's
  `MembershipInferenceBlackBox`): a random forest trained on the model's output vector and the
  label of half the members and non-members, scored on the other half; a stronger attacker
  who knows part of the membership.

Each attack's ROC-AUC (0.5 = guessing) and its true-positive rate at 1% and 0.1% false
positives (what matters for a few exposed records, Carlini et al. 2022) go to
`RUN_DIR/audit.json`; `mia_auc` is the best attack's AUC. `RUN_DIR/audit_roc.png` draws the
ROC curves. Empirical, not a guarantee: a low AUC means these attacks fail, not that every
attack would; the DP epsilon in results.json is the guarantee.

`--canaries M` (default 1000) adds a one-run epsilon audit of one client's DP-SGD (Steinke,
Nasr and Jagielski, NeurIPS 2023), in the server's white-box view of the client's updates:
M Dirac gradient canaries, each included with probability 1/2, privatized as the client's
DP-SGD would (Opacus' optimizer, its clipping, the noise multiplier its accountant calibrates
for the run's plan); from the correct guesses on the surest canaries, a lower bound on epsilon
at 95% confidence, reported beside the claimed epsilon (`audit.json` `canary`;
`flagged` when the bound exceeds the claim). A lower bound, not a proof: a bound far below
the claim says these canaries found no leak, not that the claim holds; a bound above it is a
bug (the seeded-noise test mode, whose noise an auditor regenerates from the run seed, is
caught). M canaries cap the bound (5.0 with 1000, 7.8 with 10000): a claim above the cap
cannot be refuted by them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from fedapp.core.config import ConfigError, resolve_data_dir
from tasks import DataError, Task, get_task
from tasks.training import predict_logits


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Highest true-positive rate at a false-positive rate of at most `fpr`."""
    f, t, _ = roc_curve(labels, scores)
    ok = f <= fpr
    return float(t[ok].max()) if ok.any() else 0.0


def attack_report(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "tpr_at_1pct_fpr": tpr_at_fpr(labels, scores, 0.01),
        "tpr_at_0.1pct_fpr": tpr_at_fpr(labels, scores, 0.001),
        "n": int(len(labels)),
    }


def scaled_confidence(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """log(p_y / (1 - p_y)) from the logits: z_y - logsumexp of the other logits."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    rows = torch.arange(len(y))
    true = z[rows, torch.as_tensor(y)]
    others = z.clone()
    others[rows, torch.as_tensor(y)] = -torch.inf
    return (true - torch.logsumexp(others, dim=1)).numpy()


def loss_threshold(logits_in, y_in, logits_out, y_out) -> dict[str, Any]:
    scores = np.r_[scaled_confidence(logits_in, y_in), scaled_confidence(logits_out, y_out)]
    return attack_report(np.r_[np.ones(len(y_in)), np.zeros(len(y_out))], scores)


def correctness(logits_in, y_in, logits_out, y_out) -> dict[str, Any]:
    scores = np.r_[logits_in.argmax(1) == y_in, logits_out.argmax(1) == y_out].astype(float)
    return attack_report(np.r_[np.ones(len(y_in)), np.zeros(len(y_out))], scores)


def blackbox(logits_in, y_in, logits_out, y_out, num_classes: int, seed: int) -> dict[str, Any]:
    """ART's MembershipInferenceBlackBox (random forest) on the output probabilities and the
    label, trained on half of each set and scored on the other half."""
    from art.attacks.inference.membership_inference import MembershipInferenceBlackBox
    from art.estimators.classification import PyTorchClassifier

    def probs(logits):
        return torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=1).numpy()

    rng = np.random.default_rng(seed)
    idx_in, idx_out = rng.permutation(len(y_in)), rng.permutation(len(y_out))
    h_in, h_out = len(y_in) // 2, len(y_out) // 2
    # ART wants an estimator; it is not queried, since the predictions are given
    dummy = PyTorchClassifier(
        nn.Linear(1, num_classes), nn.CrossEntropyLoss(), input_shape=(1,), nb_classes=num_classes
    )
    attack = MembershipInferenceBlackBox(dummy, input_type="prediction", attack_model_type="rf")
    np.random.seed(seed)  # the forest draws from NumPy's global generator
    attack.fit(
        y=y_in[idx_in[:h_in]],
        test_y=y_out[idx_out[:h_out]],
        pred=probs(logits_in[idx_in[:h_in]]),
        test_pred=probs(logits_out[idx_out[:h_out]]),
    )
    test_in, test_out = idx_in[h_in:], idx_out[h_out:]
    scores = np.r_[
        _infer(attack, probs(logits_in[test_in]), y_in[test_in]),
        _infer(attack, probs(logits_out[test_out]), y_out[test_out]),
    ]
    return attack_report(np.r_[np.ones(len(test_in)), np.zeros(len(test_out))], scores)


def _infer(attack, pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.asarray(attack.infer(None, y, pred=pred, probabilities=True), dtype=np.float64)
    return out.reshape(len(y), -1)[:, -1]  # probability of "member"


def _take(dataset, positions: np.ndarray):
    """The rows of a task's dataset at `positions` (tabular Rows or a TensorDataset)."""
    if hasattr(dataset, "take"):
        return dataset.take(positions)
    return torch.utils.data.TensorDataset(*(t[torch.as_tensor(positions)] for t in dataset.tensors))


def draw(task: Task, dataset, n: int, seed: int):
    """Up to `n` rows of `dataset`, seeded."""
    size = len(task.dataset_labels(dataset))
    rng = np.random.default_rng(seed)
    return _take(dataset, np.sort(rng.choice(size, size=min(n, size), replace=False)))


def members(task: Task, n: int, seed: int):
    """Up to `n` training rows of the run's clients (an equal share from each client)."""
    parts = task.num_partitions()
    per = max(1, -(-n // parts))
    return _concat([draw(task, task.load_partition(p).train, per, seed + p) for p in range(parts)])


def _concat(chunks):
    if hasattr(chunks[0], "take"):
        from tasks.tabular import Rows

        return Rows(
            np.concatenate([c.numeric for c in chunks]),
            np.concatenate([c.codes for c in chunks]),
            np.concatenate([c.y for c in chunks]),
        )
    return torch.utils.data.TensorDataset(
        *(torch.cat([c.tensors[i] for c in chunks]) for i in range(len(chunks[0].tensors)))
    )


def audit(
    run_dir: Path,
    n: int = 2000,
    seed: int = 0,
    model_file: str = "final_model.pt",
    canaries: int = 0,
    client: int = 0,
) -> dict:
    """Run every attack on the run's model; write audit.json and audit_roc.png. `canaries` > 0
    adds the one-run canary audit of client `client`'s DP-SGD (`canary_audit`) as `canary`."""
    run_dir = Path(run_dir)
    cfg_path, model_path = run_dir / "config.yaml", run_dir / model_file
    for p in (cfg_path, model_path):
        if not p.exists():
            raise ConfigError(
                f"{p} not found: fedapp-audit needs a finished run's folder (config.yaml and "
                f"{model_file}; run with checkpoint=true)"
            )
    cfg = OmegaConf.load(cfg_path)
    task = get_task(cfg, resolve_data_dir(cfg))
    prep_path = run_dir / "preprocessing.json"
    prep = json.loads(prep_path.read_text()) if prep_path.exists() else {}
    if task.needs_stats and not prep:
        raise ConfigError(f"{prep_path} not found: the run's preprocessing is needed to audit it")
    test = task.load_central_test()  # first: a schema's `numeric: all` is resolved on reading
    model = task.make_model()
    model.load_state_dict(torch.load(model_path, map_location="cpu"))
    n = min(n, len(task.dataset_labels(test)))  # as many members as non-members
    outside = draw(task, test, n, seed + 1)
    member_rows = draw(task, members(task, n, seed), n, seed + 2)
    logits_in, y_in = predict_logits(model, task.eval_dataset(member_rows, prep))
    logits_out, y_out = predict_logits(model, task.eval_dataset(outside, prep))
    attacks = {
        "loss_threshold": loss_threshold(logits_in, y_in, logits_out, y_out),
        "correctness": correctness(logits_in, y_in, logits_out, y_out),
        "blackbox_rf": blackbox(logits_in, y_in, logits_out, y_out, task.num_classes, seed),
    }
    best = max(attacks, key=lambda k: attacks[k]["auc"])
    results = (
        json.loads((run_dir / "results.json").read_text())
        if (run_dir / "results.json").exists()
        else {}
    )
    report = {
        "mia_auc": attacks[best]["auc"],
        "best_attack": best,
        "attacks": attacks,
        "members": int(len(y_in)),
        "non_members": int(len(y_out)),
        "member_source": "the clients' training rows (an equal share per client)",
        "non_member_source": "the central test set (never trained on)",
        "model": model_file,
        "dp_epsilon": (results.get("final") or {}).get("dp_epsilon"),
        "seed": seed,
    }
    if canaries:
        report["canary"] = {
            "client": client,
            **canary_audit(canary_plan(cfg, client, task), canaries, seed),
        }
    (run_dir / "audit.json").write_text(json.dumps(report, indent=2))
    _plot(run_dir / "audit_roc.png", logits_in, y_in, logits_out, y_out, attacks)
    return report


def _plot(path: Path, logits_in, y_in, logits_out, y_out, attacks) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.r_[np.ones(len(y_in)), np.zeros(len(y_out))]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    scores = np.r_[scaled_confidence(logits_in, y_in), scaled_confidence(logits_out, y_out)]
    f, t, _ = roc_curve(labels, scores)
    ax.plot(f, t, label=f"loss_threshold (AUC {attacks['loss_threshold']['auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="guessing")
    for name in ("correctness", "blackbox_rf"):
        ax.plot([], [], " ", label=f"{name}: AUC {attacks[name]['auc']:.3f}")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("membership inference on the final model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedapp-audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--members", type=int, default=2000, help="members (and non-members) drawn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="final_model.pt")
    parser.add_argument(
        "--canaries",
        type=int,
        default=1000,
        help="canaries of the one-run epsilon audit of a client's DP-SGD (0: no canary audit)",
    )
    parser.add_argument(
        "--client", type=int, default=0, help="partition id the canary audit audits"
    )
    args = parser.parse_args(argv)
    try:
        report = audit(
            args.run_dir, args.members, args.seed, args.model, args.canaries, args.client
        )
    except (ConfigError, DataError) as err:
        print(f"fedapp-audit: {err}", file=sys.stderr)
        return 2
    print(
        f"[fedapp-audit] membership inference AUC {report['mia_auc']:.3f} ({report['best_attack']}); "
        f"{report['members']} members vs {report['non_members']} non-members; "
        f"{args.run_dir}/audit.json"
    )
    if "canary" in report:
        c = report["canary"]
        print(
            f"[fedapp-audit] canary audit of client {c['client']}: epsilon >= "
            f"{c['epsilon_lower_bound']:.2f} (95% confidence, {c['canaries']} canaries) beside the "
            "claimed "
            + (f"{c['claimed_epsilon']:g}" if c["claimed_epsilon"] is not None else "none (no DP)")
            + ("; THE CLAIM DOES NOT HOLD" if c["flagged"] else "")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# -- one-run canary audit (Steinke, Nasr and Jagielski, NeurIPS 2023) --------------------------------
# "Privacy Auditing with One (1) Training Run" (arXiv 2305.08846): m canaries, each included in
# the training data independently with probability 1/2; after one run the auditor guesses, for
# the r canaries it is most confident about, whether each was included; v correct guesses out of
# r reject (eps, delta)-DP with confidence 1 - beta when the p-value below is under beta. The
# largest rejected eps is an empirical lower bound: a bug detector, not a proof of privacy.


def canary_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] under (epsilon, delta)-DP with m Poisson canaries:
    Steinke, Nasr and Jagielski (2023), their (eps, delta) theorem as the paper's own code
    computes it (`p_value_DP_audit`): P[Binomial(r, q) >= v] + 2 m delta max_i P[v - i <= Binomial(r, q) < v] / i, where
    q = e^eps / (1 + e^eps) is the accuracy of eps-DP randomized response."""
    from scipy.stats import binom

    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m} r={r} v={v}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))
    if v == 0 or delta == 0:
        return min(1.0, tail)
    below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))  # i = 1..v
    alpha = float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + alpha * delta * 2 * m)


def canary_epsilon_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """Empirical lower bound on epsilon from v correct guesses of r among m canaries, at
    confidence 1 - beta: the largest eps whose p-value (`canary_p_value`) is below beta, by
    bisection (the paper's `get_eps_audit`); 0 when even eps = 0 is not rejected."""
    if not 0 < beta < 1:
        raise ValueError(f"beta={beta}: must be in (0, 1)")
    if canary_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while canary_p_value(m, r, v, high, delta) < beta:
        low, high = high, 2 * high
    for _ in range(40):
        mid = (low + high) / 2
        if canary_p_value(m, r, v, mid, delta) < beta:
            low = mid
        else:
            high = mid
    return low


@dataclasses.dataclass(frozen=True)
class CanaryPlan:
    """The DP-SGD mechanism one client runs over a whole run, as its accountant plans it."""

    noise_multiplier: float  # 0: no DP (nothing clipped, no noise)
    max_grad_norm: float
    sample_rate: float  # Poisson sampling rate of each row in each step
    steps: int  # local steps over the whole run (participations x steps per round)
    batch_size: int  # expected batch size (Opacus scales the noisy sum by it)
    claimed_epsilon: float  # the client's target for the run (inf without DP)
    delta: float
    seed: int  # the client's DP-SGD seed, only used in the insecure seeded-noise test mode


def planned_history(
    cfg, task: Task, partition_id: int, rows: int, target: float | None = None
) -> tuple[list[tuple[float, float, int]], float]:
    """What client `partition_id` (`rows` training rows) spends in one run of `cfg` from a
    fresh ledger, planned with the same functions as the client (fedapp.features.privacy): the
    statistics release (tabular tasks), then DP-SGD calibrated to its target (`target`
    instead of the run's, if given) over its planned participations. Returns the history
    (Opacus' (noise multiplier, sample rate, steps)) and the target; under privacy=none, one
    noiseless entry and infinity."""
    from fedapp.features.privacy import PrivacySpec, new_ledger, plan_stats, planned_participations
    from tasks.training import TrainSettings

    spec = PrivacySpec.from_config(cfg.get("privacy"))
    if target is not None:
        spec = dataclasses.replace(spec, target_epsilon=float(target))
    settings = TrainSettings.from_train_config(cfg.train, int(cfg.seed))
    sample_rate = 1 / max(1, math.ceil(rows / settings.batch_size))
    participations = spec.participations if spec.sample_level else "auto"
    if participations == "auto":
        participations = planned_participations(
            int(cfg.rounds), int(cfg.clients_per_round), task.num_partitions()
        )
    steps = settings.steps_per_round(rows) * int(participations)
    if not spec.sample_level:
        return [(0.0, sample_rate, steps)], math.inf
    ledger = new_ledger(spec, task, partition_id, {})
    if task.needs_stats:
        plan_stats(ledger, spec)
        ledger.record(ledger.stats_noise_multiplier, 1.0, 1)
    prefix = tuple(ledger.history)
    sigma = _calibrate(
        ledger.target_epsilon, ledger.delta, sample_rate, steps, spec.accountant, prefix
    )
    return [*prefix, (sigma, sample_rate, steps)], ledger.target_epsilon


@functools.lru_cache(maxsize=4096)
def _calibrate(target, delta, sample_rate, steps, accountant, prefix) -> float:
    """fedapp.features.privacy.calibrate, once per plan (it is slow; clients with equal plans share)."""
    from fedapp.features.privacy import calibrate

    return calibrate(target, delta, sample_rate, steps, accountant, list(prefix))


def canary_plan(cfg, partition_id: int = 0, task: Task | None = None) -> CanaryPlan:
    """The DP-SGD mechanism of client `partition_id` under the run's config: its sample rate
    and steps over the whole run, and the noise multiplier its accountant calibrates
    (`planned_history`)."""
    from fedapp.features.privacy import PrivacySpec

    task = task or get_task(cfg, resolve_data_dir(cfg))
    spec = PrivacySpec.from_config(cfg.get("privacy"))
    history, claimed = planned_history(
        cfg, task, partition_id, task.load_partition(partition_id).num_train
    )
    sigma, sample_rate, steps = history[-1]
    return CanaryPlan(
        sigma,
        spec.max_grad_norm if spec.sample_level else 1.0,
        sample_rate,
        steps,
        int(cfg.train.batch_size),
        claimed,
        spec.delta,
        (int(cfg.seed) * 1_000_003 + partition_id) ^ 0xD95,
    )


def canary_updates(
    plan: CanaryPlan, included: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The client's DP-SGD over the whole run on the canaries' coordinates, through Opacus'
    own `DPOptimizer` (per-sample clipping to `max_grad_norm`, Gaussian noise of std
    noise_multiplier x max_grad_norm from `tasks.dp_sgd.noise_generator`, Opacus' secure-noise
    sums, scaling by the expected batch size) with the client's noise multiplier, sample rate
    and steps. Canary i is a Dirac gradient (max_grad_norm on coordinate i only; Steinke et al.
    2023, section 7) that each step samples with the rows' probability if it is included. The
    training rows' own gradients are left out: they are the same whether a canary is in or
    not, and a white-box auditor who knows them (the adversary DP is defined against)
    subtracts them.

    Returns the server's white-box view, the sum of every step's privatized gradient (in units
    of the clipping norm, unscaled), and the same sum of the noise an auditor who knows the
    run seed regenerates (`tasks.dp_sgd`'s seeded-noise test mode makes it the real noise)."""
    from tasks.dp_sgd import SECURE_NOISE, noise_generator, opacus

    DPOptimizer = opacus("opacus.optimizers").DPOptimizer
    m, c = len(included), plan.max_grad_norm
    sampler = noise_generator(plan.seed ^ 0x5A3)  # Poisson sampling is part of the mechanism
    in_idx = torch.as_tensor(np.flatnonzero(included))
    views = []
    for generator in (noise_generator(plan.seed), torch.Generator().manual_seed(plan.seed)):
        weight = nn.Parameter(torch.zeros(m, dtype=torch.float32))
        optimizer = DPOptimizer(
            torch.optim.SGD([weight], lr=0.0),
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=c,
            expected_batch_size=plan.batch_size,
            generator=generator,
            secure_mode=SECURE_NOISE,
        )
        replay = len(views) == 1
        total = torch.zeros(m, dtype=torch.float64)
        for _ in range(plan.steps):
            if replay:
                rows = torch.empty(0, dtype=torch.long)
            else:
                draw = torch.rand(len(in_idx), generator=sampler, dtype=torch.float64)
                rows = in_idx[draw < plan.sample_rate]
            grad_sample = torch.zeros(len(rows), m)
            grad_sample[torch.arange(len(rows)), rows] = c
            weight.grad_sample = grad_sample
            optimizer.pre_step()
            total += weight.grad * plan.batch_size / c
            optimizer.zero_grad(set_to_none=True)
        views.append(total.numpy())
    return views[0], views[1]


GUESS_SHARES = (
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
)  # r / m: the auditor's guess counts, fixed in advance


def canary_audit(plan: CanaryPlan, canaries: int = 1000, seed: int = 0, beta: float = 0.05) -> dict:
    """One-run audit of a client's DP-SGD (Steinke et al. 2023) in the server's white-box view:
    `canaries` Dirac canaries, each included with probability 1/2 (the auditor's coin, seeded);
    the score of canary i is coordinate i of the summed privatized gradients (`canary_updates`).
    Two attacks: `sum` (that score) and `seed_replay` (the score minus the noise regenerated
    from the run seed: it wins only if the noise is not secret). Each guesses "in" for its r/2
    highest scores and "out" for its r/2 lowest, for each r in `GUESS_SHARES` x m, and once on
    every canary ("in" above half an included canary's expected count); every test is made at
    beta / (number of tests) (Bonferroni), so the reported bound, the largest, holds at
    confidence 1 - beta."""
    if canaries < 2:
        raise ValueError(f"canaries={canaries}: need at least 2")
    rng = np.random.default_rng([seed, 0xCA7])
    included = rng.random(canaries) < 0.5
    view, replay_noise = canary_updates(plan, included, seed)
    scores = {"sum": view, "seed_replay": view - replay_noise}
    guesses = sorted({max(2, int(share * canaries) // 2 * 2) for share in GUESS_SHARES})
    level = beta / (len(scores) * (len(guesses) + 1))
    middle = plan.sample_rate * plan.steps / 2  # half an included canary's expected count
    tests = []
    for name, score in scores.items():
        order = np.argsort(score, kind="stable")  # ascending: the last are the surest "in"
        for r in guesses:
            half = r // 2
            correct = int(included[order[-half:]].sum() + (~included[order[:half]]).sum())
            tests.append({"attack": name, "guesses": r, "rule": "top/bottom", "correct": correct})
        # every canary guessed, "in" above the midpoint (at most m guesses: the theorem holds)
        correct = int(((score > middle) == included).sum())
        tests.append({"attack": name, "guesses": canaries, "rule": "threshold", "correct": correct})
    for t in tests:
        t["epsilon_lower_bound"] = canary_epsilon_bound(
            canaries, t["guesses"], t["correct"], plan.delta, level
        )
    best = max(tests, key=lambda t: t["epsilon_lower_bound"])
    return {
        "epsilon_lower_bound": best["epsilon_lower_bound"],
        "claimed_epsilon": plan.claimed_epsilon if math.isfinite(plan.claimed_epsilon) else None,
        "flagged": bool(best["epsilon_lower_bound"] > plan.claimed_epsilon),
        "best": best,
        "tests": tests,
        "canaries": canaries,
        "included": int(included.sum()),
        "confidence": 1 - beta,
        "delta": plan.delta,
        "noise_multiplier": plan.noise_multiplier,
        "max_grad_norm": plan.max_grad_norm,
        "sample_rate": plan.sample_rate,
        "steps": plan.steps,
        "threat_model": "white-box server: sees every DP-SGD step's privatized gradient of one "
        "client over the whole run; Dirac gradient canaries, Poisson-included (p = 1/2)",
        "mechanism": "Opacus DPOptimizer (the client's clipping, noise multiplier from its "
        "accountant's calibration, secret noise generator, secure-noise sums) on the canaries' "
        "coordinates only; the training rows' gradients are not simulated",
        "seed": seed,
    }
