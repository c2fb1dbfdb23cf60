"""Will a run fit? Each rank's memory estimated before anything is allocated, against what the device or host has.

This rank's parameters are counted from the model built with a few experts on the CPU and extrapolated
(`parameter_counts`, exact: every count is affine in the expert count; checked against the model built on
PyTorch's meta device at the full count, `count_on_meta`): the dense
model (replicated on every rank; the routers' last layers grow with the expert count) and this rank's shared
experts (num_experts / ep_size of every MoE layer). Bytes per parameter:

* dense, under DeepSpeed: the weights and their gradients (in the engine's dtype), ZeRO's two flat copies of
  them (the reduction bucket and the all-gather buffer), fp32 masters under bf16, and AdamW's two fp32 moments
  plus DeepSpeed's fp32 partition, divided over the data-parallel ranks by ZeRO 1/2;
* experts in banks (`expert_optimizer.py`): fp32 weights and two fp32 moments, plus 2 bytes of slack (an
  update works a block of rows at a time, dense or lazy); their gradients are sparse, one row per route (the
  rows of every rank of the expert-parallel group that may reach this rank's experts, per micro batch and
  layer, kept over the accumulation window), plus two coalesced copies while they are reduced;
* experts as DeepSpeed parameters (--grouped_experts false): as dense, without ZeRO's division (the expert
  data-parallel group is usually one rank);
* activations at the micro batch: what autograd keeps per (utterance, task) row of every block, from the
  shapes (about 12 values per step and width, and the routed rows' 6 per expert route), doubled for the
  allocator's slack; or, if larger, an evaluation forward's: one block of the longest modality at the
  evaluation batch (`--eval_batch_size`; at its default never larger), as nothing is kept for a backward;
* the process itself (PyTorch, DeepSpeed, the data's memory map; on a GPU, the CUDA context): 0.6 GB.

On a GPU the model is built in host memory first: its fp32 parameters, for every rank of the host at once,
must fit there too (`host_at_build`; a pretrained text encoder twice, its loaded state beside the model).

The constants were checked against the peak resident memory `bench/expert_scale.py` measured (its table shows
the estimate beside it); the estimate is meant to err on the safe side by a few tens of percent.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .config import ConfigError, RunConfig, evaluation_batch
from .model.grouped import WINDOW_PADDING

GB = 1024 ** 3
RUNTIME = int(0.6 * GB)
ACTIVATION_SLACK = 2.0


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    runtime: int = RUNTIME

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.runtime

    def describe(self) -> str:
        parts = ", ".join(f"{name} {getattr(self, name) / GB:.2f}" for name in
                          ("parameters", "gradients", "optimizer", "activations", "runtime"))
        return f"{self.total / GB:.2f} GB ({parts})"


CPU_COUNT_MAX_WIDTH = 512   # wider models (or full-rank experts, a text encoder) are counted on the meta device


def parameter_counts(cfg: RunConfig, shapes: dict, ep_size: int) -> dict[str, int]:
    """count_on_meta's counts at any expert count, from at most two small models built on the CPU: every count
    is affine in the expert count (the experts, and the routers' last layers), so the counts at n and 2n
    experts give it exactly. The meta device would cost about a second of torch's one-time set-up (its first
    meta `normal_`) in every rank's start-up; the CPU builds cost milliseconds. Tested against count_on_meta."""
    from dataclasses import replace
    m = cfg.model
    if m.d_model > CPU_COUNT_MAX_WIDTH or m.full_rank or m.finetune_text:   # small CPU builds would not be small
        return count_on_meta(cfg, shapes, ep_size)
    n, small = m.num_experts, ep_size   # one local expert (no count depends on top-k)

    def at(experts: int) -> dict:
        with torch.random.fork_rng(devices=[]):   # the builds draw weights: leave the caller's random state
            return count_on_meta(replace(cfg, model=replace(m, num_experts=experts, top_k=min(m.top_k, experts))),
                                 shapes, ep_size, device="cpu")
    if n <= 2 * small:
        return at(n)
    lo, hi = at(small), at(2 * small)
    out = dict(lo)
    for key in ("dense", "experts"):   # exact: ep_size divides n - small
        out[key] = lo[key] + (hi[key] - lo[key]) * (n - small) // small
    return out


