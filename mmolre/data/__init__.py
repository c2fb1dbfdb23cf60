"""Data: sources (MMSA-schema pickles, the synthetic default) -> Arrow cache -> fixed-shape batches."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from ..config import DataConfig
from .cache import build_cache, cache_path_for, load_cache
from .loader import Batch, SplitDataset, eval_batches, train_loader
from .schema import SPLITS, DataError
from .synthetic import ensure_synthetic


@dataclass
class PreparedData:
    splits: dict[str, SplitDataset]
    meta: dict
    synthetic: bool

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        return {m: self.splits["train"].shapes[m] for m in self.splits["train"].modalities}


def source_path(cfg: DataConfig) -> str:
    if cfg.dataset == "synthetic":
        return ensure_synthetic(cfg.cache_dir, cfg.synthetic_scale)
    if cfg.dataset in ("mmsa", "pickle"):
        if not cfg.data_path or not os.path.isfile(cfg.data_path):
            raise DataError(f"--data_path: no such file {cfg.data_path!r} (an MMSA-schema .pkl)")
        return cfg.data_path
    raise DataError(f"--dataset {cfg.dataset!r}: supported are 'synthetic' and 'mmsa' (an MMSA-schema "
                    f"pickle given by --data_path)")


def prepare(cfg: DataConfig, builds: bool, barrier: Callable[[], None]) -> PreparedData:
    """The rank with `builds` (local rank 0) generates/converts; every rank then memory-maps the cache."""
    error = None
    if builds:
        try:
            build_cache(source_path(cfg), cfg.cache_dir,
                        {"synthetic": cfg.dataset == "synthetic"})
        except Exception as e:  # let the other ranks leave the barrier before failing
            error = e
    barrier()
    if error is not None:
        raise error
    hf, meta = load_cache(cache_path_for(source_path(cfg), cfg.cache_dir))
    missing = [m for m in cfg.modality_list if m not in meta["modalities"]]
    if missing:
        raise DataError(f"{meta['source']}: --modalities asks for {missing}, but the dataset has only "
                        f"{meta['modalities']}")
    splits = {s: SplitDataset(hf[s], cfg.modality_list, meta["normalisation"]) for s in SPLITS}
    return PreparedData(splits, meta, bool(meta.get("synthetic")))


__all__ = ["Batch", "DataError", "PreparedData", "SplitDataset", "eval_batches", "prepare", "train_loader"]
