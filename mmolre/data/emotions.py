"""MOSEI emotion labels joined onto an MMSA pickle by (video, clip).

MMSA's MOSEI pickles carry sentiment only. The six emotion intensities come from either

* the CMU-MultimodalSDK label file `CMU_MOSEI_Labels.csd` (HDF5, root "All Labels"): per video, a
  [segments, 7] array in the order **[sentiment, happy, sad, anger, surprise, disgust, fear]**; segment k
  (0-based, array order) of video v is clip k. The SDK's separate "Emotion Labels" file has 6 columns in
  the order [happy, sad, anger, surprise, disgust, fear] and is read too;
* a label table (CSV) with columns `video_id`, `clip_index` (or `clip_id`) and the six emotion names, such
  as `shared/data/real/mosei/mosei_labels.csv`.

The order trap: older processed MOSEI files (`ey_*.h5`) list emotions alphabetically [anger, disgust,
fear, happy, sad, surprise]. Reading columns by name (tables) or by the SDK's documented order (CSD)
avoids it; the join also compares the label file's sentiment with the pickle's, which catches a wrong key
(an off-by-one clip numbering, another dataset) before anything trains.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field

import numpy as np

from ..config import EMOTIONS
from .schema import EMOTION_KEY, ID_SEPARATOR, SPLITS, DataError, decode_id, split_id

CSD_ORDER = ("sentiment",) + EMOTIONS   # "All Labels"
CLIP_COLUMNS = ("clip_id", "clip_index")   # MMSA's label.csv, the MOSEI table
SENTIMENT_TOLERANCE = 1e-3
JOIN_TOLERANCE = 0.01   # default largest fraction of joined clips whose sentiments may disagree


@dataclass
class EmotionTable:
    path: str
    emotions: dict[tuple[str, str], np.ndarray]          # (video, clip) -> 6 intensities (EMOTIONS order)
    sentiment: dict[tuple[str, str], float] = field(default_factory=dict)


@dataclass
class JoinReport:
    matched: dict[str, int]
    unmatched: dict[str, list[str]]     # split -> sample ids without emotion labels
    sentiment_mismatches: int
    compared: int = 0                   # joined samples whose sentiment both files hold
    disagreeing: list[str] = field(default_factory=list)   # their ids (pickle vs label file), the first 50

    @property
    def mismatch_fraction(self) -> float:
        return self.sentiment_mismatches / self.compared if self.compared else 0.0

    def summary(self) -> str:
        parts = [f"{s}: {self.matched[s]} of {self.matched[s] + len(self.unmatched[s])} samples labelled"
                 for s in self.matched]
        missing = [i for s in self.unmatched for i in self.unmatched[s]]
        text = "; ".join(parts)
        if missing:
            text += f"; without emotion labels: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")
        return text


def read_emotion_labels(path: str) -> EmotionTable:
    if not os.path.isfile(path):
        raise DataError(f"--emotion_labels: no such file {path!r} (a CMU_MOSEI_Labels.csd or a CSV table)")
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic == b"\x89HDF\r\n\x1a\n":
        return _read_csd(path)
    return _read_table(path)


def _read_csd(path: str) -> EmotionTable:
    try:
        import h5py
    except ImportError as e:  # a declared dependency; only a broken install gets here
        raise DataError(f"{path}: reading an SDK .csd file needs h5py (pip install h5py)") from e
    emotions, sentiment = {}, {}
    with h5py.File(path, "r") as f:
        roots = list(f.keys())
        if len(roots) != 1 or "data" not in f[roots[0]]:
            raise DataError(f"{path}: not a computational sequence (expected one root group with 'data', "
                            f"found {roots})")
        root = roots[0]
        for video, group in f[root]["data"].items():
            if "features" not in group:
                raise DataError(f"{path} [{root}/data/{video}]: no 'features' dataset")
            feats = np.asarray(group["features"], np.float64)
            if feats.ndim != 2 or feats.shape[1] not in (6, 7):
                raise DataError(f"{path} [{root}/data/{video}/features]: expected [segments, 7] "
                                f"({', '.join(CSD_ORDER)}) or [segments, 6] (emotions only), got {feats.shape}")
            for k, row in enumerate(feats):
                if row.shape[0] == 7:
                    sentiment[(video, str(k))] = float(row[0])
                    row = row[1:]
                emotions[(video, str(k))] = check_intensities(
                    row, f"{path} [{root}/data/{video}/features, sample '{video}[{k}]']")
    return EmotionTable(path, emotions, sentiment)


def _read_table(path: str) -> EmotionTable:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        clip_col = clip_column(columns)
        missing = [c for c in ("video_id", *EMOTIONS) if c not in columns] + ([] if clip_col else ["clip_index"])
        if missing:
            raise DataError(f"{path}: missing column(s) {missing} (columns: {columns}); a label table needs "
                            f"video_id, clip_index and {', '.join(EMOTIONS)}")
        emotions, sentiment = {}, {}
        for line, row in enumerate(reader, start=2):
            key = (row["video_id"], clip_key(row[clip_col]))
            if key in emotions:
                raise DataError(f"{path} [line {line}, key '{clip_col}', sample '{key[0]}{ID_SEPARATOR}{key[1]}']: "
                                f"duplicate (video_id, {clip_col})")
            emotions[key] = table_intensities(row, f"{path} [line {line}, sample '{key[0]}, clip {key[1]}']")
            for name in ("sentiment", "label"):
                if row.get(name) not in (None, ""):
                    sentiment[key] = float(row[name])
                    break
    return EmotionTable(path, emotions, sentiment)


def clip_key(raw) -> str:
    """Clip ids compare as integers when they are integers ('3', '03', '3.0'), else as written."""
    text = str(raw).strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def clip_column(columns) -> str | None:
    return next((c for c in CLIP_COLUMNS if c in columns), None)


def table_intensities(row: dict, location: str) -> np.ndarray:
    """The six intensities of a CSV row, read by column name; `location` (file, line, sample) starts errors."""
    try:
        values = np.array([float(row[e]) for e in EMOTIONS])
    except ValueError as e:
        raise DataError(f"{location}: {e}") from None
    return check_intensities(values, location)


def check_intensities(values: np.ndarray, location: str) -> np.ndarray:
    if not np.isfinite(values).all() or (values < 0).any() or (values > 3).any():
        raise DataError(f"{location}: emotion intensities {values.tolist()} outside [0, 3] ({', '.join(EMOTIONS)})")
    return values.astype(np.float32)


def join_emotions(source: str, data: dict, table: EmotionTable, tolerance: float = JOIN_TOLERANCE) -> JoinReport:
    """Set data[split]['emotion_labels'] ([N, 6], NaN rows = unlabelled) for every split, in place.

    Where the label file has a sentiment too, every joined clip's is compared with the pickle's; if more than
    `tolerance` of them disagree, the join is refused (a wrong clip numbering, another dataset or version):
    even 10 % wrong rows would train on wrong emotion labels."""
    matched, unmatched, mismatches, compared, disagreeing = {}, {}, 0, 0, []
    for split in SPLITS:
        d = data[split]
        if EMOTION_KEY in d:
            raise DataError(f"{source} [split '{split}', key '{EMOTION_KEY}']: the pickle already has emotion "
                            f"labels; joining {table.path} would replace them")
        ids = [decode_id(x) for x in np.asarray(d["id"]).reshape(-1)]
        sent = np.asarray(d["regression_labels"], np.float64).reshape(-1)
        out = np.full((len(ids), len(EMOTIONS)), np.nan, np.float32)
        unmatched[split] = []
        for i, sid in enumerate(ids):
            key = _key(sid)
            if key not in table.emotions:
                unmatched[split].append(sid)
                continue
            out[i] = table.emotions[key]
            if key in table.sentiment:
                compared += 1
                if abs(table.sentiment[key] - sent[i]) > SENTIMENT_TOLERANCE:
                    mismatches += 1
                    if len(disagreeing) < 50:
                        disagreeing.append(f"{sid} ({sent[i]:+.3f} vs {table.sentiment[key]:+.3f})")
        matched[split] = len(ids) - len(unmatched[split])
        d[EMOTION_KEY] = out
    total = sum(matched.values())
    if total == 0:
        raise DataError(f"{source}: no sample id matched {table.path} by (video, clip); the pickle's ids look "
                        f"like {ids[:2]}, the label file's keys like {list(table.emotions)[:2]}")
    report = JoinReport(matched, unmatched, mismatches, compared, disagreeing)
    check_join(source, table.path, report.sentiment_mismatches, compared, disagreeing, tolerance)
    return report


def check_join(source: str, labels: str, mismatches: int, compared: int, disagreeing: list[str],
               tolerance: float) -> None:
    """Refuse a join where more than `tolerance` of the compared sentiments disagree (also for a cached one,
    so a lower tolerance is never satisfied by a cache built under a higher one)."""
    if compared and mismatches > tolerance * compared:
        why = ("the clip numbering of the two files does not agree" if mismatches > compared / 2 else
               "some clips are joined to another clip's labels")
        raise DataError(f"{source}: joined by (video, clip) with {labels}, {mismatches} of {compared} samples "
                        f"({mismatches / compared:.1%}) have a different sentiment in the label file, more than "
                        f"the tolerated {tolerance:.1%}: {why}. Disagreeing (pickle vs label file): "
                        f"{', '.join(disagreeing[:10])}{' ...' if mismatches > 10 else ''}. If the difference is "
                        f"known and harmless, accept it with --emotion_join_tolerance "
                        f"{math.ceil(mismatches / compared * 1000) / 1000:.3f}")


def _key(sample_id: str) -> tuple[str, str]:
    video, clip = split_id(sample_id)
    return video, clip_key(clip)
