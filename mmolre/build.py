"""The build steps of a training run, each a named function: the rank's device, the data, the model, the batch
geometry and the emotion loss's weights. `train.Trainer` calls them in order."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import distributed
from .config import EMOTIONS, RunConfig
from .data import describe_source, prepare
from .data.tokens import TextTokens
from .emotion_decisions import prevalence_weights
from .model import MMoLRE, count_parameters
from .results import SYNTHETIC_NOTICE


@dataclass(frozen=True)
class BatchGeometry:
    micro: int           # samples per rank and micro batch
    grad_accum: int      # micro batches per optimizer step
    world: int

    @property
    def samples_per_micro(self) -> int:    # one micro batch on every rank
        return self.micro * self.world

    @property
    def samples_per_step(self) -> int:     # one optimizer step
        return self.samples_per_micro * self.grad_accum


def build_model(cfg: RunConfig, data, ep_size: int, info) -> tuple[MMoLRE, dict]:
    """The model with every shared expert's initial weights a function of (seed, layer, global id)."""
    torch.manual_seed(cfg.train.seed)
    model = MMoLRE(cfg.model, data.shapes, ep_size=ep_size)
    model.init_shared_experts(cfg.train.seed, distributed.expert_parallel_rank(info.rank, ep_size))
    params = count_parameters(model)
    params["expert_bytes_per_rank"] = sum(t.numel() * t.element_size() for _, b in model.moe_blocks()
                                          for t in b.shared_expert_tensors())
    return model, params


def load_data(cfg: RunConfig, info):
    """Local rank 0 builds the caches, every rank memory-maps them; the log says what was read."""
    m = cfg.model
    text_tokens = TextTokens(m.text_encoder, cfg.data.text_max_length) if m.finetune_text else None
    data = prepare(cfg.data, builds=info.local_rank == 0, barrier=lambda: distributed.barrier(info),
                   text_tokens=text_tokens)
    if data.synthetic:
        distributed.print_main(info, SYNTHETIC_NOTICE)
    for name, meta in data.sources.items():
        distributed.print_main(info, describe_source(name, meta, data.modalities, m.text_encoder))
    return text_tokens, data


def emotion_pos_weight(cfg: RunConfig, data, device, info) -> torch.Tensor | None:
    weight = prevalence_weights(data.splits["train"]) if cfg.train.emotion_pos_weight == "prevalence" else None
    if weight is None:
        return None
    distributed.print_main(info, "emotion BCE: present cases weighted by (1 - prevalence) / prevalence: "
              + ", ".join(f"{e} {w:.2f}" for e, w in zip(EMOTIONS, weight)))
    return torch.tensor(weight, dtype=torch.float32, device=device)


def check_memory(cfg: RunConfig, shapes: dict, ep_size: int, ds_config: dict, info, device):
    """Refuse, on every rank alike, a run that would not fit, before the model is built (memory_estimate.py);
    returns the estimate."""
    from .config import ConfigError
    from .memory_estimate import available, check_fits, estimate, host_at_build
    zero = ds_config.get("zero_optimization", {}).get("stage", 0)
    bf16 = any(ds_config.get(key, {}).get("enabled") for key in ("bf16", "bfloat16"))
    needed = estimate(cfg, shapes, ep_size, ds_config["train_micro_batch_size_per_gpu"], info.world_size, zero, bf16,
                      ds_config.get("gradient_accumulation_steps", 1))
    checks = [(needed, *available(device, info.local_world_size))]
    if device.type != "cpu":   # the model is built in host memory before the engine moves it
        checks.append((host_at_build(cfg, shapes, ep_size), *available(torch.device("cpu"), info.local_world_size)))
    distributed.print_main(info, f"memory per rank: about {needed.describe()}; {checks[0][2]}")
    refusal = None
    if cfg.train.memory_check:
        try:
            for need, have, what in checks:
                check_fits(need, have, what)
        except ConfigError as e:
            refusal = str(e)
    refusals = [r for r in distributed.all_gather(refusal, info) if r]   # the same verdict on every rank
    if refusals:
        raise ConfigError(refusals[0])
    return needed


def rank_device(info) -> torch.device:
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    return torch.device(acc.device_name(info.local_rank) if acc.device_name() != "cpu" else "cpu")
