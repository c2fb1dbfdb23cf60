"""MMSA-schema pickles, SDK label files and tables with the real files quirks, written by the tests themselves."""
import pickle

import h5py
import numpy as np

from mmolre.config import DataConfig
from mmolre.data import prepare

SIZES = {"train": 12, "valid": 4, "test": 6}
# MOSI's feature sizes (audio 5, vision 20; unaligned 375/500 steps scaled down); text kept small.
DIMS = {"text": 16, "audio": 5, "vision": 20}


def mmsa_split(split: str, n: int, rng, aligned=True, bytes_ids=False, videos=3, base=0, emotions=False):
    t = {"text": 8, "audio": 8 if aligned else 15, "vision": 8 if aligned else 20}
    ids = [f"vid{split}{i % videos}$_${i // videos + base}" for i in range(n)]
    d = {"id": np.array([i.encode() for i in ids]) if bytes_ids else np.array(ids, dtype=object),
         "raw_text": np.array([f"utterance {i}" for i in range(n)]),
         "regression_labels": np.round(rng.uniform(-3, 3, n) * 3) / 3,
         "annotations": np.array(["Positive"] * n),
         "classification_labels": np.ones(n),
         "text_bert": np.zeros((n, 3, t["text"]), np.int64)}
    tokens = rng.integers(2, t["text"] + 1, n)   # MMSA: ids, attention mask (1s then 0s), segments
    d["text_bert"][:, 0] = rng.integers(100, 30000, (n, t["text"])) * (np.arange(t["text"]) < tokens[:, None])
    d["text_bert"][:, 1] = np.arange(t["text"]) < tokens[:, None]
    for m, dim in DIMS.items():
        d[m] = rng.normal(size=(n, t[m], dim)).astype(np.float32)
        if aligned and m != "text":   # aligned files pad audio and vision with zeros past the text's tokens
            d[m][np.arange(t[m])[None, :] >= tokens[:, None]] = 0.0
    d["audio"][0, 0, :2] = -np.inf   # as in MMSA's COVAREP features
    if not aligned:
        d["audio_lengths"] = rng.integers(1, t["audio"] + 1, n)
        d["vision_lengths"] = rng.integers(1, t["vision"] + 1, n)
    if emotions:
        d["emotion_labels"] = rng.uniform(0, 3, (n, 6)).astype(np.float32)
    return d


def mmsa(aligned=True, bytes_ids=False, seed=0, **kw):
    rng = np.random.default_rng(seed)
    return {s: mmsa_split(s, n, rng, aligned, bytes_ids, **kw) for s, n in SIZES.items()}


def dump(path, data):
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return str(path)


def prepared(tmp_path, **kw):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"), **kw)
    return prepare(cfg, builds=True, barrier=lambda: None)


def csd(path, labels: dict[str, np.ndarray], root="All Labels"):
    with h5py.File(path, "w") as f:
        for video, feats in labels.items():
            g = f.create_group(f"{root}/data/{video}")
            g["features"] = feats
            g["intervals"] = np.c_[np.arange(len(feats)), np.arange(len(feats)) + 1.0]
        f.create_group(f"{root}/metadata")
    return str(path)


def sdk_labels_for(raw: dict, skip: str | None = None) -> dict[str, np.ndarray]:
    """[sentiment, happy, sad, anger, surprise, disgust, fear] per segment, segment k = clip k."""
    rows: dict[str, dict[int, np.ndarray]] = {}
    for split in raw:
        for sid, y in zip(raw[split]["id"], raw[split]["regression_labels"]):
            video, clip = str(sid).split("$_$")
            if sid == skip:
                continue
            emo = np.arange(6) / 2 + int(clip) / 10   # distinct per emotion and clip, within [0, 3]
            rows.setdefault(video, {})[int(clip)] = np.r_[y, emo]
    return {v: np.stack([clips[k] for k in sorted(clips)]) for v, clips in rows.items()}
