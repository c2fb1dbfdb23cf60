"""The topology-free copy of the training state that every checkpoint also holds.

DeepSpeed's own checkpoint files are laid out for one topology: its ZeRO optimizer partitions for one
data-parallel size (and it cannot reshard MoE checkpoints, DeepSpeed issue 5716), its module files in the
engine's dtype. So each save also writes `elastic_rank0.pt`: every dense parameter's fp32 weight (the
optimizer's master under bf16) and AdamW moments, assembled from their ZeRO partitions, plus the AdamW step
count. The experts in banks have their own files (`expert_state_files.py`). With `--grouped_experts false`
(experts as DeepSpeed parameters) ranks 0..ep-1 each write `elastic_rank<r>.pt` with their experts too
(DeepSpeed's expert-parallel layout), as checkpoints of format 2 did for every run.

Read back, the files become one state in DeepSpeed's per-expert form with GLOBAL expert ids (the names of a
model at expert parallelism 1), which any topology can take its share of: `mmolre export` takes the fp32
weights, and a resume under another world size or expert-parallel size puts weights, moments and step back
into the new engine's optimizer partitions, regrouped by global expert id.
"""
from __future__ import annotations

import glob
import os
import re
import warnings

import torch

PREFIX = "elastic_rank"   # the files' name since the first version; checkpoints in use have it
MOMENTS = ("exp_avg", "exp_avg_sq")   # AdamW's per-parameter state
# Expert parameter names: the stacked experts' ("...experts.down_weight", [local experts, ...]) and
# DeepSpeed's per-expert form ("...experts.deepspeed_experts.<id>.down.weight"), which checkpoints use.
_STACKED = re.compile(r"^(.*\.deepspeed_moe\.experts\.)(down|up)_(weight|bias)$")
_PER_EXPERT = re.compile(r"^(.*\.deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)(\..*)$")


def files(tag_dir: str) -> list[str]:
    return glob.glob(os.path.join(tag_dir, f"{PREFIX}*.pt"))


def _zero(engine):
    """DeepSpeed's ZeRO 1/2 optimizer, or its bf16 optimizer (bf16 ZeRO-1 accumulating in fp32): fp32
    partitions linked to each parameter, stepped by a torch optimizer (`.optimizer`). None otherwise."""
    opt = engine.optimizer
    return opt if _flat_partitions(opt) is not None else None


def _flat_partitions(opt) -> list | None:
    """The fp32 partitions the torch optimizer steps (one per parameter group), under either name."""
    for name in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(opt, name):
            return getattr(opt, name)
    return None


def _plain(engine):
    """A torch optimizer stepping the module's own (fp32) parameters: ZeRO stage 0, or None."""
    opt = engine.optimizer
    return opt if isinstance(opt, torch.optim.Optimizer) and not _zero(engine) else None


def _adam_step(optimizer: torch.optim.Optimizer) -> int:
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def gather(engine, info) -> dict | None:
    """This rank's share of the state: its experts, and on rank 0 the dense parameters too. Under ZeRO each
    value is assembled from its partitions (a collective over the parameter's data-parallel or
    expert-data-parallel group), so every rank calls this, in the same order. None (the same on every rank)
    for an optimizer this does not know (DeepSpeed's stage-0 low-precision or bf16 optimizers)."""
    from deepspeed.moe.utils import is_moe_param
    from . import distributed
    zero, plain = _zero(engine), _plain(engine)
    if zero is None and plain is None:
        warnings.warn(f"{type(engine.optimizer).__name__}: no topology-free state is saved; a resume under "
                      f"another topology will reset the optimizer", stacklevel=2)
        return None
    # Every rank must make the same number of collectives per parameter: agree whether moments exist.
    missing = torch.tensor(0.0 if (zero.optimizer.state if zero else True) else 1.0)
    moments_ready = float(distributed.all_reduce(missing, info, "max")) == 0.0
    if zero and moments_ready:
        # DeepSpeed links each parameter to its slice of the AdamW state once, right after stepping the FIRST
        # parameter group on the first step, when the other groups' state does not exist yet; link again.
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    trained = [(name, param) for name, param in engine.module.named_parameters()
               if param.requires_grad]   # the others' values are in DeepSpeed's model files
    keep = [is_moe_param(param) or info.rank == 0 for _, param in trained]
    if zero:
        keys = (None, *MOMENTS) if moments_ready else (None,)
        full = {key: assemble_from_partitions([param for _, param in trained], info, keep, key) for key in keys}
        params = {name: {("fp32" if key is None else key): full[key][i] for key in keys}
                  for i, (name, _) in enumerate(trained) if keep[i]}
    else:
        params = {}
        for (name, param), kept in zip(trained, keep):
            if kept:
                state = plain.state.get(param, {})
                entry = {"fp32": param.detach(), **{k: state[k] for k in MOMENTS if k in state}}
                params[name] = {k: v.detach().float().cpu().clone() for k, v in entry.items()}
    step = _adam_step(zero.optimizer if zero else plain)
    # experts in banks are saved by expert_state_files.py; then this state is the dense model's, on rank 0 only
    return {"params": params, "step": step, "experts_in_banks": bool(getattr(engine, "expert_optimizer", None))}


