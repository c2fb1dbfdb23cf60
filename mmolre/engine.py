"""The DeepSpeed engine: config checks and overrides, MoE-aware optimizer groups, the LR schedule, and
gradient clipping by the true global norm under expert parallelism."""
from __future__ import annotations

import difflib
import json
import math
import types

import torch
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups

from . import distributed
from .config import ConfigError, TrainConfig
from .expert_optimizer import ExpertOptimizer
from .model.text_encoder import is_text_encoder_param
from .lr_schedule import SchedulePlan, WarmupCosineBySamples


# Top-level keys DeepSpeed reads that are not in deepspeed.runtime.constants (monitors, ZeRO, profilers, ...).
_KNOWN_SECTIONS = {
    "zero_optimization", "tensorboard", "wandb", "csv_monitor", "comet", "flops_profiler", "comms_logger",
    "activation_checkpointing", "aio", "amp", "autotuning", "elasticity", "compression_training",
    "data_efficiency", "curriculum_learning", "sparse_attention", "pipeline", "checkpoint", "nebula",
    "weight_quantization", "hybrid_engine", "timers", "zenflow", "tensor_parallel",
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
    if "compile" in ds:
        raise ConfigError(f"--ds_config {cfg.ds_config}: remove the 'compile' section; the trainer does not "
                          f"call engine.compile(), so it would be accepted and ignored (torch.compile of the "
                          f"MoE layer's data-dependent dispatch is untested here)")
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
    if ds.get("use_data_before_expert_parallelism"):
        raise ConfigError(f"--ds_config {cfg.ds_config}: use_data_before_expert_parallelism is not supported: the "
                          f"trainer places experts and writes their checkpoint files for DeepSpeed's default rank "
                          f"layout (expert-parallel rank = rank % ep_size)")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"--ds_config {cfg.ds_config}: ZeRO stage {stage}; DeepSpeed's MoE layers support "
                          f"stages 0, 1 and 2 only")
    low_precision = [k for k in ("bf16", "bfloat16", "fp16") if ds.get(k, {}).get("enabled")]   # bfloat16: old name
    if low_precision and stage == 0:
        raise ConfigError(f"--ds_config {cfg.ds_config}: {low_precision[0]} with ZeRO stage 0 is not supported with "
                          f"MoE layers: DeepSpeed's stage-0 {low_precision[0]} optimizer leaves the experts out of "
                          f"the gradient-clipping norm and keeps no fp32 masters a checkpoint can save; use ZeRO "
                          f"stage 1 or 2 (ds_configs/zero2_bf16.json)")
    if not on_gpu and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"--ds_config {cfg.ds_config}: fp16 is GPU-only here; use zero2.json (fp32) on CPU")
    if "gradient_clipping" not in ds:
        raise ConfigError(f"--ds_config {cfg.ds_config}: set 'gradient_clipping' explicitly (DeepSpeed changed "
                          f"its default from 0 to 1.0 in v0.19.3)")
    if cfg.batch_size:
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if "train_micro_batch_size_per_gpu" not in ds:
        raise ConfigError(f"--ds_config {cfg.ds_config}: set 'train_micro_batch_size_per_gpu' or pass --batch_size")
    if cfg.grad_accum:
        ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds.setdefault("gradient_accumulation_steps", 1)
    if not isinstance(ds["gradient_accumulation_steps"], int) or ds["gradient_accumulation_steps"] < 1:
        raise ConfigError(f"--ds_config {cfg.ds_config}: gradient_accumulation_steps must be an integer >= 1, got "
                          f"{ds['gradient_accumulation_steps']!r}")
    implied = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    if "train_batch_size" in ds and ds["train_batch_size"] != implied:
        raise ConfigError(f"--ds_config {cfg.ds_config}: train_batch_size {ds['train_batch_size']} != micro batch "
                          f"{ds['train_micro_batch_size_per_gpu']} x accumulation {ds['gradient_accumulation_steps']}"
                          f" x world size {world_size} = {implied}; remove train_batch_size or make them agree")
    deepspeed_monitors_off(ds)
    return ds


