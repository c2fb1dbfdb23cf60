"""The embedded default dataset: synthetic, MOSEI-like, in the MMSA pickle schema.

It has MOSEI's split proportions (16326 / 1871 / 4659, scaled by `scale`), several clips per video with
videos never crossing splits, sentiment labels on the 1/3 grid of three averaged raters (so some are
exactly 0, which Has0 and Non0 metrics treat differently), six emotion intensities in [0, 3], and `-inf`
in the audio as in MMSA's COVAREP features. Audio and vision have MOSEI's feature sizes (74, 35); text
features are 64-d instead of BERT's 768 to keep the default run small.

The planted signal: each utterance has a latent sentiment s and six emotion latents correlated with s.
Every modality carries a fixed linear image of these latents at a random ~third of its time steps, on top
of unit noise and a per-video offset; text carries it most strongly, audio and vision more weakly.
The labels add rater noise the features cannot explain, so no model reaches zero error.
None of its numbers say anything about accuracy on real data.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..config import EMOTIONS
from .schema import ID_SEPARATOR, write_dataset

VERSION = 2
MOSEI_SPLITS = {"train": 16326, "valid": 1871, "test": 4659}
SEQ_LEN = 50
FEATURE_DIMS = {"text": 64, "audio": 74, "vision": 35}
SIGNAL = {"text": 0.55, "audio": 0.3, "vision": 0.25}   # signal amplitude per carrying step; noise std 1
SIGNAL_STEP_FRACTION = 0.3
RATER_NOISE = 0.35          # labels = latents + annotation noise the features cannot explain
CLIPS_PER_VIDEO = 7
# How each emotion's latent leans on sentiment (the rest is its own noise), and its presence threshold.
EMOTION_LOADING = {"happy": 0.8, "sad": -0.7, "anger": -0.5, "surprise": 0.15, "disgust": -0.55, "fear": -0.3}
EMOTION_THRESHOLD = {"happy": -0.2, "sad": 0.3, "anger": 0.6, "surprise": 0.9, "disgust": 0.6, "fear": 1.0}


def split_sizes(scale: float) -> dict[str, int]:
    return {s: max(16, int(round(n * scale))) for s, n in MOSEI_SPLITS.items()}


def file_name(scale: float) -> str:
    return f"synthetic_mosei_v{VERSION}_scale{scale:g}.pkl"


def _third_grid(x: np.ndarray) -> np.ndarray:
    return np.round(x * 3.0) / 3.0


@dataclass
class Labels:
    video_of: np.ndarray     # [n] video index of each clip (sorted)
    n_videos: int
    sentiment: np.ndarray    # [n] rated, on the 1/3 grid
    emotions: np.ndarray     # [n, 6] rated intensities
    latents: np.ndarray      # [n, 7] what the features carry: the sentiment and emotion latents


def _labels(rng: np.random.Generator, n: int) -> Labels:
    n_videos = -(-n // CLIPS_PER_VIDEO)
    video_of = np.sort(rng.integers(0, n_videos, size=n))
    video_mood = rng.normal(0.0, 0.8, size=n_videos)
    sentiment_latent = video_mood[video_of] + rng.normal(0.0, 1.2, size=n)
    rated = sentiment_latent + rng.normal(0.0, RATER_NOISE, size=n)
    sentiment = np.clip(_third_grid(rated), -3, 3) + 0.0  # + 0.0 turns -0.0 into 0.0

    emotion_latent = np.stack([EMOTION_LOADING[e] * sentiment_latent + rng.normal(0.0, 0.8, size=n)
                               for e in EMOTIONS], 1)
    thresholds = np.array([EMOTION_THRESHOLD[e] for e in EMOTIONS])
    rated_emotions = emotion_latent + rng.normal(0.0, RATER_NOISE, size=emotion_latent.shape)
    emotions = np.clip(_third_grid(np.maximum(rated_emotions - thresholds, 0.0)), 0, 3)
    return Labels(video_of, n_videos, sentiment, emotions,
                  np.concatenate([sentiment_latent[:, None], emotion_latent], 1))


def _ids_and_labels(labels: Labels, split: str, video_offset: int) -> dict:
    """The MMSA keys besides the features: ids (video$_$clip), transcripts, labels."""
    clip_of = np.zeros(len(labels.video_of), dtype=int)
    for v in np.unique(labels.video_of):
        idx = np.flatnonzero(labels.video_of == v)
        clip_of[idx] = np.arange(len(idx))
    ids = np.array([f"synth{split[:2]}{video_offset + v:05d}{ID_SEPARATOR}{c}"
                    for v, c in zip(labels.video_of, clip_of)], dtype=object)
    s = labels.sentiment
    return {"id": ids, "raw_text": np.array([f"synthetic utterance {i}" for i in ids], dtype=object),
            "regression_labels": s.astype(np.float32),
            "annotations": np.where(s > 0, "Positive", np.where(s < 0, "Negative", "Neutral")),
            "classification_labels": (np.sign(s) + 1).astype(np.float32)}


def _generate_split(rng: np.random.Generator, n: int, split: str, video_offset: int,
                    projections: dict[str, np.ndarray]) -> dict:
    labels = _labels(rng, n)
    video_of, n_videos, latents = labels.video_of, labels.n_videos, labels.latents
    data = {}
    for m, dim in FEATURE_DIMS.items():
        carries = rng.random((n, SEQ_LEN)) < SIGNAL_STEP_FRACTION
        signal = (latents @ projections[m])[:, None, :] * carries[:, :, None] * SIGNAL[m]
        offsets = rng.normal(0.0, 0.5, size=(n_videos, dim))[video_of][:, None, :]
        data[m] = (signal + offsets + rng.normal(0.0, 1.0, size=(n, SEQ_LEN, dim))).astype(np.float32)
    # COVAREP-like quirks: a few dims on a large scale, and -inf where the pitch tracker failed.
    data["audio"][:, :, :5] *= 100.0
    data["audio"][rng.random(data["audio"].shape) < 0.002] = -np.inf

    data.update(_ids_and_labels(labels, split, video_offset))
    data["emotion_labels"] = labels.emotions.astype(np.float32)
    return data


def generate(scale: float, seed: int = 0) -> dict:
    """The full dataset as an MMSA-schema dict; the same (scale, seed) gives the same bytes."""
    rng = np.random.default_rng(seed)
    projections = {m: rng.normal(0.0, 1.0, size=(1 + len(EMOTIONS), dim)) / np.sqrt(1 + len(EMOTIONS))
                   for m, dim in FEATURE_DIMS.items()}
    out = {"config": {"synthetic": True, "version": VERSION, "scale": scale, "seed": seed}}
    offset = 0
    for split, n in split_sizes(scale).items():
        out[split] = _generate_split(rng, n, split, offset, projections)
        offset += n
    return out


def ensure_synthetic(cache_dir: str, scale: float) -> str:
    """Write the synthetic pickle under cache_dir once (atomically) and return its path."""
    path = os.path.join(cache_dir, "synthetic", file_name(scale))
    if not os.path.exists(path):
        write_dataset(generate(scale), path)
    return path


# ---- synthetic data shaped like MMSA's real files (`mmolre synthetic --like NAME`) ---------------------

@dataclass(frozen=True)
class Like:
    """The shapes of one of MMSA's files (field-data-formats reference, section 1a)."""
    splits: dict
    steps: dict            # modality -> time steps T
    dims: dict             # modality -> feature size F
    aligned: bool          # audio/vision on the text's tokens (zero past them); else own lengths


