import numpy as np
import pytest
from sklearn.metrics import f1_score

from mmolre.metrics import balanced_accuracy, baselines, emotion_metrics, sentiment_metrics, weighted_f1


def test_sentiment_metrics_by_hand_with_zero_labels():
    truth = np.array([-2.0, -0.4, 0.0, 0.0, 1.0, 2.6])
    pred = np.array([-1.5, 0.2, 0.0, -0.3, 0.6, 1.4])
    m = sentiment_metrics(pred, truth)
    # Has0: non-negative vs negative over all six -> truth [F,F,T,T,T,T], pred [F,T,T,F,T,T]: 4/6 right
    assert m["has0_acc2"] == pytest.approx(4 / 6)
    # Non0: drop the two zero truths -> truth [F,F,T,T], pred>0 [F,T,T,T]: 3/4 right
    assert m["non0_acc2"] == pytest.approx(3 / 4)
    # Acc-7: round(clip) -> truth [-2,-0,0,0,1,3], pred [-2,0,0,-0,1,1]; 5/6 (round-half-even: -1.5 -> -2)
    assert m["acc7"] == pytest.approx(5 / 6)
    # Acc-5 clips to [-2, 2] first: truth 2.6 -> 2, pred 1.4 -> 1
    assert m["acc5"] == pytest.approx(5 / 6)
    assert m["mae"] == pytest.approx(np.mean([0.5, 0.6, 0.0, 0.3, 0.4, 1.2]))
    assert m["corr"] == pytest.approx(np.corrcoef(pred, truth)[0, 1])
    # weighted F1 with (truth, prediction) in MMSA's order
    assert m["has0_f1"] == pytest.approx(f1_score(truth >= 0, pred >= 0, average="weighted"))
    assert m["non0_f1"] == pytest.approx(f1_score(truth[truth != 0] > 0, pred[truth != 0] > 0, average="weighted"))


def test_prediction_of_exactly_zero_is_negative_for_non0_and_positive_for_has0():
    truth, pred = np.array([1.0, -1.0]), np.array([0.0, 0.0])
    m = sentiment_metrics(pred, truth)
    assert m["non0_acc2"] == 0.5 and m["has0_acc2"] == 0.5


@pytest.mark.parametrize("seed", range(5))
def test_weighted_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    t, p = rng.random(50) < 0.3, rng.random(50) < 0.6
    assert weighted_f1(t, p) == pytest.approx(f1_score(t, p, average="weighted"))


def test_weighted_f1_and_balanced_accuracy_edge_cases():
    assert weighted_f1(np.array([True, True]), np.array([False, False])) == 0.0
    assert balanced_accuracy(np.array([True, False, False, False]), np.array([True, True, False, False])) \
        == pytest.approx((1.0 + 2 / 3) / 2)


def test_emotion_metrics_by_hand():
    intensity = np.array([[1.0, 0, 0, 0, 0, 0],
                          [0.33, 1.0, 0, 0, 0, 0],
                          [0, 0, 0, 0, 0, 0]])
    prob = np.array([[0.9, 0.1, 0.1, 0.1, 0.1, 0.1],
                     [0.2, 0.8, 0.7, 0.1, 0.1, 0.1],
                     [0.1, 0.1, 0.1, 0.1, 0.1, 0.1]])
    m = emotion_metrics(prob, intensity)
    # tp: (0,happy), (1,sad) = 2; fp: (1,anger) = 1; fn: (1,happy) = 1 -> micro F1 = 4 / 6
    assert m["micro_f1"] == pytest.approx(4 / 6)
    # Jaccard per sample: 1/1, 1/3 (sad of {happy,sad,anger}), empty union -> 1
    assert m["jaccard_acc"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    happy = m["per_emotion"]["happy"]
    assert happy["wacc"] == pytest.approx((0.5 + 1.0) / 2)
    assert happy["wf1"] == pytest.approx(f1_score([1, 1, 0], [1, 0, 0], average="weighted"))


def test_baselines_use_the_train_split():
    train = np.array([1.0, 2.0, -1.0, 0.0])   # mean 0.5, majority of non-zero is positive
    truth = np.array([-1.0, 1.0, 0.0, 2.0])
    b = baselines(train, np.array([[1.0, 0, 0, 0, 0, 0]] * 3 + [[0.0] * 6]), truth,
                  np.array([[1.0, 0, 0, 0, 0, 0], [0.0] * 6]))
    assert b["mean_mae"] == pytest.approx(np.mean([1.5, 0.5, 0.5, 1.5]))
    assert b["majority_non0_acc2"] == pytest.approx(2 / 3)
    # majority predicts happy present for everyone: tp 1, fp 1 -> F1 2/3
    assert b["majority_emotion_micro_f1"] == pytest.approx(2 / 3)