ASSEMBLY_BUCKET = 1 << 24   # floats per all_reduce (64 MB): the save's extra device memory, besides what it keeps


def assemble_from_partitions(params: list, info, keep: list[bool], key: str | None = None) -> dict[int, torch.Tensor]:
    """The full fp32 value (`key` None) or AdamW state `key` of each parameter i with keep[i], on the CPU,
    assembled from the fragments ZeRO 1/2 and DeepSpeed's bf16 optimizer link to it (`param._hp_mapping`). This
    is DeepSpeed's `get_full_hp_param` (what `safe_get_full_fp32_param` and `safe_get_full_optimizer_state`
    call) batched: each parameter's fragment is written at its place in a zero buffer that is summed over the
    parameter's data-parallel group, with one all_reduce per bucket of parameters that share a group instead of
    one per parameter. A save made three collectives per parameter (471 for the default model); over gloo they
    cost 0.8 s of a 4 s epoch. Every rank must call this with the same parameters in the same order (the
    buckets then meet in the same order in every group); a bucket's buffer is freed before the next."""
    from . import distributed
    full: dict[int, torch.Tensor] = {}
    by_group: dict[int, list[int]] = {}
    for i, param in enumerate(params):   # first appearance decides the order, the same on every rank
        by_group.setdefault(id(param._dp_group), []).append(i)
    for members in by_group.values():
        for bucket in _buckets(members, [params[i].numel() for i in members]):
            sizes = [params[i].numel() for i in bucket]
            buffer = torch.zeros(sum(sizes), dtype=torch.float32, device=params[bucket[0]].device)
            for i, piece in zip(bucket, buffer.split(sizes)):
                mapping = params[i]._hp_mapping
                if mapping is not None:   # this rank holds a fragment of the parameter
                    address = mapping.lp_fragment_address
                    piece.narrow(0, address.start, address.numel).copy_(mapping.get_hp_fragment(key).data)
            summed = distributed.all_reduce_sum(buffer, info, group=params[bucket[0]]._dp_group).cpu()
            for i, piece in zip(bucket, summed.split(sizes)):
                if keep[i]:   # a copy of its own: a view would keep (and torch.save would write) the whole buffer
                    full[i] = piece.view_as(params[i]).clone()
    return full


def _buckets(members: list[int], sizes: list[int]):
    """`members` in order, cut into runs of at most ASSEMBLY_BUCKET elements (a larger parameter alone)."""
    bucket, filled = [], 0
    for i, size in zip(members, sizes):
        if bucket and filled + size > ASSEMBLY_BUCKET:
            yield bucket
            bucket, filled = [], 0
        bucket.append(i)
        filled += size
    if bucket:
        yield bucket


