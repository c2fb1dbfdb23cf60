"""Datasets without pickles: `mmolre data convert FILE.pkl OUT_DIR` writes the checked dataset as Arrow files
(the training cache's layout: train/valid/test.arrow and meta.json), which `--data_path OUT_DIR` and
`load_model(...).predict(OUT_DIR)` read directly.

Opening an MMSA pickle runs whatever code the file names. Arrow and JSON are data only, so a converted
dataset is safe to share. A shared directory may still be damaged or edited, so the first run that opens a
version of it checks it whole (meta.json's structure, the exact Arrow schema, then every value: labels,
lengths, finite features, the normalisation), hashes its files (the run records that digest as the data's
`sha256`, and the pickle's as `converted_from_sha256`) and remembers both under the cache directory, keyed by
the files' identity (size, times, inode) and this version's check. The emotion join's tolerance is checked on
every open, as for a cached pickle.

`ensure_arrow`/`open_arrow` are where a source becomes Arrow data: a converted dataset as it is, a pickle
through the cache (cache.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import datasets
import numpy as np

from ..config import EMOTIONS, MODALITIES
from ..version import __version__
from .cache import (CACHE_FORMAT, WRITE_ROWS, arrow_features, build_cache, cache_path_for, check_cached_join,
                    file_sha256, load_cache, write_cache)
from .emotions import JOIN_TOLERANCE
from .schema import SPLITS, DataError, where

META = "meta.json"
FILES = (META, *(f"{s}.arrow" for s in SPLITS))
CHECK_VERSION = 2   # bump when check_converted checks more: memos of older checks are then not trusted


def is_converted(path: str) -> bool:
    """A directory `convert` wrote (or a training cache): one with a meta.json (its files are checked on open)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, META))


def ensure_arrow(source: str, cache_dir: str, extra_meta: dict | None = None, emotion_labels: str | None = None,
                 join_tolerance: float = JOIN_TOLERANCE, text_tokens=None) -> str:
    """The Arrow directory of a source, made ready: a converted dataset is checked (whole once per version of
    its files) and read where it is; a pickle is converted into the cache unless done before."""
    if is_converted(source):
        return open_converted(source, cache_dir, emotion_labels, text_tokens, join_tolerance)
    return build_cache(source, cache_dir, extra_meta, emotion_labels, join_tolerance, text_tokens)


def open_arrow(source: str, cache_dir: str, emotion_labels: str | None = None,
               text_tokens=None) -> tuple[datasets.DatasetDict, dict]:
    """The splits and meta.json of a source ensure_arrow made ready (every rank may call it). For a converted
    dataset, meta's `source` and `sha256` are the directory read and its files' digest; the pickle it came from
    is `converted_from` / `converted_from_sha256`."""
    if not is_converted(source):
        return load_cache(cache_path_for(source, cache_dir, emotion_labels, text_tokens))
    splits, meta = load_cache(source)
    memo = _read_memo(source, cache_dir) or {}
    return splits, {**meta, "source": os.path.abspath(source), "sha256": memo.get("sha256"),
                    "converted_from": meta.get("source"), "converted_from_sha256": meta.get("sha256")}


def convert(source: str, out_dir: str, emotion_labels: str | None = None,
            join_tolerance: float = JOIN_TOLERANCE) -> dict:
    """The pickle `source`, through the training checks (and the emotion join, if given), as Arrow files in
    `out_dir` (which must not exist, or be an empty directory); returns its meta.json."""
    out_dir = os.path.abspath(out_dir)
    if not os.path.isfile(source):
        raise DataError(f"{source}: no such file")
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise DataError(f"{out_dir}: exists and is not an empty directory; convert into a new directory")
    staging = f"{out_dir}.converting{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    write_cache(source, staging, file_sha256(source), {"converted_by": f"mmolre {__version__}"}, emotion_labels,
                join_tolerance)
    meta_file = os.path.join(staging, META)
    with open(meta_file) as f:
        meta = json.load(f)
    # a file to share: the pickle and label file by name, not by this machine's paths
    meta["source"] = os.path.basename(meta["source"])
    if meta.get("emotion_labels"):
        meta["emotion_labels"]["file"] = os.path.basename(meta["emotion_labels"]["file"])
    with open(meta_file, "w") as f:
        json.dump(meta, f, indent=1)
    try:
        if os.path.isdir(out_dir):   # an empty directory (the current one, a mount point) keeps itself:
            for name in FILES[1:] + FILES[:1]:   # the files move in, meta.json (what marks a dataset) last
                os.rename(os.path.join(staging, name), os.path.join(out_dir, name))
            os.rmdir(staging)
        else:
            os.rename(staging, out_dir)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"{out_dir}: cannot put the converted dataset there ({e})") from e
    return meta


