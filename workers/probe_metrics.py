"""Classification metrics for probes, in pure numpy (library code must not depend on scikit-learn).

The numbers match scikit-learn's definitions so that results can be compared with other tools:

- AUROC is the Mann–Whitney U statistic computed from average ranks, so tied scores count one half — exactly
  the area under the trapezoidal ROC curve that ``sklearn.metrics.roc_auc_score`` reports.
- Recall at a fixed false-positive rate uses the ROC curve over *every* distinct score threshold (plus the
  "predict nothing" corner at (0, 0)) and reports the largest TPR among the points whose FPR is <= the target.
  No interpolation between points: the reported recall is achievable by thresholding the scores, which is what a
  monitor deployed at that FPR budget gets. It equals ``max(tpr[fpr <= target])`` from
  ``sklearn.metrics.roc_curve(..., drop_intermediate=False)`` (dropping collinear points could lose the best
  point below the target).
- Threshold metrics (accuracy, precision, recall, F1) predict positive when ``score >= threshold``; a ratio whose
  denominator is zero is 0.0 (scikit-learn's ``zero_division`` default, without the warning).

Undefined ranking metrics (a single class present) are NaN rather than an exception, so a metrics dict is always
complete and callers can decide what to do with NaN.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from actstore.schemas.errors import AnalysisError

FPR_TARGETS = {"recall_at_1pct_fpr": 0.01, "recall_at_5pct_fpr": 0.05}
"""Metric name -> FPR budget for the recall-at-fixed-FPR metrics."""


def _binary_labels(y_true: Any) -> np.ndarray:
    """Labels as a bool array; accepts bools or 0/1 numbers (anything else is ambiguous, so refused)."""
    y = np.asarray(y_true).reshape(-1)
    if y.dtype == bool:
        return y
    if not np.isin(y, (0, 1)).all():
        raise AnalysisError("y_true: binary metrics need bool or 0/1 labels")
    return y.astype(bool)


def _ratio(num: float, den: float) -> float:
    # zero_division=0 convention (scikit-learn's default value, without its warning).
    return float(num) / float(den) if den else 0.0


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with ties given the mean of the ranks they span (scipy's 'average' method)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start index of each run of equal values; its average rank is the midpoint of the run's 1-based ranks.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    run_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def auroc(y_true: Any, scores: Any) -> float:
    """Area under the ROC curve via Mann–Whitney U (ties count 1/2); NaN when only one class is present."""
    y = _binary_labels(y_true)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    rank_sum = average_ranks(s)[y].sum()
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_curve(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, descending, starting at (0, 0) with threshold +inf.

    Point i is the classifier ``score >= thresholds[i]``. Rates are NaN when a class is absent.
    """
    y = _binary_labels(y_true)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    # The last index of each run of equal scores: thresholds must not split ties.
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tps = np.r_[0, np.cumsum(y)[last]]
    fps = np.r_[0, (last + 1) - tps[1:]]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tps / tps[-1] if tps[-1] else np.full(len(tps), math.nan)
        fpr = fps / fps[-1] if fps[-1] else np.full(len(fps), math.nan)
    return fpr, tpr, np.r_[np.inf, s[last]]


def recall_at_fpr(y_true: Any, scores: Any, max_fpr: float) -> float:
    """Largest TPR among ROC thresholds with FPR <= max_fpr (no interpolation); NaN when a class is absent."""
    fpr, tpr, _ = roc_curve(y_true, scores)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return math.nan
    # The (0, 0) corner always qualifies, so the max is over a non-empty set. k/n is correctly rounded, so an
    # FPR of exactly the target (e.g. 1/100) compares equal to the literal and counts as within budget.
    return float(tpr[fpr <= max_fpr].max())


def binary_metrics(y_true: Any, scores: Any, threshold: float = 0.5) -> dict[str, float]:
    """AUROC, threshold metrics at ``score >= threshold`` and recall at 1% / 5% FPR for one binary task.

    ``y_true``: bools or 0/1; ``scores``: higher means more positive (probabilities for the threshold metrics).
    """
    y = _binary_labels(y_true)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(y) != len(s):
        raise AnalysisError(f"scores: length {len(s)} != y_true length {len(y)}")
    pred = s >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    recall, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    out = {
        "auroc": auroc(y, s),
        "accuracy": _ratio(tp + tn, len(y)),
        "balanced_accuracy": (recall + specificity) / 2.0,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": recall,
    }
    out.update({name: recall_at_fpr(y, s, t) for name, t in FPR_TARGETS.items()})
    n_neg = int(len(y) - (tp + fn))
    # A recall at FPR t is read off the ~t * n_neg highest-scoring negatives: with fewer than 10 of them the
    # number is mostly noise, so it is flagged (reliable needs n_neg >= 10 / t).
    out.update({f"{name}_reliable": bool(n_neg >= 10 / t) for name, t in FPR_TARGETS.items()})
    out.update({"threshold": float(threshold), "n": float(len(y)), "n_pos": float(tp + fn), "n_neg": float(n_neg)})
    return out


def _per_class_f1(y: np.ndarray, pred: np.ndarray) -> list[float]:
    # Like scikit-learn's default, average over the labels seen in y_true or y_pred.
    labels = np.union1d(y, pred)
    return [_ratio(2 * ((pred == k) & (y == k)).sum(), (pred == k).sum() + (y == k).sum()) for k in labels]


def multiclass_metrics(y_true: Any, probs: Any) -> dict[str, float]:
    """Accuracy, macro F1, macro one-vs-rest AUROC and one-vs-rest recall at 1% / 5% FPR (macro-averaged).

    ``y_true``: class indices 0..K-1; ``probs``: (n, K) class scores (argmax is the prediction). The ranking
    metrics average over classes that have both positives and negatives in ``y_true`` (NaN if none does).
    Key names match ``binary_metrics`` ("f1" and "auroc" are the macro averages here).
    """
    y = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != len(y):
        raise AnalysisError(f"probs: expected shape ({len(y)}, n_classes), got {p.shape}")
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise AnalysisError(f"y_true: class indices must lie in [0, {p.shape[1]})")
    pred = p.argmax(axis=1)
    ranked = [k for k in range(p.shape[1]) if 0 < (y == k).sum() < len(y)]

    def macro(fn) -> float:
        return float(np.mean([fn(y == k, p[:, k]) for k in ranked])) if ranked else math.nan

    recalls = [_ratio(((pred == k) & (y == k)).sum(), (y == k).sum()) for k in np.unique(y)]
    out = {
        "auroc": macro(auroc),
        "accuracy": _ratio((pred == y).sum(), len(y)),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else 0.0,
        "f1": float(np.mean(_per_class_f1(y, pred))) if len(y) else 0.0,
    }
    out.update({name: macro(lambda yk, sk, t=t: recall_at_fpr(yk, sk, t)) for name, t in FPR_TARGETS.items()})
    out.update({"n": float(len(y)), "n_classes": float(p.shape[1])})
    return out