def read(tag_dir: str, ep_size: int, num_experts: int) -> dict | None:
    """The checkpoint's state with global expert ids: {"params": {per-expert name: {"fp32", moments...}},
    "step": n}; None where the checkpoint has none."""
    paths = [os.path.join(tag_dir, f"{PREFIX}{r}.pt") for r in range(ep_size)]
    present = [os.path.isfile(p) for p in paths]
    if not any(present):
        return None
    if not present[0] or (not all(present) and not torch.load(paths[0], map_location="cpu", weights_only=True,
                                                               mmap=True).get("experts_in_banks")):
        raise FileNotFoundError(f"{tag_dir}: the state files of expert-parallel ranks "
                                f"{[r for r, ok in enumerate(present) if not ok]} are missing")
    paths = [p for p, ok in zip(paths, present) if ok]
    per_rank = num_experts // ep_size
    params, step = {}, 0
    for ep_rank, path in enumerate(paths):
        # memory-mapped: a rank reads only the tensors it uses, not every rank's file into memory
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        step = max(step, saved["step"])
        for name, entry in saved["params"].items():
            stacked, single = _STACKED.match(name), _PER_EXPERT.match(name)
            if stacked:
                prefix, kind, what = stacked.groups()
                for i in range(entry["fp32"].shape[0]):
                    params[f"{prefix}deepspeed_experts.{ep_rank * per_rank + i}.{kind}.{what}"] = {
                        k: v[i] for k, v in entry.items()}
            elif single:
                prefix, local, rest = single.groups()
                params[f"{prefix}{ep_rank * per_rank + int(local)}{rest}"] = entry
            else:
                params[name] = entry
    return {"params": params, "step": step}


def share_of(model, params: dict, ep_size: int, ep_rank: int) -> dict[str, dict[str, torch.Tensor]]:
    """{parameter name of this rank's model: {"fp32", moments...}} from the global state."""
    per_rank = model.cfg.num_experts // ep_size
    out = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        stacked, single = _STACKED.match(name), _PER_EXPERT.match(name)
        if stacked:
            prefix, kind, what = stacked.groups()
            entries = [params[f"{prefix}deepspeed_experts.{ep_rank * per_rank + i}.{kind}.{what}"]
                       for i in range(param.shape[0])]
            entry = {k: torch.stack([e[k] for e in entries]) for k in entries[0]}
        elif single:
            prefix, local, rest = single.groups()
            entry = params[f"{prefix}{ep_rank * per_rank + int(local)}{rest}"]
        else:
            entry = params[name]
        out[name] = {k: v.to(param.device) for k, v in entry.items()}
    return out


def restore(engine, tag_dir: str, saved_ep_size: int, ep_size: int, ep_rank: int) -> str | None:
    """Put the checkpoint's state into an engine of another topology, after DeepSpeed's weights-only load:
    the fp32 weights into the module and the optimizer's partitions (DeepSpeed rebuilt those from the
    module's possibly-bf16 weights), and the AdamW moments and step where the checkpoint has them. Each rank
    fills its own partitions (no collective). Returns what was restored ("weights and optimizer",
    "weights"), or None where the checkpoint or this engine's optimizer has no such state."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    zero, plain = _zero(engine), _plain(engine)
    state = read(tag_dir, saved_ep_size, engine.module.cfg.num_experts)
    if state is None or (zero is None and plain is None):
        return None
    try:
        share = share_of(engine.module, state["params"], ep_size, ep_rank)
    except KeyError as e:
        raise ValueError(f"{tag_dir}: the checkpoint's state has no parameter {e}; was it written by a model of "
                         f"another configuration (--num_experts, --blocks, modalities ...)?") from None
    with_moments = all(set(MOMENTS) <= set(entry) for entry in share.values())
    if zero and with_moments:   # AdamW's state is created lazily at the first step: create it now
        basic = zero.optimizer
        for flat in _flat_partitions(zero):
            basic.state[flat] = {"step": torch.tensor(float(state["step"])), **{k: torch.zeros_like(flat)
                                                                             for k in MOMENTS}}
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    params = dict(engine.module.named_parameters())
    for name, entry in share.items():
        param = params[name]
        with torch.no_grad():
            param.copy_(entry["fp32"])   # the module's copy (rounded again where it is bf16)
        if zero:
            safe_set_full_fp32_param(param, entry["fp32"])
            if with_moments:
                for k in MOMENTS:
                    safe_set_full_optimizer_state(param, entry[k], k)
        elif with_moments:
            plain.state[param] = {"step": torch.tensor(float(state["step"])),
                                  **{k: entry[k].clone() for k in MOMENTS}}
    return "weights and optimizer" if with_moments else "weights"
