"""Emotion decisions that fit skewed labels: thresholds chosen on validation, trivial predictors, and the
prevalence-weighted BCE."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mmolre.config import EMOTIONS
from mmolre.metrics import choose_single_threshold, choose_thresholds, emotion_baselines, emotion_metrics


def _rare_emotions(n=400, seed=0):
    """Prevalences 40 % .. 3 %; probabilities informative but all below 0.5 for the rare emotions."""
    rng = np.random.default_rng(seed)
    prevalence = np.array([0.4, 0.2, 0.1, 0.06, 0.04, 0.03])
    present = rng.random((n, 6)) < prevalence
    prob = np.clip(prevalence + np.where(present, 0.25, -0.02) + rng.normal(0, 0.05, (n, 6)), 0.001, 0.999)
    return prob, present * 1.5


def test_per_emotion_thresholds_chosen_on_valid_beat_one_half_on_test():
    valid_prob, valid_truth = _rare_emotions(seed=1)
    test_prob, test_truth = _rare_emotions(seed=2)
    thresholds = choose_thresholds(valid_prob, valid_truth)
    assert len(thresholds) == 6 and all(0 < t < 0.5 for t in thresholds[1:])   # 0.5 would never fire
    at_half = emotion_metrics(test_prob, test_truth)
    tuned = emotion_metrics(test_prob, test_truth, np.array(thresholds))
    assert tuned["micro_f1"] > at_half["micro_f1"] + 0.2 and tuned["mean_wacc"] > at_half["mean_wacc"] + 0.2
    # each threshold is the best on valid by that emotion's balanced accuracy: no grid value does better
    for j, t in enumerate(thresholds):
        def wacc(th):
            return emotion_metrics(valid_prob, valid_truth, th)["per_emotion"][EMOTIONS[j]]["wacc"]
        assert wacc(t) >= max(wacc(g) for g in np.arange(0.02, 0.99, 0.01)) - 1e-12
    single = choose_single_threshold(valid_prob, valid_truth)
    assert emotion_metrics(valid_prob, valid_truth, single)["micro_f1"] >= \
        emotion_metrics(valid_prob, valid_truth, 0.5)["micro_f1"]


def test_trivial_emotion_predictors():
    _, train = _rare_emotions(seed=3)
    _, valid = _rare_emotions(seed=4)
    _, test = _rare_emotions(seed=5)
    b = emotion_baselines(train, valid, test)
    assert b["majority"]["micro_f1"] == 0.0                    # every emotion is absent more often than not
    assert b["best_constant"]["always_present"][0] == "happy"  # the commonest emotion is always predicted
    always_happy = np.zeros_like(test)
    always_happy[:, 0] = 1
    chosen = np.isin(["happy", "sad", "anger", "surprise", "disgust", "fear"], b["best_constant"]["always_present"])
    expected = emotion_metrics(np.broadcast_to(chosen, test.shape).astype(float), test)
    assert b["best_constant"]["micro_f1"] == pytest.approx(expected["micro_f1"])
    assert b["best_constant"]["micro_f1"] >= emotion_metrics(always_happy, test)["micro_f1"] - 0.02
    assert 0.0 < b["prevalence"]["micro_f1"] < b["best_constant"]["micro_f1"]
    assert b["prevalence"]["mean_wacc"] == pytest.approx(0.5, abs=0.03)   # random guessing


def test_prevalence_weighted_bce_is_the_hand_computation():
    from mmolre.losses import compute_loss

    class Out:
        sentiment = torch.zeros(4)
        emotion_logits = torch.tensor([[0.5, -1.0, 2.0, 0.0, 0.0, 0.0]] * 4)
        aux_loss = torch.zeros(1, 2)
        z_loss = torch.zeros(1, 2)

    class Batch:
        valid = torch.ones(4, dtype=torch.bool)
        has_emotion = torch.ones(4, dtype=torch.bool)
        sentiment = torch.zeros(4)
        emotions = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 0, 2.0, 0, 0, 0], [0.0] * 6, [1.0, 1, 0, 0, 0, 1]])

    weight = torch.tensor([1.5, 4.0, 9.0, 10.0, 20.0, 30.0])
    loss = compute_loss(Out(), Batch(), 0.0, 1.0, pos_weight=weight)
    y = (Batch.emotions > 0).float()
    p = torch.sigmoid(Out.emotion_logits)
    by_hand = -(weight * y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    torch.testing.assert_close(loss.emotion, by_hand)
    assert loss.emotion > compute_loss(Out(), Batch(), 0.0, 1.0).emotion
    assert F.binary_cross_entropy_with_logits(Out.emotion_logits, y) == compute_loss(Out(), Batch(), 0.0, 1.0).emotion


def test_the_emotion_task_needs_emotion_labels_in_train_and_valid():
    """--tasks emotion on MOSI (no emotions) would train nothing and select epoch 1 on a constant loss."""
    from types import SimpleNamespace

    from mmolre.config import ConfigError, TrainConfig
    from mmolre.emotion_decisions import check_tasks

    def data(train, valid):
        split = lambda has: SimpleNamespace(column={"has_emotion": np.array([has, False])}.get)   # noqa: E731
        return SimpleNamespace(splits={"train": split(train), "valid": split(valid)}, names=["mosi"])
    with pytest.raises(ConfigError, match=r"--tasks emotion: the train and valid split\(s\) of mosi have no emotion"):
        check_tasks(TrainConfig(tasks="emotion"), data(False, False))
    with pytest.raises(ConfigError, match="the valid split"):
        check_tasks(TrainConfig(tasks="emotion"), data(True, False))
    with pytest.raises(ConfigError, match="--emotion_pos_weight prevalence: the train split has no emotion"):
        check_tasks(TrainConfig(emotion_pos_weight="prevalence"), data(False, False))
    check_tasks(TrainConfig(tasks="both"), data(False, False))          # MOSI multi-task: sentiment only
    check_tasks(TrainConfig(tasks="emotion"), data(True, True))
