"""`mmolre data inspect` (what a pickle holds) and `mmolre data verify` (is it the file MMSA published)."""
from __future__ import annotations

import os

import numpy as np

from ..config import EMOTIONS
from .cache import load_pickle, file_sha256
from .schema import EMOTION_KEY, LENGTH_KEYS, SPLITS, DataError, decode_id

# SHA-256 of the feature files as published in the MMSA README (thuiar/MMSA, "2. Datasets").
MMSA_SHA256 = {
    "78e0f8b5ef8ff71558e7307848fc1fa929ecb078203f565ab22b9daab2e02524": "MOSI/Processed/unaligned_50.pkl",
    "d3994fd25681f9c7ad6e9c6596a6fe9b4beb85ff7d478ba978b124139002e5f9": "MOSI/Processed/aligned_50.pkl",
    "ad8b23d50557045e7d47959ce6c5b955d8d983f2979c7d9b7b9226f6dd6fec1f": "MOSEI/Processed/unaligned_50.pkl",
    "45eccfb748a87c80ecab9bfac29582e7b1466bf6605ff29d3b338a75120bf791": "MOSEI/Processed/aligned_50.pkl",
    "c9e20c13ec0454d98bb9c1e520e490c75146bfa2dfeeea78d84de047dbdd442f": "SIMS/Processed/unaligned_39.pkl",
}


def verify(path: str) -> tuple[str, str | None]:
    """(sha256, the MMSA file it is, or None)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    digest = file_sha256(path)
    return digest, MMSA_SHA256.get(digest)


def inspect(path: str) -> str:
    """A plain-text description: splits, sizes, every array's shape and dtype, labels, non-finite counts. A
    dataset `mmolre data convert` wrote is checked whole (no pickle is opened) and summarised from meta.json."""
    from .converted import check_converted, is_converted
    if is_converted(path):
        meta = check_converted(path)
        lines = [f"{path}  (a converted dataset, format {meta['format']}, {meta.get('converted_by', 'a cache')}; "
                 f"every value checked)", f"  converted from {meta['source']} (sha256 {meta['sha256']})"]
        for split in SPLITS:
            r = meta["splits"][split]
            lines.append(f"  {split}: {r['samples']} samples, {r['with_emotions']} with emotion labels"
                         + (f"; non-finite values replaced by 0 at conversion: {r['nonfinite_replaced']}"
                            if r["nonfinite_replaced"] else ""))
        lines += [f"    {m:<8} [samples, {', '.join(map(str, meta['shapes'][m]))}] float32" for m in meta["modalities"]]
        return "\n".join(lines)
    if os.path.isdir(path):
        raise DataError(f"{path}: a directory without meta.json (give the pickle, or a dataset `mmolre data "
                        f"convert` wrote)")
    data = load_pickle(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a dict with splits {SPLITS}, got {type(data).__name__}")
    lines = [f"{path}  ({os.path.getsize(path):,} bytes)"]
    extra = [k for k in data if k not in SPLITS]
    if extra:
        lines.append(f"  other top-level keys: {extra}")
    for split in SPLITS:
        d = data.get(split)
        if not isinstance(d, dict):
            lines.append(f"  {split}: MISSING" if d is None else f"  {split}: not a dict ({type(d).__name__})")
            continue
        n = len(d["id"]) if "id" in d else None
        lines.append(f"  {split}: {n if n is not None else '?'} samples")
        for key in sorted(d):
            arr = np.asarray(d[key])
            desc = f"    {key:<24} {str(arr.shape):<18} {arr.dtype}"
            if np.issubdtype(arr.dtype, np.floating):
                bad = {"nan": int(np.isnan(arr).sum()), "+inf": int(np.isposinf(arr).sum()),
                       "-inf": int(np.isneginf(arr).sum())}
                bad = {k: v for k, v in bad.items() if v}
                if bad:
                    desc += "  non-finite: " + ", ".join(f"{k} {v:,}" for k, v in bad.items())
            lines.append(desc)
        if "regression_labels" in d:
            y = np.asarray(d["regression_labels"], np.float64).reshape(-1)
            lines.append(f"    sentiment: mean {np.nanmean(y):+.3f}, std {np.nanstd(y):.3f}, range "
                         f"[{np.nanmin(y):+.2f}, {np.nanmax(y):+.2f}], positive {(y > 0).sum()}, negative "
                         f"{(y < 0).sum()}, zero {(y == 0).sum()}")
        if EMOTION_KEY in d:
            e = np.asarray(d[EMOTION_KEY], np.float64)
            labelled = ~np.isnan(e).any(1)
            present = (e[labelled] > 0).mean(0) if labelled.any() else np.zeros(e.shape[1])
            lines.append(f"    emotions: {labelled.sum()} labelled; present in " + ", ".join(
                f"{name} {p:.0%}" for name, p in zip(EMOTIONS, present)))
        lines += _valid_lengths(d)
        if "id" in d and len(d["id"]):
            ids = [decode_id(x) for x in np.asarray(d["id"]).reshape(-1)[:2]]
            lines.append(f"    ids like {ids}")
    return "\n".join(lines)


def _valid_lengths(d: dict) -> list[str]:
    """The distribution of valid time steps per modality, from its lengths or (text, and aligned audio and
    vision) MMSA's attention mask text_bert[:, 1]; what training uses as each sample's mask."""
    out = []
    mask_lengths = None
    if "text_bert" in d and np.asarray(d["text_bert"]).ndim == 3:
        mask_lengths = np.asarray(d["text_bert"])[:, 1, :].sum(1)
    for m, key in LENGTH_KEYS.items():
        if m not in d:
            continue
        steps = np.asarray(d[m]).shape[1]
        if key in d:
            lengths, how = np.asarray(d[key]).reshape(-1), key
        elif mask_lengths is not None and steps == np.asarray(d["text_bert"]).shape[2]:
            lengths, how = mask_lengths, "text_bert[:, 1]"
        else:
            lengths, how = np.full(len(d[m]), steps), "no lengths: every step counts"
        q = np.percentile(lengths, [0, 25, 50, 75, 100])
        out.append(f"    valid {m} steps ({how}): min {q[0]:.0f}, quartiles {q[1]:.0f} / {q[2]:.0f} / {q[3]:.0f}, "
                   f"max {q[4]:.0f} of {steps}; mean {np.mean(lengths):.1f}")
    return out