def deepspeed_monitors_off(ds: dict) -> None:
    """One TensorBoard run per training run, with one x-axis: this trainer's monitor logs the losses and the
    learning rates in optimizer steps; DeepSpeed's would add a second run (`Train/Samples/...`, x-axis in
    samples) beside it. Its other monitors (csv, wandb, comet) stay as configured."""
    if ds.get("tensorboard", {}).get("enabled"):
        ds["tensorboard"] = {**ds["tensorboard"], "enabled": False}


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases, norms and position tables are not decayed. By name as well as by shape: the stacked
    experts' biases are 2-D ([experts, width]) and must be treated like each expert's own 1-D bias, or the
    two expert paths would train different models."""
    return param.ndim < 2 or name.endswith("bias") or name.endswith(".pos")


def is_router(name: str) -> bool:
    return ".gate.routers." in name


def optimizer_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                     router_lr_scale: float = 1.0, text_lr: float | None = None) -> list[dict]:
    """Decay / no-decay groups, each split by DeepSpeed into dense and expert (per expert group) parts.
    Parameters with a learning rate of their own form two more groups each (the schedule scales each group's
    own base LR): the routers with router_lr_scale != 1 (lr times that), and a pretrained text encoder
    (text_lr; the schedule gives the groups named text_* their own warm-up)."""
    own_lr = {}   # group prefix -> (which parameters, their LR)
    if router_lr_scale != 1.0:
        if lr is None:
            raise ValueError("router_lr_scale needs the base lr")
        own_lr["router_"] = (is_router, lr * router_lr_scale)
    if text_lr is not None:
        own_lr["text_"] = (is_text_encoder_param, text_lr)
    groups = {f"{prefix}{kind}": [] for prefix in ("", *own_lr) for kind in ("decay", "no_decay")}
    for name, p in model.named_parameters():
        if p.requires_grad:
            prefix = next((pre for pre, (belongs, _) in own_lr.items() if belongs(name)), "")
            groups[prefix + ("no_decay" if no_weight_decay(name, p) else "decay")].append(p)
    out = []
    for key, params in groups.items():
        prefix = next((pre for pre in own_lr if key.startswith(pre)), "")
        if prefix and not params:
            continue
        # "group" keeps our name: DeepSpeed's MoE split renames expert groups "ep_size_<n>" (copying the rest)
        group = {"name": key, "group": key, "params": params,
                 "weight_decay": 0.0 if key.endswith("no_decay") else weight_decay}
        if prefix:
            group["lr"] = own_lr[prefix][1]
        out.append(group)
    return split_params_into_different_moe_groups_for_optimizer(out)


def initialize(model: torch.nn.Module, cfg: TrainConfig, ds_config: dict, samples_per_epoch: int,
               samples_per_step: int, info: distributed.DistInfo, ep_size: int):
    """The DeepSpeed engine with AdamW over MoE-aware groups and the sample-based warm-up/cosine schedule
    (planned for --epochs epochs of samples_per_epoch, or --max_steps steps of samples_per_step if fewer), and the
    experts' own optimizer where the experts are in banks."""
    text_lr = cfg.text_lr if getattr(model, "text_backbone", None) is not None else None
    plan = SchedulePlan(cfg.epochs, cfg.max_steps, cfg.warmup_ratio, samples_per_epoch, samples_per_step,
                        text_warmup_ratio=cfg.text_warmup_ratio if text_lr is not None else None)
    # foreach: the same arithmetic, bit for bit, as the single-tensor loop torch picks on CPU, at 2.5x its speed
    # on ZeRO's flat partitions (bench/results/expert_scale.md); torch already picks it on GPUs.
    optimizer = torch.optim.AdamW(optimizer_groups(model, cfg.weight_decay, cfg.lr, cfg.router_lr_scale, text_lr),
                                  lr=cfg.lr, foreach=True)
    return build_engine(model, optimizer, ds_config, info, ep_size, cfg.expert_optimizer, cfg.weight_decay,
                        lr_scheduler=lambda opt: WarmupCosineBySamples(opt, plan))


