"""Checkpoints through DeepSpeed's engine (experts saved per global expert id), made crash-safe.

Every save goes to a new tag (`step00000120`). DeepSpeed writes its files and its `latest` pointer; then
every rank writes its RNG state, all ranks meet at a barrier, and rank 0 writes `mmolre_complete.json`.
Only a tag with that marker counts: a save interrupted anywhere before it (a crash, a SIGKILL, a full
disk) leaves the previous checkpoints untouched, and resuming skips the half-written tag with a warning
that names it. After each save the oldest complete tags beyond `keep` are removed, except the best.

Under bf16 (or fp16) the module holds low-precision copies of the weights and the optimizer their fp32
masters. DeepSpeed's model files hold the module copies, so each save also writes the fp32 masters
(`fp32_masters_rank<r>.pt`, one file per expert-parallel rank, parameter names of that rank's model), which
`mmolre export` prefers.
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import warnings

import numpy as np
import torch

from . import distributed

MARKER = "mmolre_complete.json"
MASTERS_PREFIX = "fp32_masters_rank"
FORMAT = 2   # in the marker; checkpoints without it (earlier versions) resume weights only
# Expert parameter names: the stacked experts' ("...experts.down_weight", [local experts, ...]) and
# DeepSpeed's per-expert form ("...experts.deepspeed_experts.<id>.down.weight"), which checkpoints use.
_STACKED = re.compile(r"^(.*\.deepspeed_moe\.experts\.)(down|up)_(weight|bias)$")
_PER_EXPERT = re.compile(r"^(.*\.deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)(\..*)$")
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


def save(engine, ckpt_dir: str, tag: str, client_state: dict, info, ep_size: int, marker: dict) -> None:
    """Every rank calls this with the same tag. Saving again under a tag first withdraws its marker."""
    rank = info.rank
    if rank == 0:
        withdraw(ckpt_dir, tag)
    distributed.barrier(info)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state)
    torch.save(rng_state(), os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt"))
    if engine.bfloat16_enabled() or engine.fp16_enabled():
        masters = fp32_masters(engine, rank)   # a collective: every rank takes part
        if masters is not None and rank < ep_size:   # ranks 0..ep-1 hold every expert once (DeepSpeed's layout)
            torch.save(masters, os.path.join(ckpt_dir, tag, f"{MASTERS_PREFIX}{rank}.pt"))
    distributed.barrier(info)
    if rank == 0:
        path = os.path.join(ckpt_dir, tag, MARKER)
        with open(path + ".tmp", "w") as f:
            json.dump(marker, f)
        os.replace(path + ".tmp", path)
    distributed.barrier(info)


def withdraw(ckpt_dir: str, tag: str) -> None:
    """Before a tag is saved again: it stops counting as complete, and files that the new save may not
    write again (fp32 masters of expert-parallel ranks a smaller expert-parallel size lacks) go."""
    for path in [os.path.join(ckpt_dir, tag, MARKER), *glob.glob(os.path.join(ckpt_dir, tag, f"{MASTERS_PREFIX}*.pt"))]:
        if os.path.exists(path):
            os.remove(path)


def fp32_masters(engine, rank: int) -> dict[str, torch.Tensor] | None:
    """{parameter name: its fp32 master weight} for this rank's experts, plus the dense parameters on rank 0;
    None where the optimizer links no fp32 masters to the parameters (DeepSpeed's fp16 optimizer without
    ZeRO), the same answer on every rank. Each master is assembled from its ZeRO partitions (a collective over
    the parameter's data-parallel or expert-data-parallel group), so every rank calls this in the same order."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import safe_get_full_fp32_param
    params = list(engine.module.named_parameters())
    if not all(hasattr(p, "_hp_mapping") for _, p in params):
        warnings.warn("this optimizer keeps no fp32 masters linked to the parameters; the checkpoint holds the "
                      "low-precision module weights only", stacklevel=2)
        return None
    out = {}
    for name, param in params:
        master = safe_get_full_fp32_param(param)
        if is_moe_param(param) or rank == 0:
            out[name] = master.detach().float().cpu()
    return out


def read_fp32_masters(tag_dir: str, ep_size: int, num_experts: int) -> dict[str, torch.Tensor] | None:
    """A checkpoint's fp32 masters as one state dict in DeepSpeed's per-expert form with GLOBAL expert ids
    (the keys of a model at expert parallelism 1); None where the checkpoint has none."""
    paths = [os.path.join(tag_dir, f"{MASTERS_PREFIX}{r}.pt") for r in range(ep_size)]
    present = [os.path.isfile(p) for p in paths]
    if not any(present):
        return None
    if not all(present):
        raise FileNotFoundError(f"{tag_dir}: fp32 master files of expert-parallel ranks "
                                f"{[r for r, ok in enumerate(present) if not ok]} are missing")
    per_rank = num_experts // ep_size
    out = {}
    for ep_rank, path in enumerate(paths):
        # memory-mapped: a rank reads only the tensors it uses, not every rank's file into memory
        for name, value in torch.load(path, map_location="cpu", weights_only=True, mmap=True).items():
            stacked, single = _STACKED.match(name), _PER_EXPERT.match(name)
            if stacked:
                prefix, kind, what = stacked.groups()
                for i in range(value.shape[0]):
                    out[f"{prefix}deepspeed_experts.{ep_rank * per_rank + i}.{kind}.{what}"] = value[i]
            elif single:
                prefix, local, rest = single.groups()
                out[f"{prefix}{ep_rank * per_rank + int(local)}{rest}"] = value
            else:
                out[name] = value
    return out


def restore_fp32_masters(engine, ckpt_dir: str, tag: str, marker: dict, ep_size: int, ep_rank: int) -> bool:
    """After a weights-only load (another topology), put a low-precision checkpoint's fp32 masters back:
    into the optimizer's fp32 partitions (DeepSpeed rebuilds them from the low-precision module weights,
    which would round every master) and, for an fp32 engine, into the module too. Each rank sets its own
    partitions (no collective). False where there is nothing to restore (an fp32 checkpoint)."""
    from deepspeed.utils import safe_set_full_fp32_param
    if marker.get("dtype", "float32") == "float32":
        return False
    masters = read_fp32_masters(os.path.join(ckpt_dir, tag), marker["ep_size"], engine.module.cfg.num_experts)
    if masters is None:
        warnings.warn(f"{ckpt_dir}/{tag} ({marker['dtype']}) holds no fp32 master weights; resuming from its "
                      f"{marker['dtype']} weights", stacklevel=2)
        return False
    params = dict(engine.module.named_parameters())
    for name, value in masters_of(engine.module, masters, ep_size, ep_rank).items():
        with torch.no_grad():
            params[name].copy_(value)             # the module's copy (rounded again where it is bf16)
        safe_set_full_fp32_param(params[name], value)   # the optimizer's fp32 partition, where it keeps one
    return True


def masters_of(model, masters: dict[str, torch.Tensor], ep_size: int, ep_rank: int) -> dict[str, torch.Tensor]:
    """{parameter name of this rank's model: value} from a per-expert state dict with global expert ids."""
    per_rank = model.cfg.num_experts // ep_size
    out = {}
    for name, param in model.named_parameters():
        stacked, single = _STACKED.match(name), _PER_EXPERT.match(name)
        if stacked:
            prefix, kind, what = stacked.groups()
            out[name] = torch.stack([masters[f"{prefix}deepspeed_experts.{ep_rank * per_rank + i}.{kind}.{what}"]
                                     for i in range(param.shape[0])])
        elif single:
            prefix, local, rest = single.groups()
            out[name] = masters[f"{prefix}{ep_rank * per_rank + int(local)}{rest}"]
        else:
            out[name] = masters[name]
        out[name] = out[name].to(param.device)
    return out


def load(engine, ckpt_dir: str, tag: str, rank: int, weights_only: bool = False) -> dict:
    """Load `tag` into the engine (and this rank's RNG state unless weights_only); returns the client state."""
    path, client_state = engine.load_checkpoint(
        ckpt_dir, tag=tag, load_optimizer_states=not weights_only, load_lr_scheduler_states=not weights_only,
        load_module_only=weights_only)
    if path is None:
        raise FileNotFoundError(f"checkpoint {tag!r} in {ckpt_dir} could not be loaded")
    rng_path = os.path.join(ckpt_dir, tag, f"rng_rank{rank}.pt")
    if not weights_only and os.path.isfile(rng_path):
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
