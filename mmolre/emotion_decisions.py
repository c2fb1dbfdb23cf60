"""The emotion task around the model: which rows have labels, what the task needs from the data, the BCE's
per-emotion weights, and the decision thresholds chosen on the validation split.

MOSEI's emotions are rare and skewed, so at 0.5 a well-ranked model predicts most of them never. After
training, the selected checkpoint's validation predictions choose one threshold per emotion and one shared
threshold (`metrics.choose_thresholds`, `choose_single_threshold`); the test metrics under both, and the
trivial predictors beside them, go to results.json, and the thresholds beside the checkpoint (read by
export and predict).
"""
from __future__ import annotations

import json
import os

import numpy as np

from .checkpoint import THRESHOLDS
from .config import EMOTIONS, ConfigError, TrainConfig
from .metrics import choose_single_threshold, choose_thresholds, emotion_baselines, emotion_metrics


def emotion_rows(split) -> np.ndarray:
    """[n] bool: the rows of a split (a data.SplitDataset) that have emotion labels."""
    return split.column("has_emotion").astype(bool)


def labelled_emotions(split) -> np.ndarray:
    """[n_labelled, 6]: the intensities of the rows that have emotion labels."""
    return split.column("emotions")[emotion_rows(split)]


def has_emotion_labels(split) -> bool:
    return bool(emotion_rows(split).any())


def check_tasks(t: TrainConfig, data) -> None:
    """What the emotion task needs from the data: labels in train and valid (selection and thresholds use
    valid); --emotion_pos_weight needs them in train."""
    have = {s: has_emotion_labels(data.splits[s]) for s in ("train", "valid")}
    if t.tasks == "emotion" and not all(have.values()):
        missing = [s for s, h in have.items() if not h]
        raise ConfigError(f"--tasks emotion: the {' and '.join(missing)} split(s) of {', '.join(data.names)} have no "
                          f"emotion labels (MOSEI's come from --emotion_labels); there would be nothing to train or "
                          f"select on")
    if t.emotion_pos_weight != "none" and not have["train"]:
        raise ConfigError(f"--emotion_pos_weight {t.emotion_pos_weight}: the train split has no emotion labels")


def prevalence_weights(train) -> np.ndarray | None:
    """(1 - p) / p per emotion from the train split's prevalence p (clipped to [0.01, 100]); None without
    labels."""
    labelled = labelled_emotions(train)
    if not len(labelled):
        return None
    p = (labelled > 0).mean(0)
    return np.clip((1 - p) / np.maximum(p, 1e-6), 0.01, 100.0)


def decides_thresholds(t: TrainConfig, data) -> bool:
    """Thresholds are chosen where an emotion head was trained and the validation split has labels."""
    return (has_emotion_labels(data.splits["train"]) and t.tasks != "sentiment"
            and has_emotion_labels(data.splits["valid"]))


def choose_decisions(valid: dict, test: dict, train_emotions: np.ndarray) -> dict:
    """Per-emotion thresholds and one shared threshold chosen on the validation predictions, the test metrics
    under them, and the trivial predictors beside them. valid/test: prediction arrays (evaluate); train_emotions:
    the labelled train rows' intensities (`labelled_emotions`)."""
    hv, ht = valid["has_emotion"].astype(bool), test["has_emotion"].astype(bool)
    per = choose_thresholds(valid["emotion_prob"][hv], valid["emotion_true"][hv])
    single = choose_single_threshold(valid["emotion_prob"][hv], valid["emotion_true"][hv])
    return {"chosen_on": "valid", "thresholds": dict(zip(EMOTIONS, per)), "single_threshold": single,
            "test_per_emotion_thresholds": emotion_metrics(test["emotion_prob"][ht], test["emotion_true"][ht],
                                                           np.asarray(per)),
            "test_single_threshold": emotion_metrics(test["emotion_prob"][ht], test["emotion_true"][ht], single),
            "baselines": emotion_baselines(train_emotions, valid["emotion_true"][hv], test["emotion_true"][ht])}


def write_thresholds(tag_dir: str, decisions: dict) -> None:
    with open(os.path.join(tag_dir, THRESHOLDS), "w") as f:
        json.dump({"thresholds": decisions["thresholds"], "single_threshold": decisions["single_threshold"],
                   "chosen_on": "valid"}, f, indent=1)


def read_thresholds(tag_dir: str) -> dict | None:
    path = os.path.join(tag_dir, THRESHOLDS)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["thresholds"]