def build_engine(model, optimizer, ds_config: dict, info: distributed.DistInfo, ep_size: int,
                 expert_mode: str = "dense", weight_decay: float = 0.0, lr_scheduler=None):
    """deepspeed.initialize, then the experts held in banks wired in at one place (`attach_expert_optimizer`)
    and ZeRO-0 clipping by the model's norm. The engine's `expert_optimizer` is falsy without banks."""
    import deepspeed
    has_banks = any(True for _ in getattr(model, "expert_banks", lambda: ())())
    if has_banks and ds_config.get("fp16", {}).get("enabled"):
        raise ConfigError("fp16 with the shared experts in banks (the default --grouped_experts): their loss "
                          "scaling is not implemented; use bf16 (ds_configs/zero2_bf16.json)")
    if has_banks and any(ds_config.get(k, {}).get("check_grad_overflow") is False for k in ("bf16", "bfloat16")):
        # without the check DeepSpeed steps bf16 through a non-finite norm (its gradients zeroed, decay and
        # moments still applied) while the experts skip it: the two would drift apart
        raise ConfigError("bf16 check_grad_overflow false with the shared experts in banks (the default "
                          "--grouped_experts): the experts skip a step with a non-finite gradient norm, so the "
                          "dense model must skip it too; remove the key (DeepSpeed's default is true)")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           lr_scheduler=lr_scheduler)
    experts = ExpertOptimizer(model, expert_mode, weight_decay, info, ep_size)   # after: the groups exist now
    engine.expert_optimizer = experts
    clip_by_the_model_norm(engine, info, experts)
    if experts:
        attach_expert_optimizer(engine, experts)
    return engine


def attach_expert_optimizer(engine, experts: ExpertOptimizer) -> None:
    """The experts' optimizer at DeepSpeed's points: their gradients reduced at the end of a window's backward
    (where DeepSpeed reduces the dense ones), their squared norm added into the norm DeepSpeed clips by, their
    update after DeepSpeed's step, when it was applied, with its learning rate and clipping coefficient."""
    backward, step = engine.backward, engine.step

    def backward_then_reduce(loss, *args, **kwargs):
        boundary = engine.is_gradient_accumulation_boundary()
        out = backward(loss, *args, **kwargs)
        if boundary:
            experts.reduce_gradients()
        return out

    def step_with_experts(*args, **kwargs):
        if not engine.is_gradient_accumulation_boundary():
            return step(*args, **kwargs)
        lr = next(g["lr"] for g in torch_optimizer(engine).param_groups if g.get("group") == "decay")
        experts.norm_squared = experts.squared_norm()
        try:
            out = step(*args, **kwargs)
            if engine.was_step_applied():
                experts.apply_update(lr, clip_divisor(engine))
        finally:
            experts.norm_squared = None
            experts.zero_grad()
        return out

    engine.backward, engine.step = backward_then_reduce, step_with_experts
    _add_experts_to_the_dense_norm(engine.optimizer, experts)


