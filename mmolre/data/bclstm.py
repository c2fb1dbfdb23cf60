"""`mmolre bclstm`: the released bc-LSTM unimodal MOSI features -> a trimodal dataset in the MMSA schema.

`shared/data/real/mosi/mosi_bclstm_unimodal_50d.npz` (see its SOURCE.md) holds Poria et al.'s learned 50-d
utterance features of text, audio and video for all 2,199 MOSI segments: keys `ids` (`<video>_<clip>`),
`text`, `audio`, `video` ([N, 50]), `poria_split` (train/test), `binary_label_ge0`. The unimodal networks that
made them were trained on *their* split (62 train, 31 test videos), and 24 of the standard split's 31 test
videos are in poria's train, so with the standard split the test labels would leak into the features. This
writes poria's split only: its test videos as test, its train videos divided by video into train and valid
(`dev_fraction` of them, shuffled with `split_seed`), so that choices made on valid never see a test video.

The labels are the real-valued sentiment of the label table (`mosi_labels.csv`), joined by id; the npz's own
binary labels must agree with their sign. Each modality becomes one time step (`[N, 1, 50]`; the npz's
`video` is the schema's `vision`), with its length (1) beside it. Nothing is dropped: an id missing from the
table, a disagreeing binary label or a non-finite value is an error naming the file, key and sample.
"""
from __future__ import annotations

import hashlib
import os
import random

import numpy as np

from .featurize import read_label_table
from .schema import ID_SEPARATOR, SPLITS, DataError, write_dataset

MODALITY_KEYS = {"text": "text", "audio": "audio", "vision": "video"}   # schema name -> npz key
DIM = 50


def read_npz(path: str) -> dict[str, np.ndarray]:
    """The npz's arrays, checked (allow_pickle off: a shared file cannot run code)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    arrays = {}
    with np.load(path, allow_pickle=False) as f:
        for key in f.files:
            try:
                arrays[key] = f[key]
            except ValueError as e:   # an object array: loading it would unpickle
                raise DataError(f"{path} [key '{key}']: {e}") from None
    for key in ("ids", "poria_split", "binary_label_ge0", *MODALITY_KEYS.values()):
        if key not in arrays:
            raise DataError(f"{path} [key '{key}']: missing (keys present: {sorted(arrays)})")
    n = len(arrays["ids"])
    for key in MODALITY_KEYS.values():
        x = arrays[key]
        if x.shape != (n, DIM):
            raise DataError(f"{path} [key '{key}']: shape {x.shape}, expected ({n}, {DIM})")
        bad = ~np.isfinite(x).all(1)
        if bad.any():
            raise DataError(f"{path} [key '{key}', sample '{arrays['ids'][bad.argmax()]}']: non-finite values "
                            f"({int(bad.sum())} sample(s))")
    ids = [str(i) for i in arrays["ids"]]
    if len(set(ids)) != n:
        raise DataError(f"{path} [key 'ids']: {n - len(set(ids))} duplicate id(s)")
    unknown = sorted(set(str(s) for s in arrays["poria_split"]) - {"train", "test"})
    if unknown:
        raise DataError(f"{path} [key 'poria_split']: values {unknown}; expected train or test")
    return arrays


def convert(npz: str, labels: str, out: str, dev_fraction: float = 0.2, split_seed: int = 0) -> dict:
    """Write `out` (an MMSA-schema pickle, three modalities of one step); returns its `config` entry."""
    if not 0 < dev_fraction < 1:
        raise DataError(f"--dev_fraction must be in (0, 1), got {dev_fraction}")
    arrays = read_npz(npz)
    table = {f"{r.video}_{r.clip}": r for r in read_label_table(labels)}
    ids = [str(i) for i in arrays["ids"]]
    rows = []
    for i, sample in enumerate(ids):
        if sample not in table:
            raise DataError(f"{npz} [key 'ids', sample '{sample}']: not in the label table {labels}")
        row = table[sample]
        if int(row.sentiment >= 0) != int(arrays["binary_label_ge0"][i]):
            raise DataError(f"{npz} [key 'binary_label_ge0', sample '{sample}']: {arrays['binary_label_ge0'][i]}, "
                            f"but the label table's sentiment is {row.sentiment} ({labels}, line {row.line})")
        rows.append((i, row))
    split_of = {"test": [], "train": []}
    for i, row in rows:
        split_of[str(arrays["poria_split"][i])].append((i, row))
    both = {r.video for _, r in split_of["train"]} & {r.video for _, r in split_of["test"]}
    if both:   # poria's split is by video: a video on both sides would leak
        raise DataError(f"{npz} [key 'poria_split']: videos with clips in both train and test: {sorted(both)[:5]}")
    videos = sorted({row.video for _, row in split_of["train"]})
    random.Random(split_seed).shuffle(videos)
    dev = set(videos[:max(1, round(dev_fraction * len(videos)))])
    parts = {"train": [(i, r) for i, r in split_of["train"] if r.video not in dev],
             "valid": [(i, r) for i, r in split_of["train"] if r.video in dev], "test": split_of["test"]}
    data: dict = {}
    for split in SPLITS:
        index = np.array([i for i, _ in parts[split]], dtype=np.int64)
        d = {"id": np.array([f"{r.video}{ID_SEPARATOR}{r.clip}" for _, r in parts[split]]),
             "regression_labels": np.array([r.sentiment for _, r in parts[split]], np.float32)}
        for name, key in MODALITY_KEYS.items():
            d[name] = arrays[key][index][:, None, :].astype(np.float32)
            d[f"{name}_lengths"] = np.ones(len(index), np.int64)
        data[split] = d
    with open(npz, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    report = {"npz": os.path.abspath(npz), "npz_sha256": digest, "labels": os.path.abspath(labels),
              "split": "poria (train divided by video into train and valid)", "dev_fraction": dev_fraction,
              "split_seed": split_seed, "valid_videos": sorted(dev),
              "samples": {s: len(parts[s]) for s in SPLITS},
              "videos": {s: len({r.video for _, r in parts[s]}) for s in SPLITS}}
    data["config"] = {"bclstm": report}
    write_dataset(data, out)
    return report
