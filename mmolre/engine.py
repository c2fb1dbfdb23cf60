"""The DeepSpeed engine: config checks and overrides, MoE-aware optimizer groups, LR schedule."""
from __future__ import annotations

import difflib
import json
import math

import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from .config import ConfigError, TrainConfig


# Top-level keys DeepSpeed reads that are not in deepspeed.runtime.constants (monitors, ZeRO, profilers, ...).
_KNOWN_SECTIONS = {
    "zero_optimization", "tensorboard", "wandb", "csv_monitor", "comet", "flops_profiler", "comms_logger",
    "activation_checkpointing", "aio", "amp", "autotuning", "elasticity", "compression_training",
    "data_efficiency", "curriculum_learning", "sparse_attention", "pipeline", "checkpoint", "nebula",
    "weight_quantization", "hybrid_engine", "compile", "timers", "zenflow", "tensor_parallel",
    "expert_parallel", "sequence_parallel_size", "gradient_accumulation_dtype", "communication_data_type",
    "seed", "train_batch_size", "dump_state", "graph_harvesting", "eigenvalue", "progressive_layer_drop",
    "quantize_training", "mics_shard_size", "mics_hierarchical_params_gather", "use_node_local_storage",
    "zero_allow_untested_optimizer", "memory_breakdown", "sparse_gradients", "disable_allgather",
}


def _known_keys() -> set[str]:
    import deepspeed.runtime.constants as constants
    return _KNOWN_SECTIONS | {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)}


def load_ds_config(cfg: TrainConfig, world_size: int, on_gpu: bool) -> dict:
    """Read --ds_config, reject what this trainer owns or cannot run, apply the flags that override it.
    Runs before any process group exists, so a bad config costs no start-up."""
    try:
        with open(cfg.ds_config) as f:
            ds = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--ds_config {cfg.ds_config}: not valid JSON ({e})") from e
    known = _known_keys()
    for key in ds:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError(f"--ds_config {cfg.ds_config}: unknown key {key!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
    for owned in ("optimizer", "scheduler"):
        if owned in ds:
            raise ConfigError(f"--ds_config {cfg.ds_config}: remove the '{owned}' section; the trainer builds "
                              f"AdamW with MoE parameter groups and the warm-up/cosine schedule from --lr, "
                              f"--weight_decay and --warmup_ratio")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"--ds_config {cfg.ds_config}: ZeRO stage {stage}; DeepSpeed's MoE layers support "
                          f"stages 0, 1 and 2 only")
    if not on_gpu and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"--ds_config {cfg.ds_config}: fp16 is GPU-only here; use zero2.json (fp32) on CPU")
    if "gradient_clipping" not in ds:
        raise ConfigError(f"--ds_config {cfg.ds_config}: set 'gradient_clipping' explicitly (DeepSpeed changed "
                          f"its default from 0 to 1.0 in v0.19.3)")
    if cfg.batch_size:
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if "train_micro_batch_size_per_gpu" not in ds:
        raise ConfigError(f"--ds_config {cfg.ds_config}: set 'train_micro_batch_size_per_gpu' or pass --batch_size")
    ds.setdefault("gradient_accumulation_steps", 1)
    implied = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    if "train_batch_size" in ds and ds["train_batch_size"] != implied:
        raise ConfigError(f"--ds_config {cfg.ds_config}: train_batch_size {ds['train_batch_size']} != micro batch "
                          f"{ds['train_micro_batch_size_per_gpu']} x accumulation {ds['gradient_accumulation_steps']}"
                          f" x world size {world_size} = {implied}; remove train_batch_size or make them agree")
    return ds


def point_tensorboard(ds: dict, tensorboard_dir: str | None) -> None:
    """DeepSpeed's own TensorBoard events go beside ours, under the run directory."""
    tb = ds.get("tensorboard")
    if tb is not None:
        tb["enabled"] = bool(tb.get("enabled")) and tensorboard_dir is not None
        tb["output_path"], tb["job_name"] = tensorboard_dir or "", "deepspeed"


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay / no-decay groups, each split by DeepSpeed into dense and expert (per expert group) parts."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".pos") else decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    return split_params_into_different_moe_groups_for_optimizer(groups)


def warmup_cosine(total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def initialize(model: torch.nn.Module, cfg: TrainConfig, ds_config: dict, total_steps: int):
    import deepspeed
    optimizer = torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay), lr=cfg.lr)
    schedule = warmup_cosine(total_steps, cfg.warmup_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine


def compute_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32
