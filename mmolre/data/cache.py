"""Convert an MMSA-schema pickle (and emotion labels joined onto it, if given) once into a Hugging Face
`datasets` Arrow cache, memory-mapped by every rank.

The cache directory is keyed by the SHA-256 of the source file (and of the emotion label file), so a
changed file gets a new cache and an unchanged one is never converted twice. Ranks on a node share the
Arrow files through the page cache instead of each holding an unpickled copy. Beside the Arrow data,
`meta.json` records the feature shapes, the per-feature normalisation statistics of the train split, the
emotion join's report, and what validation replaced.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import shutil

import datasets
import numpy as np
from datasets.arrow_writer import ArrowWriter

from ..config import EMOTIONS, MODALITIES
from .emotions import JOIN_TOLERANCE, check_join, join_emotions, read_emotion_labels
from .schema import EMOTION_KEY, LENGTH_KEYS, SPLITS, DataError, check_dataset, check_split, decode_id
from .tokens import TextTokens, tokenize, transcripts

CACHE_FORMAT = 4   # 4: lengths from MMSA's text_bert attention mask (a format-3 cache counted padding as valid)
WRITE_ROWS = 512   # rows per Arrow record batch: conversion holds the pickle plus one batch, not a 2nd copy


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def known_sha256(path: str, cache_dir: str) -> str:
    """file_sha256, remembered under cache_dir per (path, size, mtime): the rank that converts hashes a
    multi-GB pickle once and the other ranks (and later runs) read the result instead of the whole file."""
    st = os.stat(path)
    stamp = {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = os.path.join(cache_dir, "sha256", hashlib.sha256(stamp["path"].encode()).hexdigest()[:24] + ".json")
    try:
        with open(memo) as f:
            known = json.load(f)
        if {k: known.get(k) for k in stamp} == stamp:
            return known["sha256"]
    except (OSError, ValueError):
        pass
    digest = file_sha256(path)
    os.makedirs(os.path.dirname(memo), exist_ok=True)
    tmp = f"{memo}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({**stamp, "sha256": digest}, f)
    os.replace(tmp, memo)
    return digest


def cache_path_for(source: str, cache_dir: str, emotion_labels: str | None = None,
                   text_tokens: TextTokens | None = None) -> str:
    key = known_sha256(source, cache_dir)[:24]
    if emotion_labels:
        key += "-emo" + known_sha256(emotion_labels, cache_dir)[:12]
    if text_tokens:
        key += "-tok" + text_tokens.key()
    return os.path.join(cache_dir, "arrow", f"{key}-f{CACHE_FORMAT}")


def load_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
        raise DataError(f"{path}: not a readable MMSA pickle ({type(e).__name__}: {e})") from e


def arrow_features(shapes: dict[str, tuple[int, int]], token_steps: int | None) -> datasets.Features:
    spec = {"id": datasets.Value("string"), "sentiment": datasets.Value("float32"),
            "emotions": datasets.Sequence(datasets.Value("float32"), length=len(EMOTIONS)),
            "has_emotion": datasets.Value("bool")}
    for m, shape in shapes.items():
        spec[m] = datasets.Array2D(shape=shape, dtype="float32")
        spec[f"{m}_length"] = datasets.Value("int32")
    if token_steps:   # the text as token ids for an encoder inside the model, instead of features
        spec["text_ids"] = datasets.Sequence(datasets.Value("int32"), length=token_steps)
        spec["text_length"] = datasets.Value("int32")
    return datasets.Features(spec)


def _split_columns(data: dict, modalities: list[str]) -> dict:
    n = len(data["id"])
    cols = {"id": [decode_id(x) for x in np.asarray(data["id"]).reshape(-1)],
            "sentiment": np.asarray(data["regression_labels"], np.float32).reshape(n)}
    emo = np.asarray(data[EMOTION_KEY], np.float32) if EMOTION_KEY in data else np.full((n, 6), np.nan, np.float32)
    has = ~np.isnan(emo).any(1)
    cols["emotions"] = np.where(has[:, None], emo, 0.0).astype(np.float32)
    cols["has_emotion"] = has
    for m in modalities:
        arr = np.asarray(data[m], np.float32)
        cols[m] = arr
        lkey = LENGTH_KEYS.get(m)
        cols[f"{m}_length"] = (np.asarray(data[lkey]).reshape(-1).astype(np.int32) if lkey in data
                               else np.full(n, arr.shape[1], np.int32))
    return cols


def in_memory_split(arrays: dict, modalities: list[str], where: str = "arrays") -> datasets.Dataset:
    """Arrays laid out as one split of the MMSA schema (the modalities [N, T, F]; optional `id`,
    `<modality>_lengths`, `regression_labels`, `emotion_labels`) as the Arrow split the loader reads, in
    memory, after the schema's checks: what the training cache would hold for them."""
    missing = [m for m in modalities if m not in arrays]
    if missing:
        raise DataError(f"{where}: missing modalities {missing} (the model reads {modalities})")
    n = len(arrays[modalities[0]])
    data = {"id": np.array([str(i) for i in range(n)]), "regression_labels": np.zeros(n, np.float32),
            **{k: np.array(v, copy=True) for k, v in arrays.items()}}
    check_split(where, "predict", data, modalities)   # shapes, lengths, ids; non-finite values -> 0 (counted)
    cols = _split_columns(data, modalities)
    shapes = {m: tuple(cols[m].shape[1:]) for m in modalities}
    return datasets.Dataset.from_dict(cols, features=arrow_features(shapes, None))


