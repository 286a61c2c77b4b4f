"""Classification metrics that stay honest on imbalanced data.

Accuracy alone is meaningless on a 3%-positive task, so every task reports balanced accuracy,
ROC-AUC, PR-AUC, precision, recall and F1 (positive class for binary tasks; macro / one-vs-rest
for more classes) next to the majority-class baseline. Pure NumPy/scikit-learn functions.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.preprocessing import label_binarize


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=1).numpy()


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """K x K counts, rows = true class, columns = predicted class."""
    idx = np.asarray(labels, dtype=np.int64) * num_classes + np.asarray(preds, dtype=np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def confusion_metrics(cm: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, precision, recall, F1 from a confusion matrix.

    Binary (2x2): precision/recall/F1 of class 1 (the positive class). More classes: macro
    averages over classes present in the data. Undefined ratios (0/0) count as 0, as in
    scikit-learn's `zero_division=0`.
    """
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum()
    if total == 0:
        return {k: math.nan for k in ("accuracy", "balanced_accuracy", "precision", "recall", "f1")}
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, 0.0)
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    out = {
        "accuracy": float(tp.sum() / total),
        "balanced_accuracy": float(recall[present].mean()),
    }
    if cm.shape[0] == 2:
        out.update(precision=float(precision[1]), recall=float(recall[1]), f1=float(f1[1]))
    else:
        out.update(
            precision=float(precision[present].mean()),
            recall=float(recall[present].mean()),
            f1=float(f1[present].mean()),
        )
    return out


def ranking_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """ROC-AUC and PR-AUC (average precision); NaN where a class is absent."""
    num_classes = probs.shape[1]
    labels = np.asarray(labels)
    # A single class has no ranking; a model whose outputs overflowed (e.g. after poisoning) has
    # none either: report NaN instead of letting scikit-learn abort the evaluation.
    if len(np.unique(labels)) < 2 or not np.isfinite(probs).all():
        return {"roc_auc": math.nan, "pr_auc": math.nan}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if num_classes == 2:
            return {
                "roc_auc": float(roc_auc_score(labels, probs[:, 1])),
                "pr_auc": float(average_precision_score(labels, probs[:, 1])),
            }
        onehot = label_binarize(labels, classes=list(range(num_classes)))
        present = onehot.sum(axis=0) > 0
        return {
            "roc_auc": float(roc_auc_score(onehot[:, present], probs[:, present], average="macro")),
            "pr_auc": float(
                average_precision_score(onehot[:, present], probs[:, present], average="macro")
            ),
        }


MAX_CONFUSION_CLASSES = (
    10  # report the confusion matrix (flattened, row = true class) up to this size
)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of logits against integer labels (the `loss` of every report)."""
    return float(
        torch.nn.functional.cross_entropy(
            torch.from_numpy(np.asarray(logits)).float(),
            torch.from_numpy(np.asarray(labels, dtype=np.int64)),
        )
    )


def classification_report(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """All metrics of a model's logits on a labelled set (loss included).

    With at most MAX_CONFUSION_CLASSES classes the flattened confusion matrix comes along as
    `confusion`: clients send it so the server can pool precision/recall/F1 over clients.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        empty = np.zeros((num_classes, num_classes), dtype=int)
        out: dict = {
            "loss": math.nan,
            **confusion_metrics(empty),
            "roc_auc": math.nan,
            "pr_auc": math.nan,
        }
        if num_classes <= MAX_CONFUSION_CLASSES:
            out["confusion"] = empty.ravel().tolist()
        return out
    loss = cross_entropy(logits, labels)
    probs = softmax(logits)
    cm = confusion_matrix(labels, probs.argmax(axis=1), num_classes)
    out: dict = {"loss": loss, **confusion_metrics(cm), **ranking_metrics(probs, labels)}
    if num_classes <= MAX_CONFUSION_CLASSES:
        out["confusion"] = cm.ravel().astype(int).tolist()
    return out


def majority_accuracy(train_label_counts: np.ndarray, test_labels: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent training class."""
    if len(test_labels) == 0:
        return math.nan
    return float(np.mean(np.asarray(test_labels) == int(np.argmax(train_label_counts))))
