"""Datasets without pickles: `mmolre data convert FILE.pkl OUT_DIR` writes the checked dataset as Arrow files
(the training cache's layout: train/valid/test.arrow and meta.json), which `--data_path OUT_DIR` and
`load_model(...).predict(OUT_DIR)` read directly.

Opening an MMSA pickle runs whatever code the file names. Arrow and JSON are data only, so a converted
dataset is safe to share. A shared directory may still be damaged or edited, so the first run that opens a
version of it checks every value again (shapes, labels, lengths, finite features, the normalisation) and
remembers the result under the cache directory by the files' sizes and times.

`ensure_arrow`/`arrow_dir` are where a source becomes Arrow data: a converted dataset as it is, a pickle through
the cache (cache.py).
"""
from __future__ import annotations

import hashlib
import json
import os

import datasets
import numpy as np

from ..config import EMOTIONS
from .cache import CACHE_FORMAT, WRITE_ROWS, build_cache, cache_path_for, file_sha256, load_cache, write_cache
from .emotions import JOIN_TOLERANCE
from .schema import SPLITS, DataError, where
from ..version import __version__

META = "meta.json"


def is_converted(path: str) -> bool:
    """A directory `convert` wrote (or a training cache): meta.json and one Arrow file per split."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, META))


def ensure_arrow(source: str, cache_dir: str, extra_meta: dict | None = None, emotion_labels: str | None = None,
                 join_tolerance: float = JOIN_TOLERANCE, text_tokens=None) -> str:
    """The Arrow directory of a source, made ready: a converted dataset is checked (once per version of its
    files) and read where it is; a pickle is converted into the cache unless done before."""
    if is_converted(source):
        return open_converted(source, cache_dir, emotion_labels, text_tokens)
    return build_cache(source, cache_dir, extra_meta, emotion_labels, join_tolerance, text_tokens)


def arrow_dir(source: str, cache_dir: str, emotion_labels: str | None = None, text_tokens=None) -> str:
    """Where ensure_arrow left the source's Arrow directory (for the ranks that did not build it)."""
    return source if is_converted(source) else cache_path_for(source, cache_dir, emotion_labels, text_tokens)