def open_converted(path: str, cache_dir: str, emotion_labels: str | None = None, text_tokens=None,
                   join_tolerance: float = JOIN_TOLERANCE) -> str:
    """Check a converted dataset before training or predicting on it (whole once per version of its files,
    the emotion join's tolerance every time); returns `path`, which is its own cache."""
    if emotion_labels:
        raise DataError(f"{path}: a converted dataset carries the labels it was converted with; join "
                        f"--emotion_labels when converting (mmolre data convert FILE.pkl OUT --emotion_labels ...)")
    if text_tokens is not None:
        raise DataError(f"{path}: a converted dataset holds features, not the transcripts that --finetune_text "
                        f"tokenizes; use the MMSA pickle for a model that reads transcripts")
    _require_files(path)
    stamp = _stamp(path)
    memo = _read_memo(path, cache_dir)
    if memo is None or memo.get("stamp") != stamp:
        check_converted(path)
        _write_memo(path, cache_dir, {"stamp": stamp, "sha256": _digest(path)})
    check_cached_join(path, path, join_tolerance)
    return path


def check_converted(path: str) -> dict:
    """Every value of a converted dataset as the training checks would have left it; returns meta.json.
    Errors name the file, the key and the sample."""
    _require_files(path)
    meta_file = os.path.join(path, META)
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except ValueError as e:
        raise DataError(f"{meta_file}: not valid JSON ({e})") from e
    _check_meta(meta_file, meta)
    splits = {}
    for s in SPLITS:
        file = os.path.join(path, f"{s}.arrow")
        try:
            splits[s] = datasets.Dataset.from_file(file, in_memory=False)
        except Exception as e:   # a truncated or foreign file: say which, not the Arrow reader's internals
            raise DataError(f"{file}: not a readable Arrow dataset ({type(e).__name__}: {e})") from e
    expected = arrow_features({m: tuple(meta["shapes"][m]) for m in meta["modalities"]}, None)
    for s in SPLITS:   # exactly the columns and types the trainer reads, before any value is decoded
        file = os.path.join(path, f"{s}.arrow")
        if splits[s].features != expected:
            raise DataError(f"{file}: its columns {dict(splits[s].features)} are not those meta.json's shapes "
                            f"give {dict(expected)}")
        _check_split(file, s, splits[s], meta)
    return meta


