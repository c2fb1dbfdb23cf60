"""Which files a run reads: `--dataset` names (one, or several joined by '+') and their `--data_path`s.

    --dataset synthetic                                  the embedded default (generated on first use)
    --dataset mosi --data_path MOSI/Processed             a directory: its aligned_50.pkl (--alignment)
    --dataset mosei --data_path unaligned_50.pkl --emotion_labels CMU_MOSEI_Labels.csd
    --dataset mosi+mosei --data_path A.pkl,B_dir          one path per dataset, in the same order
    --dataset mosi --data_path mosi_arrow/                a dataset `mmolre data convert` wrote (no pickle)

'mosi', 'mosei' and 'mmsa' (any other MMSA-schema pickle) read the same format; the name labels the
dataset in mixed runs and decides where `--emotion_labels` go (the MOSEI sources, or the only source).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import DataConfig
from .schema import DataError
from .synthetic import ensure_synthetic

MMSA_NAMES = ("mosi", "mosei", "mmsa")
NAMES = ("synthetic",) + MMSA_NAMES


@dataclass(frozen=True)
class Source:
    name: str
    path: str                            # an MMSA-schema pickle, or a converted dataset's directory
    emotion_labels: str | None = None    # joined onto it by (video, clip)


def dataset_names(cfg: DataConfig) -> list[str]:
    names = [n.strip() for n in cfg.dataset.split("+")]
    for n in names:
        if n not in NAMES:
            raise DataError(f"--dataset {cfg.dataset!r}: unknown dataset {n!r}; choose from {', '.join(NAMES)} "
                            f"(several joined by '+')")
    if len(set(names)) != len(names):
        raise DataError(f"--dataset {cfg.dataset!r}: a dataset is named twice")
    return names


def resolve_sources(cfg: DataConfig) -> list[Source]:
    names = dataset_names(cfg)
    mmsa = [n for n in names if n != "synthetic"]
    paths = [p.strip() for p in cfg.data_path.split(",")] if cfg.data_path else []
    if len(paths) != len(mmsa):
        raise DataError(f"--data_path: {len(mmsa)} dataset(s) need a path ({', '.join(mmsa) or 'none'}), got "
                        f"{len(paths)} ({cfg.data_path!r}); give one per dataset, comma-separated, in order")
    by_name = dict(zip(mmsa, paths))
    # emotion labels go to MOSEI, or to the only dataset when it is an MMSA pickle of another name
    emotion_targets = [n for n in names if n == "mosei"] or (mmsa if len(names) == 1 else [])
    if cfg.emotion_labels:
        if not emotion_targets:
            raise DataError(f"--emotion_labels: joined onto MOSEI (or onto a single MMSA dataset); "
                            f"--dataset {cfg.dataset!r} has none")
        if not os.path.isfile(cfg.emotion_labels):
            raise DataError(f"--emotion_labels: no such file {cfg.emotion_labels!r}")
    sources = []
    for n in names:
        if n == "synthetic":
            sources.append(Source(n, ensure_synthetic(cfg.cache_dir, cfg.synthetic_scale)))
        else:
            sources.append(Source(n, mmsa_file(by_name[n], cfg.alignment),
                                  cfg.emotion_labels if n in emotion_targets else None))
    return sources


def mmsa_file(path: str, alignment: str) -> str:
    """A pickle as given, a dataset `mmolre data convert` wrote (a directory with meta.json), or MMSA's file
    inside a dataset directory (also under its Processed/)."""
    from .converted import is_converted
    if os.path.isfile(path) or is_converted(path):
        return path
    if not os.path.isdir(path):
        raise DataError(f"--data_path: no such file or directory {path!r}")
    name = f"{alignment}_50.pkl"
    for candidate in (os.path.join(path, name), os.path.join(path, "Processed", name)):
        if os.path.isfile(candidate):
            return candidate
    found = sorted(f for f in os.listdir(path) if f.endswith(".pkl"))
    raise DataError(f"--data_path {path!r}: no {name} in it or in its Processed/ (--alignment {alignment}); "
                    f"pickles there: {found or 'none'}")