_MOSI, _MOSEI = {"train": 1284, "valid": 229, "test": 686}, {"train": 16326, "valid": 1871, "test": 4659}
LIKE = {
    "mosi-aligned": Like(_MOSI, {"text": 50, "audio": 50, "vision": 50}, {"text": 768, "audio": 5, "vision": 20}, True),
    "mosi-unaligned": Like(_MOSI, {"text": 50, "audio": 375, "vision": 500}, {"text": 768, "audio": 5, "vision": 20},
                           False),
    "mosei-aligned": Like(_MOSEI, {"text": 50, "audio": 50, "vision": 50}, {"text": 768, "audio": 74, "vision": 35},
                          True),
    "mosei-unaligned": Like(_MOSEI, {"text": 50, "audio": 500, "vision": 500},
                            {"text": 768, "audio": 74, "vision": 35}, False),
}
TOKENS_MEAN, TOKENS_STD = 18.0, 8.0   # BERT tokens per MOSI/MOSEI utterance (with [CLS]/[SEP]), roughly


def _valid_steps(rng: np.random.Generator, n: int, t: int, mean: float, std: float, low: int) -> np.ndarray:
    return np.clip(np.round(rng.normal(mean, std, n)), low, t).astype(np.int64)


def generate_like(name: str, scale: float = 1.0, seed: int = 0) -> dict:
    """A dataset with the keys, shapes, dtypes, split sizes (times `scale`), lengths and quirks of one of
    MMSA's files: `text` [N, 50, 768] with `text_bert` [N, 3, 50] (ids, attention mask, segments), audio
    with `-inf`, unaligned files with `audio_lengths`/`vision_lengths` and zero padding past them, aligned
    ones with audio/vision zero past the text's tokens; the text past its tokens is the mean of its tokens'
    states plus a little noise, as BERT's states at [PAD] tokens carry the sentence. No emotion labels (MMSA's
    files have none). The planted signal is the default dataset's, at a random ~third of each utterance's valid
    steps."""
    if name not in LIKE:
        raise ValueError(f"--like {name!r}: choose from {', '.join(LIKE)}")
    like = LIKE[name]
    rng = np.random.default_rng(seed)
    projections = {m: rng.normal(0.0, 1.0, size=(1 + len(EMOTIONS), dim)).astype(np.float32) / np.sqrt(1 + len(EMOTIONS))
                   for m, dim in like.dims.items()}
    out = {"config": {"synthetic": True, "like": name, "version": VERSION, "scale": scale, "seed": seed}}
    offset = 0
    for split, size in like.splits.items():
        n = max(16, int(round(size * scale)))
        labels = _labels(rng, n)
        tokens = _valid_steps(rng, n, like.steps["text"], TOKENS_MEAN, TOKENS_STD, 3)
        data = _ids_and_labels(labels, split, offset)
        bert = np.zeros((n, 3, like.steps["text"]), np.int64)
        valid_text = np.arange(like.steps["text"])[None, :] < tokens[:, None]
        bert[:, 0] = np.where(valid_text, rng.integers(1000, 30000, valid_text.shape), 0)
        bert[:, 0, 0], bert[np.arange(n), 0, tokens - 1] = 101, 102      # [CLS] ... [SEP]
        bert[:, 1] = valid_text
        data["text_bert"] = bert
        for m, t in like.steps.items():
            if m == "text" or like.aligned:
                lengths = tokens
            else:   # MMSA-FET pads each modality to mean + 3 std of its lengths: most steps are padding
                lengths = _valid_steps(rng, n, t, t / 2.5, (t - t / 2.5) / 3, 4)   # mean + 3 std = T
                data[f"{m}_lengths"] = lengths
            valid = np.arange(t)[None, :] < lengths[:, None]
            carries = (rng.random((n, t), dtype=np.float32) < SIGNAL_STEP_FRACTION) & valid
            x = rng.standard_normal((n, t, like.dims[m]), dtype=np.float32)
            x += rng.normal(0.0, 0.5, size=(labels.n_videos, like.dims[m])).astype(np.float32)[labels.video_of][:, None]
            x += (labels.latents.astype(np.float32) @ projections[m])[:, None, :] * carries[..., None] * SIGNAL[m]
            if m == "text":   # BERT's states at [PAD] tokens attend to the sentence: its mean, plus a little noise
                mean = (x * valid[..., None]).sum(1) / lengths[:, None]
                noise = rng.standard_normal(x.shape, dtype=np.float32)   # in place: MOSEI's text is 2.5 GB
                noise *= 0.1
                noise += mean[:, None, :]
                x[~valid] = noise[~valid]
                del noise
            else:             # zero padding past the valid steps
                x *= valid[..., None]
            data[m] = x.astype(np.float32, copy=False)
        data["audio"][..., :min(2, like.dims["audio"])] *= 100.0
        data["audio"][(rng.random(data["audio"].shape, dtype=np.float32) < 0.002) & (data["audio"] != 0)] = -np.inf
        data["audio"][0, 0, 0] = -np.inf   # at least one, however small the file
        out[split] = data
        offset += n
    return out