def count_on_meta(cfg: RunConfig, shapes: dict, ep_size: int, device: str = "meta") -> dict[str, int]:
    """This rank's dense and shared-expert parameter counts, from the model built without storage."""
    from .model import MMoLRE
    model_cfg = cfg.model
    text = 0
    if model_cfg.finetune_text:   # the pretrained encoder counted from its configuration
        from dataclasses import replace
        from transformers import AutoConfig, AutoModel
        with torch.device("meta"):
            encoder = AutoModel.from_config(AutoConfig.from_pretrained(model_cfg.text_encoder))
        text = sum(p.numel() for p in encoder.parameters())
        model_cfg = replace(model_cfg, finetune_text=False, text_encoder=None)
    with torch.device(device):
        model = MMoLRE(model_cfg, shapes, ep_size=ep_size)
    experts = sum(t.numel() for _, block in model.moe_blocks() for t in block.shared_expert_tensors())
    in_banks = any(True for _ in model.expert_banks())
    dense = sum(p.numel() for p in model.parameters()) + text - (0 if in_banks else experts)
    return {"dense": dense, "experts": experts, "experts_in_banks": in_banks, "text": text}


def estimate(cfg: RunConfig, shapes: dict, ep_size: int, micro_batch: int, world: int, zero_stage: int,
             bf16: bool, grad_accum: int = 1) -> MemoryEstimate:
    counts = parameter_counts(cfg, shapes, ep_size)
    dense, experts = counts["dense"], counts["experts"]
    weight = 2 if bf16 else 4
    shard = world if zero_stage >= 1 else 1
    parameters = dense * weight + experts * (4 if counts["experts_in_banks"] else weight)
    gradients = dense * weight * 3   # the gradients, ZeRO's reduction bucket and its all-gather buffer
    optimizer = dense * (12 + (4 if bf16 else 0)) // shard
    if counts["experts_in_banks"]:
        optimizer += experts * (8 + 2)
        gradients += sparse_expert_gradient_bytes(cfg, experts, ep_size, micro_batch, grad_accum, shapes)
    else:
        gradients += experts * weight
        optimizer += experts * (12 + (4 if bf16 else 0))
    evaluation = evaluation_activation_bytes(cfg, shapes, evaluation_batch(cfg, micro_batch, len(shapes)), weight,
                                             ep_size)
    return MemoryEstimate(parameters, gradients, optimizer,
                          max(activation_bytes(cfg, shapes, micro_batch, weight, ep_size), evaluation))


