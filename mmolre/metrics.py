"""Metrics of the field, exactly as its reference code defines them (pure numpy).

Sentiment follows MMSA `MetricsTop.__eval_mosei_regression`:
  Has0 Acc-2/F1: negative (< 0) vs non-negative (>= 0) over all samples;
  Non0 Acc-2/F1: samples with truth == 0 removed, then > 0 vs <= 0 (a prediction of exactly 0 is negative);
  F1 is sklearn's weighted F1 with (truth, prediction) in that order;
  Acc-7 / Acc-5: round(clip(x, -3, 3)) / round(clip(x, -2, 2)) with numpy's round-half-to-even;
  MAE on unclipped values; Corr = Pearson.
Emotions (MOSEI, present = intensity > 0, predicted = sigmoid > threshold: 0.5, or thresholds chosen on the
validation split, `choose_thresholds`), both conventions:
  per emotion: balanced ("weighted") accuracy (TPR + TNR) / 2 and weighted F1, and their means;
  multi-label: micro-F1 over all (sample, emotion) pairs and Jaccard accuracy |Y∩Ŷ| / |Y∪Ŷ| (empty union = 1).
"""
from __future__ import annotations

import numpy as np

from .config import EMOTIONS


def _f1(tp: float, fp: float, fn: float) -> float:
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def weighted_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """sklearn f1_score(truth, pred, average='weighted') for binary labels (zero_division=0)."""
    truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
    if truth.size == 0:
        return 0.0
    total = 0.0
    for cls in (True, False):
        t, p = truth == cls, pred == cls
        support = t.sum()
        if support:
            total += support * _f1(float((t & p).sum()), float((~t & p).sum()), float((t & ~p).sum()))
    return total / truth.size


def balanced_accuracy(truth: np.ndarray, pred: np.ndarray) -> float:
    """(TPR + TNR) / 2, the MOSEI emotion 'weighted accuracy' (MulT's weighted_accuracy)."""
    truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
    pos, neg = truth.sum(), (~truth).sum()
    tpr = (truth & pred).sum() / pos if pos else 0.0
    tnr = (~truth & ~pred).sum() / neg if neg else 0.0
    if not pos or not neg:
        return float(tpr if pos else tnr)
    return float((tpr + tnr) / 2)


def sentiment_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    pred, truth = np.asarray(pred, np.float64).reshape(-1), np.asarray(truth, np.float64).reshape(-1)
    non0 = truth != 0
    corr = float(np.corrcoef(pred, truth)[0, 1]) if pred.std() > 0 and truth.std() > 0 else 0.0
    return {
        "has0_acc2": float(np.mean((pred >= 0) == (truth >= 0))),
        "has0_f1": weighted_f1(truth >= 0, pred >= 0),
        "non0_acc2": float(np.mean((pred[non0] > 0) == (truth[non0] > 0))) if non0.any() else 0.0,
        "non0_f1": weighted_f1(truth[non0] > 0, pred[non0] > 0),
        "acc5": float(np.mean(np.round(np.clip(pred, -2, 2)) == np.round(np.clip(truth, -2, 2)))),
        "acc7": float(np.mean(np.round(np.clip(pred, -3, 3)) == np.round(np.clip(truth, -3, 3)))),
        "mae": float(np.mean(np.abs(pred - truth))),
        "corr": corr,
    }


def emotion_metrics(prob: np.ndarray, intensity: np.ndarray, threshold=0.5) -> dict:
    """prob: [N, 6] sigmoid outputs; intensity: [N, 6] labels in [0, 3]; threshold: one for all emotions or
    one per emotion ([6])."""
    truth = np.asarray(intensity) > 0
    pred = np.asarray(prob) > threshold
    per = {e: {"wacc": balanced_accuracy(truth[:, i], pred[:, i]), "wf1": weighted_f1(truth[:, i], pred[:, i])}
           for i, e in enumerate(EMOTIONS)}
    tp, fp, fn = (truth & pred).sum(), (~truth & pred).sum(), (truth & ~pred).sum()
    union = (truth | pred).sum(1)
    jaccard = np.where(union > 0, (truth & pred).sum(1) / np.maximum(union, 1), 1.0)
    return {
        "micro_f1": _f1(float(tp), float(fp), float(fn)),
        "jaccard_acc": float(jaccard.mean()) if len(jaccard) else 0.0,
        "mean_wacc": float(np.mean([v["wacc"] for v in per.values()])),
        "mean_wf1": float(np.mean([v["wf1"] for v in per.values()])),
        "per_emotion": per,
    }