def _add_experts_to_the_dense_norm(optimizer, experts: ExpertOptimizer) -> None:
    """Make DeepSpeed's own norm (ZeRO 1/2: `scaled_global_norm`; its bf16 optimizer: the tensors of
    `get_grads_for_norm`) the whole model's: the experts' squared norm joins the dense one. ZeRO-0 fp32 clips
    with `clip_by_global_norm`, which counts them itself."""
    if hasattr(optimizer, "scaled_global_norm"):
        dense_norm = optimizer.scaled_global_norm

        def scaled_global_norm(*args, **kwargs):
            norm = dense_norm(*args, **kwargs)
            extra = experts.norm_squared
            return norm if extra is None else (norm.double() ** 2 + extra.to(norm.device)).sqrt().to(norm.dtype)
        optimizer.scaled_global_norm = scaled_global_norm
    elif hasattr(optimizer, "get_grads_for_norm"):
        grads_for_norm = optimizer.get_grads_for_norm

        def get_grads_for_norm(for_clipping=False):
            out = grads_for_norm(for_clipping=for_clipping)
            if for_clipping or experts.norm_squared is None:
                return out
            dense, by_group = out
            device = dense[0].device if dense else experts.norm_squared.device
            return dense + [experts.norm_squared.sqrt().float().reshape(1).to(device)], by_group
        optimizer.get_grads_for_norm = get_grads_for_norm
    elif not isinstance(optimizer, torch.optim.Optimizer):   # ZeRO-0 fp32 steps the torch optimizer itself
        # every config load_ds_config accepts lands above; another DeepSpeed wrapper (a new release) would
        # clip by the dense norm alone, so it stops here instead of training with a wrong clipping coefficient
        raise NotImplementedError(f"the experts' share of the clipping norm is not wired into {type(optimizer)}")


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer DeepSpeed steps (ZeRO's and the bf16 optimizer wrap it; the schedule sets its LRs)."""
    return engine.lr_scheduler.optimizer if engine.lr_scheduler is not None else engine.basic_optimizer


def clip_divisor(engine) -> float:
    """What DeepSpeed divided the dense gradients by for clipping this step: (norm + 1e-6) / max_norm where that
    exceeds 1 (ZeRO's rule), else 1; infinite for a non-finite norm (the experts then do not step)."""
    max_norm, norm = engine.gradient_clipping(), engine.get_global_grad_norm()
    if norm is not None and not math.isfinite(float(norm)):
        return math.inf
    if not max_norm or norm is None:
        return 1.0
    return max(1.0, (float(norm) + 1e-6) / max_norm)


def clip_by_the_model_norm(engine, info: distributed.DistInfo, experts: ExpertOptimizer | None = None):
    """Make a ZeRO-0 fp32 engine clip by the norm of the whole model (see `clip_by_global_norm`). ZeRO 1/2
    (fp32 and bf16) already sum every partition's squared norm over the whole data-parallel group, which
    counts each expert once (tested); low precision with ZeRO-0 is refused by `load_ds_config`."""
    if engine.gradient_clipping() > 0 and not (engine.zero_optimization() or engine.bfloat16_enabled()
                                               or engine.fp16_enabled()):
        engine.clip_fp32_gradients = types.MethodType(
            lambda self: clip_by_global_norm(self, self.gradient_clipping(), info, experts), engine)
    return engine


def clip_by_global_norm(engine, max_norm: float, info: distributed.DistInfo,
                        experts: ExpertOptimizer | None = None) -> torch.Tensor:
    """Clip the (already reduced) gradients of a ZeRO-0 fp32 engine by the norm of the whole model.

    DeepSpeed's ZeRO-0 clipping (`runtime.utils.clip_grad_norm_`) takes each rank's norm over the experts it
    holds and averages the norms over ranks; under expert parallelism the ranks hold different experts, so
    that is not the model's norm (DeepSpeed issue 8475) and the run clips differently from one process.
    Here: dense gradients are the same on every rank and count once; each expert-parallel group holds every
    expert exactly once, so the experts' squared norms are summed over that group (DeepSpeed's expert
    parameters here; the experts in banks by the expert optimizer, which then clips them itself).
    """
    dense, moe = [], {}
    for p in engine.module.parameters():
        if p.grad is None:
            continue
        squared = p.grad.detach().float().pow(2).sum()
        if is_moe_param(p):
            moe.setdefault(p.group_name, []).append(squared)
        else:
            dense.append(squared)
    total = torch.stack(dense).sum() if dense else torch.zeros(())
    for group_name, parts in moe.items():
        total = total + distributed.all_reduce_sum(torch.stack(parts).sum(), info,
                                                   group=groups._get_expert_parallel_group(group_name))
    if experts is not None and experts.norm_squared is not None:
        total = total + experts.norm_squared.to(total.dtype)
    norm = total.sqrt()
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    if coef < 1.0:
        for p in engine.module.parameters():
            if p.grad is not None:
                p.grad.detach().mul_(coef)
    engine._global_grad_norm = float(norm)   # what engine.get_global_grad_norm() reports, as under ZeRO
    return norm


def compute_dtype(engine) -> torch.dtype:
    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32