def _check_meta(meta_file: str, meta) -> None:
    def refuse(key: str, what: str) -> None:
        raise DataError(f"{meta_file} [key {key!r}]: {what}")
    if not isinstance(meta, dict):
        refuse("", f"expected an object, got {type(meta).__name__}")
    if meta.get("format") != CACHE_FORMAT:
        refuse("format", f"{meta.get('format')!r}, this version reads format {CACHE_FORMAT}; convert the pickle "
                         f"again with this version")
    if meta.get("text_tokens"):
        refuse("text_tokens", "a tokenized-transcript cache, not a converted dataset")
    modalities = meta.get("modalities")
    if not isinstance(modalities, list) or not modalities or not set(modalities) <= set(MODALITIES):
        refuse("modalities", f"{modalities!r}; expected a non-empty list among {list(MODALITIES)}")
    for m in modalities:
        shape = (meta.get("shapes") or {}).get(m)
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
            refuse(f"shapes.{m}", f"{shape!r}; expected [time steps, features]")
        stats = (meta.get("normalisation") or {}).get(m)
        if not isinstance(stats, dict):
            refuse(f"normalisation.{m}", "missing")
        for key in ("mean", "std"):
            try:
                values = np.asarray(stats.get(key), dtype=np.float64)
            except (TypeError, ValueError):
                values = np.zeros(0)
            if values.shape != (shape[1],) or not np.isfinite(values).all() or (key == "std" and (values <= 0).any()):
                refuse(f"normalisation.{m}.{key}", f"expected {shape[1]} finite values{' > 0' if key == 'std' else ''}")
        if not (isinstance(stats.get("count"), int) and stats["count"] > 0):
            refuse(f"normalisation.{m}.count", f"{stats.get('count')!r}; expected a positive count")
    for s in SPLITS:
        samples = ((meta.get("splits") or {}).get(s) or {}).get("samples")
        if not (isinstance(samples, int) and samples > 0):
            refuse(f"splits.{s}.samples", f"{samples!r}; expected a positive count")


def _check_split(file: str, split: str, hf: datasets.Dataset, meta: dict) -> None:
    if len(hf) != meta["splits"][split]["samples"]:
        raise DataError(f"{where(file, split, 'id')}: {len(hf)} samples, meta.json says "
                        f"{meta['splits'][split]['samples']}")
    ids = hf["id"][:]   # the column at once: iterating `hf["id"]` formats it row by row
    seen = set()
    for sid in ids:
        if sid in seen:
            raise DataError(f"{where(file, split, 'id', sid)}: duplicate id")
        seen.add(sid)
    table = hf.with_format("numpy")
    for start in range(0, len(hf), WRITE_ROWS):
        _check_rows(file, split, table[start:start + WRITE_ROWS], ids[start:start + WRITE_ROWS], meta)


def _check_rows(file: str, split: str, rows: dict, ids: list[str], meta: dict) -> None:
    def refuse(key: str, bad: np.ndarray, what: str) -> None:
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where(file, split, key, ids[i])}: {what}")

    sentiment = rows["sentiment"]
    bad = ~np.isfinite(sentiment) | (sentiment < -3) | (sentiment > 3)
    if bad.any():
        refuse("sentiment", bad, f"sentiment {sentiment[np.flatnonzero(bad)[0]]} outside [-3, 3]")
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
            refuse(f"{m}_length", bad, f"length {lengths[np.flatnonzero(bad)[0]]} outside [1, {x.shape[1]}]")


def _require_files(path: str) -> None:
    for name in FILES:
        if not os.path.isfile(os.path.join(path, name)):
            raise DataError(f"{os.path.join(path, name)}: missing (a converted dataset has {', '.join(FILES)})")


def _stamp(path: str) -> dict:
    """The identity of this version of the files, and of the check that passed them."""
    def identity(name: str) -> list[int]:
        st = os.stat(os.path.join(path, name))
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return {"format": CACHE_FORMAT, "check": CHECK_VERSION, "files": {f: identity(f) for f in FILES}}


def _digest(path: str) -> str:
    """SHA-256 over the files, in a fixed order (what results.json records as the data's sha256)."""
    h = hashlib.sha256()
    for name in FILES:
        h.update(f"{name}\0{file_sha256(os.path.join(path, name))}\0".encode())
    return h.hexdigest()


def _memo_path(path: str, cache_dir: str) -> str:
    key = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:24]
    return os.path.join(cache_dir, "checked", key + ".json")


def _read_memo(path: str, cache_dir: str) -> dict | None:
    try:
        with open(_memo_path(path, cache_dir)) as f:
            memo = json.load(f)
        return memo if isinstance(memo, dict) else None
    except (OSError, ValueError):
        return None


def _write_memo(path: str, cache_dir: str, memo: dict) -> None:
    target = _memo_path(path, cache_dir)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(memo, f)
    os.replace(tmp, target)
