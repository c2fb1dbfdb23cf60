"""The experts' part of a checkpoint: one file per expert-parallel rank, whatever the expert count.

`expert_state_rank<r>.pt` holds, for every MoE layer, the fp32 weights, AdamW moments and step counts of
the experts that rank r of the expert-parallel group holds (global ids r*E/ep ... (r+1)*E/ep - 1), as
`{"format", "num_experts", "ep_size", "ep_rank", "mode", "layers": {layer: {"<param>/weight", "<param>/exp_avg",
"<param>/exp_avg_sq": [local experts, *shape], "step": [local experts]}}}`. Ranks 0..ep-1 write them (the
first replica of every expert, as DeepSpeed's own expert files are written). Any topology reads its share: a
rank takes the rows of its global ids from the files that hold them, memory-mapped, so it reads only those.

Checkpoints written before the experts moved into banks (format 2) keep the experts in DeepSpeed's per-expert
files (weights) and in the topology-free state (`topology_free_state.py`: weights and moments per global
expert id); `read_share` takes them from there.
"""
from __future__ import annotations

import glob
import os

import torch

from .model.expert_bank import PARAMS
from .model.grouped import per_expert_key

PREFIX = "expert_state_rank"
FORMAT = 1


def path(tag_dir: str, ep_rank: int) -> str:
    return os.path.join(tag_dir, f"{PREFIX}{ep_rank}.pt")


def write(tag_dir: str, experts, num_experts: int, ep_size: int, ep_rank: int) -> None:
    """This expert-parallel rank's file (call on the writers, ranks 0..ep-1)."""
    layers = {layer: experts.layer_state(layer, bank) for layer, bank in experts.banks}
    torch.save({"format": FORMAT, "num_experts": num_experts, "ep_size": ep_size, "ep_rank": ep_rank,
                "mode": experts.mode, "layers": layers}, path(tag_dir, ep_rank))


def present(tag_dir: str) -> bool:
    return bool(glob.glob(os.path.join(tag_dir, f"{PREFIX}*.pt")))


def read_share(tag_dir: str, layer_names: list[str], num_experts: int, ep_size: int, ep_rank: int,
               saved_ep_size: int) -> tuple[dict[str, dict], bool]:
    """({layer: {"<param>/weight", ... "step"}} of global experts ep_rank*E/ep_size ... for this rank, whether the
    moments came too), from this layout's files or, for earlier checkpoints, from the topology-free state
    (weights and moments) or DeepSpeed's per-expert files (weights only)."""
    lo, hi = ep_rank * num_experts // ep_size, (ep_rank + 1) * num_experts // ep_size
    if present(tag_dir):
        return _from_expert_files(tag_dir, lo, hi, num_experts, saved_ep_size), True
    from . import topology_free_state
    state = topology_free_state.read(tag_dir, saved_ep_size, num_experts)
    if state is not None:   # saved before the first step, it has weights only
        values = _from_per_expert_entries(state["params"], layer_names, lo, hi, steps=state["step"])
        return values, all(f"{name}/exp_avg" in v for v in values.values() for name in PARAMS)
    return _from_per_expert_entries(_deepspeed_expert_files(tag_dir, layer_names), layer_names, lo, hi), False


def _from_expert_files(tag_dir: str, lo: int, hi: int, num_experts: int, saved_ep_size: int) -> dict:
    per_file = num_experts // saved_ep_size
    parts: dict[str, dict[str, list]] = {}
    for r in range(lo // per_file, (hi - 1) // per_file + 1):
        if not os.path.isfile(path(tag_dir, r)):
            raise FileNotFoundError(f"{tag_dir}: {PREFIX}{r}.pt (experts {r * per_file}-{(r + 1) * per_file - 1}) "
                                    f"is missing")
        saved = torch.load(path(tag_dir, r), map_location="cpu", weights_only=True, mmap=True)
        held = (saved.get("num_experts"), saved.get("ep_size"), saved.get("ep_rank"))
        if held != (num_experts, saved_ep_size, r):
            raise ValueError(f"{path(tag_dir, r)}: holds (experts, ep_size, ep_rank) = {held}, the checkpoint's "
                             f"marker says ({num_experts}, {saved_ep_size}, {r}): the file is not this checkpoint's")
        a, b = max(lo, r * per_file) - r * per_file, min(hi, (r + 1) * per_file) - r * per_file
        for layer, values in saved["layers"].items():
            for key, v in values.items():
                parts.setdefault(layer, {}).setdefault(key, []).append(v[a:b])
    return {layer: {key: torch.cat(vs) for key, vs in values.items()} for layer, values in parts.items()}


def _from_per_expert_entries(entries: dict, layer_names: list[str], lo: int, hi: int, steps: int | None = None) -> dict:
    """Rows [lo, hi) per layer from {per-expert parameter name: tensor, or {"fp32", "exp_avg", "exp_avg_sq"}}."""
    out = {}
    for layer in layer_names:
        modality, block = layer.split(".")
        prefix = f"unitse.{modality}.blocks.{block}.moe.deepspeed_moe.experts."
        values = {}
        for name in PARAMS:
            rows = [entries[per_expert_key(prefix, g, name)] for g in range(lo, hi)]
            if isinstance(rows[0], dict):
                values[f"{name}/weight"] = torch.stack([r["fp32"] for r in rows])
                if "exp_avg" in rows[0]:
                    values[f"{name}/exp_avg"] = torch.stack([r["exp_avg"] for r in rows])
                    values[f"{name}/exp_avg_sq"] = torch.stack([r["exp_avg_sq"] for r in rows])
            else:
                values[f"{name}/weight"] = torch.stack(rows).float()
        values["step"] = torch.full((hi - lo,), steps or 0, dtype=torch.int64)
        out[layer] = values
    return out


def _deepspeed_expert_files(tag_dir: str, layer_names: list[str]) -> dict:
    """Every expert's weights from DeepSpeed's per-expert files (`layer_<L>_expert_<E>_mp_rank_00_model_states.pt`)."""
    entries = {}
    for file in glob.glob(os.path.join(tag_dir, "layer_*_expert_*_mp_rank_00_model_states.pt")):
        entries.update(torch.load(file, map_location="cpu", weights_only=True))
    if not entries:
        raise FileNotFoundError(f"{tag_dir}: no expert state (neither {PREFIX}*.pt nor DeepSpeed's per-expert files)")
    return entries
