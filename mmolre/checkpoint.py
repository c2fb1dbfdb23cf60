"""Checkpoints through DeepSpeed's engine (experts saved per global expert id), kept as latest + best."""
from __future__ import annotations

import os
import shutil


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def latest_tag(ckpt_dir: str) -> str | None:
    path = os.path.join(ckpt_dir, "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return f.read().strip() or None


def save(engine, ckpt_dir: str, tag: str, client_state: dict) -> None:
    """Every rank must call this with the same tag; DeepSpeed writes `latest` after the save."""
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)


def load(engine, ckpt_dir: str, tag: str | None = None, weights_only: bool = False) -> dict:
    """Load `tag` (default: latest) into the engine; returns the client state saved with it."""
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (no 'latest' file)")
    path, client_state = engine.load_checkpoint(
        ckpt_dir, tag=tag, load_optimizer_states=not weights_only, load_lr_scheduler_states=not weights_only,
        load_module_only=weights_only)
    if path is None:
        raise FileNotFoundError(f"checkpoint {tag!r} in {ckpt_dir} could not be loaded")
    return client_state or {}


def prune(ckpt_dir: str, keep: set[str]) -> None:
    """Remove every tag directory but `keep` (call on one rank per file system)."""
    if not os.path.isdir(ckpt_dir):
        return
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if os.path.isdir(path) and name not in keep:
            shutil.rmtree(path, ignore_errors=True)