def _normalisation(train: dict, modalities: list[str]) -> dict:
    """Per-feature mean and std over the valid time steps of the train split (and their count, so the
    statistics of several datasets can be pooled); accumulated in chunks to keep memory flat."""
    stats = {}
    for m in modalities:
        x, lengths = train[m], train[f"{m}_length"]
        total = np.zeros(x.shape[2])
        squares = np.zeros(x.shape[2])
        count = 0
        for start in range(0, len(x), WRITE_ROWS):
            chunk = x[start:start + WRITE_ROWS]
            valid = np.arange(x.shape[1])[None, :] < lengths[start:start + WRITE_ROWS, None]
            flat = chunk[valid].astype(np.float64)
            total += flat.sum(0)
            squares += (flat ** 2).sum(0)
            count += flat.shape[0]
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean ** 2, 0.0))
        stats[m] = {"mean": mean.tolist(), "std": np.where(std > 1e-8, std, 1.0).tolist(), "count": int(count)}
    return stats


def build_cache(source: str, cache_dir: str, extra_meta: dict | None = None,
                emotion_labels: str | None = None, join_tolerance: float = JOIN_TOLERANCE,
                text_tokens: TextTokens | None = None) -> str:
    """Convert `source` (an MMSA-schema pickle) unless its cache exists; returns the cache directory.
    With `emotion_labels` (an SDK .csd or a CSV table), the six intensities are joined by (video, clip), and
    refused if more than `join_tolerance` of the joined clips disagree on the sentiment. With `text_tokens`,
    the text is the transcripts (`raw_text`) tokenized for that encoder, and no text features are stored."""
    target = cache_path_for(source, cache_dir, emotion_labels, text_tokens)
    if os.path.exists(os.path.join(target, "meta.json")):
        check_cached_join(source, target, join_tolerance)
        return target
    write_cache(source, target, known_sha256(source, cache_dir), extra_meta, emotion_labels, join_tolerance,
                text_tokens)
    return target


def write_cache(source: str, target: str, sha256: str, extra_meta: dict | None = None,
                emotion_labels: str | None = None, join_tolerance: float = JOIN_TOLERANCE,
                text_tokens: TextTokens | None = None) -> None:
    """Read, check and convert the pickle `source` into the Arrow directory `target` (written beside it, then
    renamed into place, so a reader never sees half of it)."""
    raw = load_pickle(source)
    if not isinstance(raw, dict):
        raise DataError(f"{source}: expected a dict with splits {SPLITS}, got {type(raw).__name__}")
    modalities = [m for m in MODALITIES if isinstance(raw.get("train"), dict) and m in raw["train"]]
    if not modalities and not text_tokens:
        raise DataError(f"{source} [split 'train']: none of the modality keys {MODALITIES} is present")
    reports = check_dataset(source, raw, modalities)   # first: the join relies on valid ids and splits
    join = None
    if emotion_labels:  # the reader has range-checked every joined row; no second pass over the features
        join = join_emotions(source, raw, read_emotion_labels(emotion_labels), join_tolerance)
        for split, matched in join.matched.items():
            reports[split].with_emotions = matched
    tokens = _tokenize_transcripts(source, raw, text_tokens, reports) if text_tokens else None
    if tokens:   # the transcripts replace the text features (checked above, not stored)
        modalities = [m for m in modalities if m != "text"]
    columns = {s: _split_columns(raw[s], modalities) for s in SPLITS}
    del raw
    shapes = {m: tuple(columns["train"][m].shape[1:]) for m in modalities}
    token_meta = None
    if tokens:
        for s, (ids, lengths, _) in tokens.items():
            columns[s]["text_ids"], columns[s]["text_length"] = ids, lengths
        token_meta = {"max_length": text_tokens.max_length, "truncated": {s: int(t[2]) for s, t in tokens.items()}}
    tmp = f"{target.rstrip(os.sep)}.tmp{os.getpid()}"
    _write_arrow(tmp, columns, arrow_features(shapes, text_tokens.max_length if text_tokens else None))
    meta = _meta(source, sha256, shapes, token_meta, join, emotion_labels, columns["train"], modalities, reports)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump({**meta, **(extra_meta or {})}, f, indent=1)
    try:
        os.replace(tmp, target)
    except OSError:  # another node on a shared file system finished first
        shutil.rmtree(tmp, ignore_errors=True)


