"""Imbalance-aware metrics agree with scikit-learn; pooled confusion counts are exact."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from tasks.metrics import (
    classification_report,
    confusion_matrix,
    confusion_metrics,
    majority_accuracy,
)


@settings(deadline=None, max_examples=50)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=200))
def test_binary_confusion_metrics_match_sklearn(pairs):
    y, p = (np.array(v) for v in zip(*pairs, strict=True))
    m = confusion_metrics(confusion_matrix(y, p, 2))
    assert m["precision"] == pytest.approx(precision_score(y, p, zero_division=0))
    assert m["recall"] == pytest.approx(recall_score(y, p, zero_division=0))
    assert m["f1"] == pytest.approx(f1_score(y, p, zero_division=0))
    if len(set(y)) == 2:
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, p))


@settings(deadline=None, max_examples=30)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1)), max_size=40),
        min_size=1,
        max_size=6,
    )
)
def test_pooled_counts_equal_metrics_on_the_union(clients):
    pooled = sum(
        (
            confusion_matrix(
                np.array([a for a, _ in c], dtype=int), np.array([b for _, b in c], dtype=int), 2
            )
            for c in clients
        ),
        np.zeros((2, 2), dtype=int),
    )
    union = [x for c in clients for x in c]
    if not union:
        return
    y, p = (np.array(v) for v in zip(*union, strict=True))
    assert confusion_metrics(pooled)["f1"] == pytest.approx(f1_score(y, p, zero_division=0))


def test_report_on_a_trivial_predictor_exposes_it():
    y = np.array([0] * 97 + [1] * 3)
    logits = np.tile([2.0, -2.0], (100, 1))  # always "negative"
    r = classification_report(logits, y, 2)
    assert r["accuracy"] == pytest.approx(0.97)  # looks great ...
    assert (
        r["recall"] == 0.0 and r["f1"] == 0.0 and r["balanced_accuracy"] == 0.5
    )  # ... and is useless
    assert r["confusion"] == [97, 0, 3, 0]
    assert majority_accuracy(np.array([970, 30]), y) == pytest.approx(0.97)


def test_ranking_metrics_and_multiclass():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    logits = np.stack([np.zeros(300), y + rng.normal(0, 1, 300)], axis=1)
    r = classification_report(logits, y, 2)
    from scipy.special import softmax

    assert r["roc_auc"] == pytest.approx(roc_auc_score(y, softmax(logits, axis=1)[:, 1]))
    y3 = rng.integers(0, 3, 300)
    r3 = classification_report(np.eye(3)[y3] * 3 + rng.normal(0, 1, (300, 3)), y3, 3)
    assert 0.8 < r3["roc_auc"] <= 1.0 and len(r3["confusion"]) == 9


def test_single_class_sets_give_nan_auc_not_an_error():
    r = classification_report(np.zeros((5, 2)), np.zeros(5, dtype=int), 2)
    assert math.isnan(r["roc_auc"]) and math.isnan(r["pr_auc"])
    empty = classification_report(np.zeros((0, 2)), np.zeros(0, dtype=int), 2)
    assert math.isnan(empty["loss"]) and empty["confusion"] == [0, 0, 0, 0]


def test_overflowing_model_outputs_give_nan_ranking_metrics_not_a_crash():
    import math

    from tasks.metrics import classification_report

    logits = np.array([[np.inf, 1.0], [np.nan, 0.0], [1.0, 2.0]], dtype=np.float32)
    out = classification_report(logits, np.array([0, 1, 1]), 2)
    assert math.isnan(out["roc_auc"]) and math.isnan(out["pr_auc"])
    assert 0.0 <= out["accuracy"] <= 1.0 and sum(out["confusion"]) == 3
