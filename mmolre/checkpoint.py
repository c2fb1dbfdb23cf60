"""Checkpoints through DeepSpeed's engine (experts saved per global expert id), made crash-safe.

Every save goes to a new tag (`step00000120`). DeepSpeed writes its files and its `latest` pointer; then
every rank writes its RNG state, all ranks meet at a barrier, and rank 0 writes `mmolre_complete.json`.
Only a tag with that marker counts: a save interrupted anywhere before it (a crash, a SIGKILL, a full
disk) leaves the previous checkpoints untouched, and resuming skips the half-written tag with a warning
that names it. After each save the oldest complete tags beyond `keep` are removed, except the best.

Each save also writes the topology-free copy of the training state (`topology_free_state.py`: every parameter's fp32
weight and AdamW moments per global expert id), which `mmolre export` and a resume under another topology
read.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import socket
import warnings

import numpy as np
import torch

from . import distributed, expert_state_files, topology_free_state
from .config import ConfigError

MARKER = "mmolre_complete.json"
THRESHOLDS = "emotion_thresholds.json"   # beside the selected checkpoint: the emotion decisions chosen on valid
FORMAT = 3   # in the marker: 3 experts in expert_state_rank<r>.pt (banks) or DeepSpeed's files (--grouped_experts
#              false); 2 experts always in DeepSpeed's files; none (earlier versions): weights only
TAG_RE = re.compile(r"^step(\d{8})$")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _tags(ckpt_dir: str) -> list[str]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(t for t in os.listdir(ckpt_dir) if TAG_RE.match(t) and os.path.isdir(os.path.join(ckpt_dir, t)))


def is_complete(ckpt_dir: str, tag: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, tag, MARKER))


def read_marker(ckpt_dir: str, tag: str) -> dict:
    with open(os.path.join(ckpt_dir, tag, MARKER)) as f:
        return json.load(f)


def latest_complete(ckpt_dir: str, warn: bool = True) -> str | None:
    """The newest tag with a completion marker; newer tags without one are named in a warning."""
    tags = _tags(ckpt_dir)
    skipped = []
    for tag in reversed(tags):
        if is_complete(ckpt_dir, tag):
            if skipped and warn:
                warnings.warn(f"skipping incomplete checkpoint(s) {skipped} in {ckpt_dir} (interrupted while "
                              f"saving); resuming from {tag}", stacklevel=2)
            return tag
        skipped.append(tag)
    return None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: str, tag: str, client_state: dict, info, ep_size: int, marker: dict,
         num_experts: int = 0) -> None:
    """Every rank calls this with the same tag. Saving again under a tag first withdraws its marker."""
    rank = info.rank
    if rank == 0:
        withdraw(ckpt_dir, tag)
    distributed.barrier(info)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)
    torch.save(rng_state(), os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt"))
    state = topology_free_state.gather(engine, info)   # a collective: every rank takes part
    if state is not None and state["params"] and rank < ep_size:   # ranks 0..ep-1 hold every expert once
        torch.save(state, os.path.join(ckpt_dir, tag, f"{topology_free_state.PREFIX}{rank}.pt"))
    experts = getattr(engine, "expert_optimizer", None)
    if experts and rank < ep_size:   # the experts in banks: one file per expert-parallel rank
        expert_state_files.write(os.path.join(ckpt_dir, tag), experts, num_experts, ep_size, rank)
    distributed.barrier(info)
    check_shared(os.path.join(ckpt_dir, tag), info)
    if rank == 0:
        path = os.path.join(ckpt_dir, tag, MARKER)
        with open(path + ".tmp", "w") as f:
            json.dump(marker, f)
        os.replace(path + ".tmp", path)
    distributed.barrier(info)


def check_shared(tag_dir: str, info) -> None:
    """Every rank must see every rank's files: a checkpoint written by ranks on several hosts is complete
    only on a file system they share. Raises on every rank (the same answer everywhere), naming who cannot
    see whom, before the tag is marked complete."""
    missing = [r for r in range(info.world_size) if not os.path.isfile(os.path.join(tag_dir, f"rng_rank{r}.pt"))]
    seen = distributed.all_gather((socket.gethostname(), missing), info)
    blind = [f"rank {r} on {host} sees no files of rank(s) {m}" for r, (host, m) in enumerate(seen) if m]
    if blind:
        hosts = sorted({host for host, _ in seen})
        raise ConfigError(f"{tag_dir}: the ranks do not see each other's checkpoint files ({'; '.join(blind[:8])}"
                          f"{' ...' if len(blind) > 8 else ''}). The checkpoint directory (--output_dir) must be on "
                          f"a file system every rank shares (hosts {', '.join(hosts)}), e.g. NFS or Lustre; the "
                          f"checkpoint was not marked complete")


ASIDE = ".before-reshard"


def recover_aside(ckpt_dir: str) -> list[str]:
    """Settle what an interrupted reshard left (it moves a tag aside while it writes the new one): where
    the new tag is complete the old one goes, otherwise the old one comes back. Call on one rank per file
    system before choosing a tag. Returns the tags brought back."""
    restored = []
    for aside in sorted(glob.glob(os.path.join(ckpt_dir, "step*" + ASIDE))):
        tag = os.path.basename(aside)[:-len(ASIDE)]
        if is_complete(ckpt_dir, tag):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
            os.replace(aside, os.path.join(ckpt_dir, tag))
            restored.append(tag)
            warnings.warn(f"{ckpt_dir}/{tag}: a reshard of it was interrupted; the checkpoint as it was before "
                          f"is back", stacklevel=2)
    return restored


def withdraw(ckpt_dir: str, tag: str) -> None:
    """Before a tag is saved again (a stop at an epoch's last step, then the epoch-end save; a reshard): it
    stops counting as complete, then its files go, so none of another topology's (ZeRO partitions, RNG
    states, state files of more ranks) outlives the new save."""
    path = os.path.join(ckpt_dir, tag)
    if os.path.isfile(os.path.join(path, MARKER)):
        os.remove(os.path.join(path, MARKER))
    shutil.rmtree(path, ignore_errors=True)


def load(engine, ckpt_dir: str, tag: str, rank: int, weights_only: bool = False, rng: bool | None = None) -> dict:
    """Load `tag` into the engine (and this rank's RNG state if `rng`, by default unless weights_only); returns
    the client state."""
    path, client_state = engine.load_checkpoint(
        ckpt_dir, tag=tag, load_optimizer_states=not weights_only, load_lr_scheduler_states=not weights_only,
        load_module_only=weights_only)
    if path is None:
        raise FileNotFoundError(f"checkpoint {tag!r} in {ckpt_dir} could not be loaded")
    rng_path = os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt")
    if (not weights_only if rng is None else rng) and os.path.isfile(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False))
    return client_state or {}


def prune(ckpt_dir: str, keep: int, protect: set[str]) -> list[str]:
    """Remove all but the newest `keep` complete tags (never those in `protect`), and incomplete tags older
    than the newest complete one. Call on one rank per file system. Returns the removed tags."""
    tags = _tags(ckpt_dir)
    complete = [t for t in tags if is_complete(ckpt_dir, t)]
    newest = complete[-1] if complete else None
    doomed = [t for t in complete[:-keep] if t not in protect] if keep > 0 else []
    doomed += [t for t in tags if t not in complete and newest and t < newest]
    for tag in doomed:
        shutil.rmtree(os.path.join(ckpt_dir, tag), ignore_errors=True)
    return doomed