def check_cached_join(source: str, target: str, join_tolerance: float) -> None:
    """A cache joined under a higher --emotion_join_tolerance is checked again against this one."""
    with open(os.path.join(target, "meta.json")) as f:
        join = json.load(f).get("emotion_labels")
    if join and "compared" in join:
        check_join(source, join["file"], join["sentiment_mismatches"], join["compared"],
                   join.get("disagreeing", []), join_tolerance)


def _tokenize_transcripts(source: str, raw: dict, text_tokens: TextTokens, reports: dict) -> dict:
    """{split: (ids, lengths, truncated)} of the transcripts, tokenized for the encoder inside the model."""
    text_tokens.check()
    # a copy: tokenizing changes a tokenizer's truncation/padding state, which is part of its key
    tokenizer = copy.deepcopy(text_tokens.tokenizer())
    tokens = {s: tokenize(transcripts(source, s, raw[s]), tokenizer, text_tokens.max_length) for s in SPLITS}
    for s in SPLITS:
        reports[s].lengths_from["text"] = f"the attention mask of {text_tokens.encoder}'s tokenizer"
    return tokens


def _write_arrow(directory: str, columns: dict, features: datasets.Features) -> None:
    """Stream each split in record batches straight into the files every rank will memory-map."""
    os.makedirs(directory, exist_ok=True)
    for s in SPLITS:
        writer = ArrowWriter(features=features, path=os.path.join(directory, f"{s}.arrow"))
        n = len(columns[s]["id"])
        for start in range(0, n, WRITE_ROWS):
            writer.write_batch({k: v[start:start + WRITE_ROWS] for k, v in columns[s].items()})
        writer.finalize()


def _meta(source, sha256, shapes, token_meta, join, emotion_labels, train, modalities, reports) -> dict:
    """meta.json: where the data came from, its shapes, the train split's normalisation, what validation did."""
    all_shapes = {m: list(v) for m, v in shapes.items()}
    if token_meta:   # token ids; their width is the encoder's, which the cache does not fix (module docstring)
        all_shapes = {"text": [token_meta["max_length"]], **all_shapes}
    return {"source": os.path.abspath(source), "sha256": sha256, "format": CACHE_FORMAT,
            "modalities": [m for m in MODALITIES if m in all_shapes], "shapes": all_shapes,
            "text_tokens": token_meta,
            "emotion_labels": None if join is None else {
                "file": os.path.abspath(emotion_labels), "matched": join.matched,
                "unmatched": join.unmatched, "sentiment_mismatches": join.sentiment_mismatches,
                "compared": join.compared, "disagreeing": join.disagreeing,
                "summary": join.summary()},
            "normalisation": _normalisation(train, modalities),
            "splits": {s: {"samples": r.samples, "with_emotions": r.with_emotions,
                           "nonfinite_replaced": r.nonfinite_replaced, "lengths_from": r.lengths_from}
                       for s, r in reports.items()}}


def load_cache(target: str) -> tuple[datasets.DatasetDict, dict]:
    """Memory-map a built cache; returns the splits and meta.json."""
    with open(os.path.join(target, "meta.json")) as f:
        meta = json.load(f)
    splits = {s: datasets.Dataset.from_file(os.path.join(target, f"{s}.arrow"), in_memory=False) for s in SPLITS}
    return datasets.DatasetDict(splits), meta