def baselines(train_sentiment: np.ndarray, train_emotions: np.ndarray, truth: np.ndarray,
              intensity: np.ndarray | None) -> dict[str, float]:
    """Trivial predictors fitted on the train split, scored on another split."""
    train_sentiment = np.asarray(train_sentiment, np.float64)
    truth = np.asarray(truth, np.float64)
    nz = train_sentiment[train_sentiment != 0]
    majority_positive = bool((nz > 0).mean() >= 0.5) if nz.size else True
    non0 = truth != 0
    out = {
        "mean_mae": float(np.mean(np.abs(truth - train_sentiment.mean()))),
        "majority_non0_acc2": float(np.mean((truth[non0] > 0) == majority_positive)) if non0.any() else 0.0,
    }
    if intensity is not None and len(intensity) and len(train_emotions):
        present = (np.asarray(train_emotions) > 0).mean(0) >= 0.5        # per-emotion majority class
        pred = np.broadcast_to(present, np.asarray(intensity).shape).astype(float)
        emo = emotion_metrics(pred, intensity)
        out["majority_emotion_micro_f1"] = emo["micro_f1"]
        out["majority_emotion_jaccard_acc"] = emo["jaccard_acc"]
    return out


# ---- emotion decisions: thresholds chosen on the validation split, and trivial predictors beside them ----

THRESHOLD_GRID = np.round(np.arange(0.02, 0.99, 0.01), 2)


def _best(grid: np.ndarray, scores: list[float]) -> float:
    """The grid value with the best score; ties go to the value closest to 0.5."""
    scores = np.asarray(scores)
    ties = np.flatnonzero(scores == scores.max())
    return float(grid[ties[np.argmin(np.abs(grid[ties] - 0.5))]])


def choose_thresholds(prob: np.ndarray, intensity: np.ndarray, grid: np.ndarray = THRESHOLD_GRID) -> list[float]:
    """Per emotion, the threshold that maximises that emotion's balanced ("weighted") accuracy on these
    (validation) predictions: the field's per-emotion metric, and one that a constant prediction cannot game
    (an emotion's F1 of the present class rewards predicting a common emotion always; its weighted F1 rewards
    never predicting a rare one). MOSEI's emotions are rare and skewed, so 0.5 predicts most of them never."""
    truth = np.asarray(intensity) > 0
    prob = np.asarray(prob)
    return [_best(grid, [balanced_accuracy(truth[:, j], prob[:, j] > g) for g in grid])
            for j in range(truth.shape[1])]


def choose_single_threshold(prob: np.ndarray, intensity: np.ndarray, grid: np.ndarray = THRESHOLD_GRID) -> float:
    """One threshold for every emotion, maximising micro-F1 on these (validation) predictions."""
    return _best(grid, [emotion_metrics(prob, intensity, g)["micro_f1"] for g in grid])


def emotion_baselines(train: np.ndarray, valid: np.ndarray, test: np.ndarray, draws: int = 20) -> dict:
    """Trivial predictors of the six emotions, fitted on train (and valid where they choose), scored on test:
    `majority` (each emotion's majority class in train), `prevalence` (each emotion predicted present at
    random with its train prevalence; the mean over `draws` seeded draws) and `best_constant` (the set of
    emotions always predicted present that maximises micro-F1 on valid, e.g. "always happy")."""
    train_present, test = np.asarray(train) > 0, np.asarray(test)
    n, k = test.shape
    prevalence = train_present.mean(0)
    out = {"majority": emotion_metrics(np.broadcast_to(prevalence >= 0.5, test.shape).astype(float), test)}
    rng = np.random.default_rng(0)
    runs = [emotion_metrics((rng.random(test.shape) < prevalence).astype(float), test) for _ in range(draws)]
    out["prevalence"] = {m: float(np.mean([r[m] for r in runs])) for m in ("micro_f1", "jaccard_acc", "mean_wacc",
                                                                            "mean_wf1")}
    subsets = [np.array([(mask >> j) & 1 for j in range(k)], bool) for mask in range(2 ** k)]
    best = max(subsets, key=lambda s: (emotion_metrics(np.broadcast_to(s, valid.shape).astype(float),
                                                       valid)["micro_f1"], -s.sum()))
    out["best_constant"] = emotion_metrics(np.broadcast_to(best, test.shape).astype(float), test)
    out["best_constant"]["always_present"] = [e for e, b in zip(EMOTIONS, best) if b]
    return out