def convert(source: str, out_dir: str, emotion_labels: str | None = None,
            join_tolerance: float = JOIN_TOLERANCE) -> dict:
    """The pickle `source`, through the training checks (and the emotion join, if given), as Arrow files in
    `out_dir` (which must not exist or be empty); returns its meta.json."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise DataError(f"{out_dir}: exists and is not empty; convert into a new directory")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"{out_dir}: exists and is a file; convert into a new directory")
    if not os.path.isfile(source):
        raise DataError(f"{source}: no such file")
    os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    write_cache(source, out_dir, file_sha256(source), {"converted_by": f"mmolre {__version__}"}, emotion_labels,
                join_tolerance)
    with open(os.path.join(out_dir, META)) as f:
        return json.load(f)


def open_converted(path: str, cache_dir: str, emotion_labels: str | None = None, text_tokens=None) -> str:
    """Check a converted dataset before training or predicting on it (once per version of its files);
    returns `path`, which is its own cache."""
    if emotion_labels:
        raise DataError(f"--data_path {path}: a converted dataset carries the labels it was converted with; join "
                        f"--emotion_labels when converting (mmolre data convert FILE.pkl OUT --emotion_labels ...)")
    if text_tokens is not None:
        raise DataError(f"--data_path {path}: a converted dataset holds features, not the transcripts that "
                        f"--finetune_text tokenizes; train on the MMSA pickle instead")
    memo = _memo_path(path, cache_dir)
    stamp = _stamp(path)
    try:
        with open(memo) as f:
            if json.load(f) == stamp:
                return path
    except (OSError, ValueError):
        pass
    check_converted(path)
    os.makedirs(os.path.dirname(memo), exist_ok=True)
    tmp = f"{memo}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(stamp, f)
    os.replace(tmp, memo)
    return path


def check_converted(path: str) -> dict:
    """Every value of a converted dataset as the training checks would have left it; returns meta.json.
    Errors name the file, the key and the sample."""
    meta_file = os.path.join(path, META)
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except ValueError as e:
        raise DataError(f"{meta_file}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"{meta_file} [key 'format']: {found!r}, this version reads format {CACHE_FORMAT}; convert "
                        f"the pickle again with this version")
    if meta.get("text_tokens"):
        raise DataError(f"{meta_file} [key 'text_tokens']: a tokenized-transcript cache, not a converted dataset")
    for key in ("modalities", "shapes", "normalisation", "splits"):
        if key not in meta:
            raise DataError(f"{meta_file} [key {key!r}]: missing")
    for s in SPLITS:
        if not os.path.isfile(os.path.join(path, f"{s}.arrow")):
            raise DataError(f"{os.path.join(path, s + '.arrow')}: missing (a converted dataset has {', '.join(SPLITS)})")
    try:
        splits, _ = load_cache(path)
    except Exception as e:   # a truncated or foreign file: say which, not the Arrow reader's internals
        raise DataError(f"{path}: an Arrow file cannot be read ({type(e).__name__}: {e})") from e
    _check_normalisation(meta_file, meta)
    for s in SPLITS:
        _check_split(os.path.join(path, f"{s}.arrow"), s, splits[s], meta)
    return meta


def _check_normalisation(meta_file: str, meta: dict) -> None:
    for m in meta["modalities"]:
        stats = meta["normalisation"].get(m)
        dims = meta["shapes"][m][-1]
        for key in ("mean", "std"):
            values = np.asarray(stats.get(key) if isinstance(stats, dict) else None, dtype=np.float64)
            if values.shape != (dims,) or not np.isfinite(values).all() or (key == "std" and (values <= 0).any()):
                raise DataError(f"{meta_file} [key 'normalisation.{m}.{key}']: expected {dims} finite values"
                                f"{' > 0' if key == 'std' else ''}")


def _check_split(file: str, split: str, hf: datasets.Dataset, meta: dict) -> None:
    expected = {"id", "sentiment", "emotions", "has_emotion", *meta["modalities"],
                *(f"{m}_length" for m in meta["modalities"])}
    missing = sorted(expected - set(hf.column_names))
    if missing:
        raise DataError(f"{where(file, split, missing[0])}: missing (columns: {hf.column_names})")
    for m in meta["modalities"]:
        shape = list(getattr(hf.features[m], "shape", ()))
        if shape != list(meta["shapes"][m]):
            raise DataError(f"{where(file, split, m)}: shape {shape}, meta.json says {meta['shapes'][m]}")
    if len(hf) != meta["splits"][split]["samples"]:
        raise DataError(f"{where(file, split, 'id')}: {len(hf)} samples, meta.json says "
                        f"{meta['splits'][split]['samples']}")
    ids = hf["id"]
    if not ids:
        raise DataError(f"{where(file, split, 'id')}: the split is empty")
    if len(set(ids)) != len(ids):
        seen = set()
        dup = next(i for i in ids if i in seen or seen.add(i))
        raise DataError(f"{where(file, split, 'id', dup)}: duplicate id")
    table = hf.with_format("numpy")
    for start in range(0, len(hf), WRITE_ROWS):
        rows = table[start:start + WRITE_ROWS]
        _check_rows(file, split, rows, ids[start:start + WRITE_ROWS], meta)


def _check_rows(file: str, split: str, rows: dict, ids: list[str], meta: dict) -> None:
    def refuse(key: str, bad: np.ndarray, what: str) -> None:
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where(file, split, key, ids[i])}: {what} ({int(bad.sum())} such samples in this block)")

    sentiment = rows["sentiment"]
    bad = ~np.isfinite(sentiment) | (sentiment < -3) | (sentiment > 3)
    if bad.any():
        refuse("sentiment", bad, "sentiment outside [-3, 3]")
    emotions = np.asarray(rows["emotions"], np.float64).reshape(len(ids), len(EMOTIONS))
    bad = ~np.isfinite(emotions).all(1) | (rows["has_emotion"] & ((emotions < 0) | (emotions > 3)).any(1))
    if bad.any():
        refuse("emotions", bad, "emotion intensities outside [0, 3]")
    for m in meta["modalities"]:
        x = rows[m]
        bad = ~np.isfinite(x).reshape(len(ids), -1).all(1)
        if bad.any():
            refuse(m, bad, "non-finite feature values (conversion replaces them by 0)")
        lengths = rows[f"{m}_length"]
        bad = (lengths < 1) | (lengths > x.shape[1])
        if bad.any():
            refuse(f"{m}_length", bad, f"length outside [1, {x.shape[1]}]")


def _stamp(path: str) -> dict:
    files = [META] + [f"{s}.arrow" for s in SPLITS]
    return {f: [os.stat(os.path.join(path, f)).st_size, os.stat(os.path.join(path, f)).st_mtime_ns] for f in files}


def _memo_path(path: str, cache_dir: str) -> str:
    key = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:24]
    return os.path.join(cache_dir, "checked", key + ".json")