def sparse_expert_gradient_bytes(cfg: RunConfig, experts: int, ep_size: int, micro_batch: int,
                                 grad_accum: int, shapes: dict | None = None) -> int:
    """The banks' sparse gradients: per micro batch, a row of one expert's size per local expert that received a
    route (at most the routes that may reach this rank: every rank of the expert-parallel group routes
    micro_batch rows per task, times the longest modality's steps with --route_per step), uncoalesced over the
    accumulation window, plus the two coalesced copies the reduction makes (at most one row per local expert
    each)."""
    m = cfg.model
    num_local = max(1, m.num_experts // ep_size)
    routes = rows_per_task(cfg, shapes, micro_batch) * (1 if m.model == "hard_sharing" else 2) * m.effective_top_k \
        * ep_size
    per_window = grad_accum * min(num_local, routes)
    return int(4 * experts / num_local * (per_window + 2 * min(num_local, per_window)))


def rows_per_task(cfg: RunConfig, shapes: dict | None, micro_batch: int) -> int:
    """The most rows one task routes in one MoE layer per micro batch."""
    if cfg.model.route_per != "step":
        return micro_batch
    if not shapes:
        raise ValueError("--route_per step: the rows per micro batch depend on the modalities' steps (shapes)")
    return micro_batch * max(routed_rows_per_utterance(cfg, shapes).values())


def routed_rows_per_utterance(cfg: RunConfig, shapes: dict) -> dict[str, int]:
    """Per modality, the most rows one utterance routes per task and MoE layer: one, or with --route_per step one
    per step (after the front end's pooling)."""
    from .model.frontend import steps_per_modality
    steps = steps_per_modality(shapes, cfg.model.temporal_steps)
    return {m: t if cfg.model.route_per == "step" else 1 for m, t in steps.items()}


def host_at_build(cfg: RunConfig, shapes: dict, ep_size: int) -> MemoryEstimate:
    """What a GPU rank holds in host memory while it builds the model (fp32, before the engine moves it)."""
    counts = parameter_counts(cfg, shapes, ep_size)
    fp32 = (counts["dense"] + counts["experts"] + counts["text"]) * 4
    return MemoryEstimate(parameters=fp32, gradients=0, optimizer=0, activations=0)


def activation_bytes(cfg: RunConfig, shapes: dict, micro_batch: int, bytes_per_value: int, ep_size: int = 1) -> int:
    """What autograd keeps for one micro batch: per block, task and step about 12 values of width d (streams,
    norms, the task expert) and, per expert route, 6 (the gathered row, the convolutions, the combine); with
    --route_per step, also each step's window (3 more). Plus the routers' [rows, experts] fp32 tensors, 3 per
    MoE layer (the logits and probabilities autograd keeps, one transient copy), which grow with the expert count
    and, with --route_per step, with the steps. Plus what the fast path computes each route from: a copy of its
    expert's weights per utterance (4·d·r), or, per step (--route_per step), its window's place among the rows
    grouped by expert (4·d + 2·r values, padded at most WINDOW_PADDING + 1 times); and, per MoE layer, the
    weights of the experts that received rows, gathered from the bank (and copied once more per batch of
    unequally loaded step rows): at most min(routes reaching the rank, its experts) · 4·d·r, twice."""
    from .model.frontend import steps_per_modality
    m = cfg.model
    steps = steps_per_modality(shapes, m.temporal_steps)
    tasks = 1 if m.model == "hard_sharing" else 2
    per_step = m.blocks * tasks * ((15 if m.route_per == "step" else 12) * m.d_model
                                   + 6 * m.effective_top_k * (m.d_model + m.rank))
    kept = int(micro_batch * sum(steps.values()) * per_step * bytes_per_value * ACTIVATION_SLACK)
    if not m.shared_experts or m.model == "hard_sharing":   # no routed experts, no routers
        return kept
    per_utterance = routed_rows_per_utterance(cfg, shapes)
    rows = micro_batch * sum(per_utterance.values()) * tasks * m.blocks
    per_route = ((WINDOW_PADDING + 1) * (4 * m.d_model + 2 * m.rank) if m.route_per == "step"
                 else 4 * m.d_model * m.rank)
    local_experts = max(1, m.num_experts // max(1, ep_size))
    used_experts = m.blocks * sum(min(ep_size * micro_batch * r * tasks * m.effective_top_k, local_experts)
                                  for r in per_utterance.values())
    expert_inputs = (rows * m.effective_top_k * per_route + used_experts * 2 * 4 * m.d_model * m.rank)
    return kept + int(expert_inputs * bytes_per_value * ACTIVATION_SLACK) + 3 * rows * m.num_experts * 4


def evaluation_activation_bytes(cfg: RunConfig, shapes: dict, eval_batch: int, bytes_per_value: int,
                                ep_size: int = 1) -> int:
    """An evaluation forward keeps nothing for a backward, so it holds about one block of one modality at a time:
    counted as what training keeps for one block of the modality with the most steps, at the evaluation batch (an
    upper bound: at 4 micro batches the forward's peak measured 0.3-0.4 of it)."""
    from .model.frontend import steps_per_modality
    steps = steps_per_modality(shapes, cfg.model.temporal_steps)
    longest = max(steps, key=steps.get)
    return activation_bytes(cfg, {longest: shapes[longest]}, eval_batch, bytes_per_value, ep_size) // cfg.model.blocks


def available(device: torch.device, local_ranks: int) -> tuple[int, str]:
    """Bytes this rank may use, and what they are: the GPU's free memory, or the host's available memory split
    over the ranks that share it."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"{free / GB:.1f} GB free on {torch.cuda.get_device_name(device)} ({total / GB:.1f} GB)"
    host = _host_available()
    return host // max(1, local_ranks), f"{host / GB:.1f} GB available on this host / {local_ranks} rank(s)"


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(needed: MemoryEstimate, have: int, what: str) -> None:
    if needed.total > have:
        raise ConfigError(f"this run needs about {needed.describe()} per rank, more than {what}: "
                          f"{have / GB:.2f} GB per rank. Use more ranks (--ep_size spreads the experts), fewer "
                          f"experts, a smaller --expert_rank or a smaller micro batch; "
                          f"--memory_check false starts anyway")
