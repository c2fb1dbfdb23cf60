"""Data: sources (MMSA-schema pickles, the synthetic default) -> Arrow caches -> fixed-shape batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import datasets
import numpy as np

from ..config import MODALITIES, DataConfig
from .converted import ensure_arrow, open_arrow
from .loader import Batch, SplitDataset, eval_batches, train_loader
from .schema import SPLITS, DataError
from .tokens import TextTokens
from .sources import Source, resolve_sources


@dataclass
class PreparedData:
    splits: dict[str, SplitDataset]
    sources: dict[str, dict]          # dataset name -> its cache's meta.json
    modalities: list[str]
    normalisation: dict
    synthetic: bool

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m: self.splits["train"].shapes[m] for m in self.modalities}

    @property
    def names(self) -> list[str]:
        return list(self.sources)


def prepare(cfg: DataConfig, builds: bool, barrier: Callable[[], None],
            text_tokens: TextTokens | None = None) -> PreparedData:
    """The rank with `builds` (local rank 0) generates/converts; every rank then memory-maps the caches.
    With `text_tokens` the text is the tokenized transcripts, for an encoder trained inside the model."""
    error = None
    if builds:
        try:
            for src in resolve_sources(cfg):
                ensure_arrow(src.path, cfg.cache_dir, {"synthetic": src.name == "synthetic"}, src.emotion_labels,
                            cfg.emotion_join_tolerance, text_tokens)
        except Exception as e:  # let the other ranks leave the barrier before failing
            error = e
    barrier()
    if error is not None:
        raise error
    loaded = [(src, *open_arrow(src.path, cfg.cache_dir, src.emotion_labels, text_tokens))
              for src in resolve_sources(cfg)]
    modalities = choose_modalities(cfg, loaded)
    token_text = text_tokens is not None and "text" in modalities
    columns = ["id", "sentiment", "emotions", "has_emotion",
               *(("text_ids" if m == "text" and token_text else m) for m in modalities),
               *(("text_length" if m == "text" and token_text else f"{m}_length") for m in modalities)]
    normalisation = pooled_normalisation(loaded, [m for m in modalities if not (m == "text" and token_text)])
    if token_text:
        text_tokens.check()
    hidden = text_tokens.hidden_size() if token_text else None
    splits = {}
    for s in SPLITS:
        parts = [hf[s].select_columns(columns) for _, hf, _ in loaded]
        joined = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        splits[s] = SplitDataset(joined, modalities, normalisation,
                                 [(src.name, len(p)) for (src, _, _), p in zip(loaded, parts)], hidden)
    return PreparedData(splits, {src.name: meta for src, _, meta in loaded}, modalities, normalisation,
                        any(meta.get("synthetic") for _, _, meta in loaded))


def describe_source(name: str, meta: dict, used: list[str], text_encoder: str | None = None) -> str:
    """One log paragraph per dataset: what was read, what is used, and everything validation changed."""
    sizes = " / ".join(str(meta["splits"][s]["samples"]) for s in SPLITS)
    lines = [f"data: {name}: {meta['source']} ({sizes} train/valid/test); modalities "
             + ", ".join(f"{m} {tuple(meta['shapes'][m])}" + ("" if m in used else " (unused)")
                         for m in meta["modalities"])]
    tok = meta.get("text_tokens")
    if tok:
        cut = ", ".join(f"{s} {tok['truncated'][s]}" for s in SPLITS)
        lines.append(f"data: {name}: text: transcripts tokenized for {text_encoder} (at most {tok['max_length']} "
                     f"tokens; transcripts cut to that length: {cut})")
    for split in SPLITS:
        rep = meta["splits"][split]
        derived = {m: how for m, how in rep.get("lengths_from", {}).items() if how.startswith("text_bert")}
        if derived and split == "train":
            lines.append(f"data: {name}: valid time steps from " + ", ".join(f"{m}: {how}" for m, how in derived.items()))
        if rep["nonfinite_replaced"]:
            lines.append(f"data: {name}: {split}: replaced non-finite feature values with 0: "
                         f"{rep['nonfinite_replaced']}")
    emo = {s: meta["splits"][s]["with_emotions"] for s in SPLITS}
    if meta.get("emotion_labels"):
        lines.append(f"data: {name}: emotion labels joined from {meta['emotion_labels']['file']}: "
                     f"{meta['emotion_labels']['summary']}")
    elif not any(emo.values()):
        lines.append(f"data: {name}: no emotion labels (sentiment only)")
    return "\n".join(lines)


def choose_modalities(cfg: DataConfig, loaded: list[tuple[Source, object, dict]]) -> list[str]:
    """--modalities among those every dataset has (default: all of them), with equal shapes across datasets."""
    have = {src.name: meta["modalities"] for src, _, meta in loaded}
    common = [m for m in MODALITIES if all(m in mods for mods in have.values())]
    wanted = cfg.modality_list or common
    for m in wanted:
        lacking = [name for name, mods in have.items() if m not in mods]
        if lacking:
            raise DataError(f"--modalities asks for {m!r}, which {', '.join(lacking)} lack(s): "
                            + "; ".join(f"{src.name} ({src.path}) has {have[src.name]}" for src, _, _ in loaded))
    if not wanted:
        raise DataError("the datasets share no modality: " + "; ".join(f"{n} has {v}" for n, v in have.items()))
    for m in wanted:
        shapes = {src.name: meta["shapes"][m] for src, _, meta in loaded}
        if len({tuple(v) for v in shapes.values()}) > 1:
            raise DataError(f"modality {m!r} has a different [time, features] shape per dataset {shapes}; mixed "
                            f"datasets train on modalities of equal shape (choose them with --modalities)")
    return [m for m in MODALITIES if m in wanted]


def pooled_normalisation(loaded, modalities: list[str]) -> dict:
    """Per-feature mean/std over the train splits of all datasets together (one set, so an exported model
    needs no dataset name)."""
    if len(loaded) == 1:
        return {m: loaded[0][2]["normalisation"][m] for m in modalities}
    out = {}
    for m in modalities:
        stats = [meta["normalisation"][m] for _, _, meta in loaded]
        n = np.array([s["count"] for s in stats], np.float64)[:, None]
        mean = np.array([s["mean"] for s in stats])
        second = np.array([s["std"] for s in stats]) ** 2 + mean ** 2
        pooled_mean = (n * mean).sum(0) / n.sum()
        std = np.sqrt(np.maximum((n * second).sum(0) / n.sum() - pooled_mean ** 2, 0))
        out[m] = {"mean": pooled_mean.tolist(), "std": np.where(std > 1e-8, std, 1.0).tolist(),
                  "count": int(n.sum())}
    return out


__all__ = ["Batch", "DataError", "PreparedData", "SplitDataset", "describe_source", "eval_batches", "prepare",
           "train_loader"]
