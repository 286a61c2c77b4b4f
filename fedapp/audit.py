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
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

from fedapp.config import ConfigError, resolve_data_dir
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


def audit(run_dir: Path, n: int = 2000, seed: int = 0, model_file: str = "final_model.pt") -> dict:
    """Run every attack on the run's model; write audit.json and audit_roc.png."""
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
    args = parser.parse_args(argv)
    try:
        report = audit(args.run_dir, args.members, args.seed, args.model)
    except (ConfigError, DataError) as err:
        print(f"fedapp-audit: {err}", file=sys.stderr)
        return 2
    print(
        f"[fedapp-audit] membership inference AUC {report['mia_auc']:.3f} ({report['best_attack']}); "
        f"{report['members']} members vs {report['non_members']} non-members; "
        f"{args.run_dir}/audit.json"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
