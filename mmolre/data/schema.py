"""The MMSA pickle schema this project reads, and the checks every source goes through.

An MMSA file is `{'train'|'valid'|'test': {key: array with samples on axis 0}}`. The keys used here:
`text`, `audio`, `vision` (float [N, T, F]; a dataset may have any non-empty subset), optional
`audio_lengths`/`vision_lengths` (unaligned files) and `text_lengths` (our extension, written by `mmolre featurize`),
`text_bert` ([N, 3, T]: token ids, attention mask, segment ids; MMSA's files carry no `text_lengths`, so the
text's valid steps are its attention mask `text_bert[:, 1]`, and in aligned files, whose audio and vision are
aligned to those tokens, the same mask holds for them),
`id` ("video$_$clip", str or bytes), `regression_labels` (sentiment in [-3, 3]) and our extension
`emotion_labels` (float [N, 6] intensities in [0, 3], order EMOTIONS; absent or NaN rows = no labels).
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field

import numpy as np

from ..config import EMOTIONS, MODALITIES

SPLITS = ("train", "valid", "test")
ID_SEPARATOR = "$_$"
EMOTION_KEY = "emotion_labels"
LENGTH_KEYS = {"text": "text_lengths", "audio": "audio_lengths", "vision": "vision_lengths"}


class DataError(ValueError):
    """Bad input data; the message names the file, split, key and, where it applies, the sample."""


def where(path: str, split: str, key: str, sample: str | None = None) -> str:
    loc = f"{path} [split '{split}', key '{key}'"
    return loc + (f", sample '{sample}']" if sample is not None else "]")


def write_dataset(data: dict, out: str) -> None:
    """An MMSA-schema dict to `out` (a pickle: the field's format), written whole before it replaces any file
    there, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        pickle.dump(data, f, protocol=4)
    os.replace(tmp, out)


def decode_id(raw) -> str:
    return raw.decode("utf-8") if isinstance(raw, (bytes, np.bytes_)) else str(raw)


def split_id(sample_id: str) -> tuple[str, str]:
    """'video$_$clip' -> (video, clip); an id without the separator is its own video."""
    video, sep, clip = sample_id.partition(ID_SEPARATOR)
    return (video, clip) if sep else (sample_id, "")


@dataclass
class SplitReport:
    """What loading a split found and changed: reported to the user, written next to the cache."""
    samples: int = 0
    nonfinite_replaced: dict[str, int] = field(default_factory=dict)
    with_emotions: int = 0
    lengths_from: dict[str, str] = field(default_factory=dict)   # modality -> where its valid lengths came from


def check_split(path: str, split: str, data: dict, modalities: list[str]) -> SplitReport:
    """Validate one split in place; replaces non-finite feature values by 0 and counts them."""
    if not isinstance(data, dict):
        raise DataError(f"{path} [split '{split}']: expected a dict of arrays, got {type(data).__name__}")
    for key in ("id", "regression_labels", *modalities):
        if key not in data:
            raise DataError(f"{where(path, split, key)}: missing (keys present: {sorted(data)})")
    ids = _check_ids(path, split, data)
    report = SplitReport(samples=len(ids))
    _check_sentiment(path, split, data, ids)
    for m in modalities:
        _check_features(path, split, data, m, ids, report)
    _lengths_from_text_mask(path, split, data, modalities, ids, report)
    if EMOTION_KEY in data:
        report.with_emotions = _check_emotions(path, split, data, ids)
    return report


def _count_ok(path: str, split: str, key: str, arr: np.ndarray, n: int) -> None:
    if arr.shape[0] != n:
        raise DataError(f"{where(path, split, key)}: {arr.shape[0]} samples but 'id' has {n}")


def _check_ids(path: str, split: str, data: dict) -> list[str]:
    """The split's ids as strings; refused if empty or duplicated."""
    ids = [decode_id(x) for x in np.asarray(data["id"]).reshape(-1)]
    if not ids:
        raise DataError(f"{where(path, split, 'id')}: the split is empty")
    seen: dict[str, int] = {}
    for i, sid in enumerate(ids):
        if sid in seen:
            raise DataError(f"{where(path, split, 'id', sid)}: duplicate id (rows {seen[sid]} and {i})")
        seen[sid] = i
    return ids


def _check_sentiment(path: str, split: str, data: dict, ids: list[str]) -> None:
    n = len(ids)
    labels = np.asarray(data["regression_labels"], dtype=np.float64)
    _count_ok(path, split, "regression_labels", labels, n)
    if labels.size != n:  # [N] or [N, 1] as MMSA writes it; anything wider is not one sentiment per sample
        raise DataError(f"{where(path, split, 'regression_labels')}: expected one sentiment per sample, got "
                        f"shape {labels.shape}")
    labels = labels.reshape(n)
    bad = np.flatnonzero(~np.isfinite(labels) | (labels < -3) | (labels > 3))
    if bad.size:
        i = bad[0]
        raise DataError(f"{where(path, split, 'regression_labels', ids[i])}: sentiment {labels[i]} outside "
                        f"[-3, 3] ({bad.size} such samples)")


def _check_features(path: str, split: str, data: dict, m: str, ids: list[str], report: SplitReport) -> None:
    """One modality: [samples, time, features] floats with lengths in range; non-finite values replaced by 0."""
    arr = np.asarray(data[m])
    _count_ok(path, split, m, arr, len(ids))
    if arr.ndim != 3:
        raise DataError(f"{where(path, split, m)}: expected [samples, time, features], got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{where(path, split, m)}: expected floating features, got {arr.dtype}")
    nonfinite = ~np.isfinite(arr)
    if nonfinite.any():
        # MMSA's audio carries -inf (COVAREP); MMSA itself zeroes it. We do the same and say so.
        report.nonfinite_replaced[m] = int(nonfinite.sum())
        arr = np.where(nonfinite, 0.0, arr).astype(arr.dtype)
        data[m] = arr
    lkey = LENGTH_KEYS.get(m)
    if lkey in data:
        lengths = np.asarray(data[lkey]).reshape(-1)
        _count_ok(path, split, lkey, lengths, len(ids))
        bad = np.flatnonzero((lengths < 1) | (lengths > arr.shape[1]))
        if bad.size:
            i = bad[0]
            raise DataError(f"{where(path, split, lkey, ids[i])}: length {lengths[i]} outside [1, {arr.shape[1]}]")


def _check_emotions(path: str, split: str, data: dict, ids: list[str]) -> int:
    """Six intensities in [0, 3] per labelled sample, all NaN for an unlabelled one; returns the labelled count."""
    emo = np.asarray(data[EMOTION_KEY], dtype=np.float64)
    _count_ok(path, split, EMOTION_KEY, emo, len(ids))
    if emo.ndim != 2 or emo.shape[1] != len(EMOTIONS):
        raise DataError(f"{where(path, split, EMOTION_KEY)}: expected [samples, {len(EMOTIONS)}] "
                        f"({', '.join(EMOTIONS)}), got shape {emo.shape}")
    missing = np.isnan(emo)
    partial = np.flatnonzero(missing.any(1) & ~missing.all(1))
    if partial.size:  # a row is labelled (6 values) or not (all NaN); anything else is ambiguous
        i = partial[0]
        raise DataError(f"{where(path, split, EMOTION_KEY, ids[i])}: some but not all six intensities are "
                        f"NaN ({emo[i].tolist()}); a sample without emotion labels has all six NaN")
    labelled = ~missing.all(1)
    bad = np.flatnonzero(labelled & ((emo < 0).any(1) | (emo > 3).any(1)))
    if bad.size:
        i = bad[0]
        raise DataError(f"{where(path, split, EMOTION_KEY, ids[i])}: intensities {emo[i].tolist()} "
                        f"outside [0, 3] ({bad.size} such samples)")
    return int(labelled.sum())


def _lengths_from_text_mask(path: str, split: str, data: dict, modalities: list[str], ids: list[str],
                            report: SplitReport) -> None:
    """MMSA files: the text's lengths from its attention mask `text_bert[:, 1]` (in place, as `text_lengths`),
    and the same lengths for audio and vision of an aligned file (no lengths of their own, same steps)."""
    for m in modalities:
        if LENGTH_KEYS[m] in data:
            report.lengths_from[m] = LENGTH_KEYS[m]
    if "text" not in modalities or "text_lengths" in data or "text_bert" not in data:
        return
    tokens = np.asarray(data["text_bert"])
    steps = np.asarray(data["text"]).shape[1]
    if tokens.ndim != 3 or tokens.shape[0] != len(ids) or tokens.shape[1] != 3 or tokens.shape[2] != steps:
        raise DataError(f"{where(path, split, 'text_bert')}: expected [samples, 3 (ids, mask, segments), {steps}] "
                        f"like 'text', got shape {tokens.shape}")
    mask = tokens[:, 1, :]
    bad = np.flatnonzero(~np.isin(mask, (0, 1)).all(1))
    if bad.size:
        raise DataError(f"{where(path, split, 'text_bert', ids[bad[0]])}: the attention mask (row 1) holds "
                        f"{sorted(set(np.unique(mask[bad[0]]).tolist()))}, expected 0/1")
    lengths = mask.sum(1).astype(np.int64)
    # valid steps must come first (the model's masks are prefixes); a mask with holes cannot be kept as lengths
    prefix = mask == (np.arange(steps)[None, :] < lengths[:, None])
    bad = np.flatnonzero(~prefix.all(1) | (lengths < 1))
    if bad.size:
        i = bad[0]
        raise DataError(f"{where(path, split, 'text_bert', ids[i])}: the attention mask (row 1) is "
                        f"{mask[i].astype(int).tolist()}; expected 1s for the first tokens then 0s ({bad.size} such "
                        f"samples)")
    data["text_lengths"] = lengths
    report.lengths_from["text"] = "text_bert[:, 1] (attention mask)"
    past = np.arange(steps)[None, :] >= lengths[:, None]          # [N, T] steps after each text's tokens
    for m in ("audio", "vision"):
        if m not in modalities or LENGTH_KEYS[m] in data:
            continue
        arr = np.asarray(data[m])
        if arr.shape[1] != steps:
            report.lengths_from[m] = "none: every step counts (no lengths, not aligned to the text)"
        elif np.any(arr[past] != 0):   # an aligned file pads with zeros; anything else is not that layout
            report.lengths_from[m] = ("none: every step counts (same steps as the text, but features past the "
                                      "text's tokens are not zero padding)")
        else:
            data[LENGTH_KEYS[m]] = lengths
            report.lengths_from[m] = "text_bert[:, 1] (aligned to the text tokens, zero-padded past them)"


def check_dataset(path: str, data: dict, modalities: list[str]) -> dict[str, SplitReport]:
    """Validate all splits; feature dims and lengths must agree across splits."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a dict with splits {SPLITS}, got {type(data).__name__}")
    missing = [s for s in SPLITS if s not in data]
    if missing:
        raise DataError(f"{path}: missing split(s) {missing} (found {sorted(k for k in data if k != 'config')})")
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise DataError(f"{path}: unknown modalities {unknown}")
    reports = {s: check_split(path, s, data[s], modalities) for s in SPLITS}
    for m in modalities:
        dims = {s: np.asarray(data[s][m]).shape[1:] for s in SPLITS}
        if len(set(dims.values())) > 1:
            raise DataError(f"{path} [key '{m}']: [time, features] differ across splits: {dims}")
    return reports
