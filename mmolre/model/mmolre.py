"""MMoLRE: encoders -> one UniTSE per modality -> task-adaptive fusion per task -> task heads."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from deepspeed.moe.utils import is_moe_param

from ..config import EMOTIONS, TASKS, ModelConfig
from .experts import LowRankExpert
from .frontend import build_frontend, steps_per_modality
from .fusion import ConcatFusion, TaskAdaptiveFusion
from .text_encoder import PretrainedTextEncoder
from .unitse import BlockStats, UniTSE


@dataclass
class ModelOutput:
    sentiment: torch.Tensor          # [B] regression
    emotion_logits: torch.Tensor     # [B, 6]
    aux_loss: torch.Tensor           # [layers, tasks]
    expert_load: torch.Tensor        # [layers, tasks, N]
    router_entropy: torch.Tensor     # [layers, tasks]
    dropped_fraction: torch.Tensor   # [layers, tasks] routes dropped for capacity
    z_loss: torch.Tensor             # [layers, tasks] router z-loss
    routes: torch.Tensor             # [layers, tasks, B, k'] experts assigned to each utterance's rows: k per
    combine: torch.Tensor            # utterance row, T*k per step rows (-1: step not routed); combine weights
    modality_weights: torch.Tensor   # [tasks, B, M]
    layer_names: list[str]


class ModalityEncoder(nn.Module):
    """Projects precomputed features F_m -> d, adds learned positions, normalises."""

    def __init__(self, feature_dim: int, seq_len: int, d_model: int, dropout: float):
        super().__init__()
        self.proj = nn.Linear(feature_dim, d_model)
        self.pos = nn.Parameter(torch.zeros(seq_len, d_model))
        nn.init.normal_(self.pos, std=0.02)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(self.proj(x) + self.pos))


class MMoLRE(nn.Module):
    def __init__(self, cfg: ModelConfig, shapes: dict[str, tuple[int, int]], ep_size: int = 1):
        """shapes: modality -> (seq_len T_m, feature_dim F_m), in the order the modalities are used."""
        super().__init__()
        self.cfg, self.shapes, self.ep_size = cfg, dict(shapes), ep_size
        self.modalities = list(shapes)
        d = cfg.d_model
        # --finetune_text: the text "features" are token ids, encoded here by a pretrained encoder
        self.text_backbone = PretrainedTextEncoder(cfg.text_encoder) if cfg.finetune_text else None
        if self.text_backbone is not None and shapes["text"][1] != self.text_backbone.hidden_size:
            raise ValueError(f"--text_encoder {cfg.text_encoder!r} has width {self.text_backbone.hidden_size}, the "
                             f"data was tokenized for width {shapes['text'][1]}")
        # Long sequences are first pooled to --temporal_steps; everything after sees the shorter length.
        self.frontends = nn.ModuleDict({m: f for m, (t, _) in shapes.items()
                                        if (f := build_frontend(t, cfg.temporal_steps)) is not None})
        steps = steps_per_modality(shapes, cfg.temporal_steps)
        self.encoders = nn.ModuleDict(
            {m: ModalityEncoder(f, steps[m], d, cfg.dropout) for m, (t, f) in shapes.items()})
        # hard_sharing: one stream shared by both tasks; otherwise one stream per task
        self.num_streams = 1 if cfg.model == "hard_sharing" else len(TASKS)
        self.unitse = nn.ModuleDict({
            m: UniTSE(cfg.blocks, d_model=d, seq_len=t, num_experts=cfg.num_experts, top_k=cfg.effective_top_k,
                      expert_rank=cfg.rank, task_rank=cfg.task_rank, num_tasks=self.num_streams,
                      ep_size=ep_size, dropout=cfg.dropout, capacity_factor=cfg.capacity_factor,
                      eval_capacity_factor=cfg.eval_capacity_factor,
                      router_noise=cfg.router_noise, grouped_experts=cfg.grouped_experts,
                      use_shared=cfg.shared_experts and cfg.model != "hard_sharing",
                      use_task=cfg.task_experts and cfg.model != "mmoe",
                      uniform_gate=not cfg.routers, balance=cfg.balance, bias_rate=cfg.balance_bias_rate,
                      router_temperature=cfg.router_temperature, bias_update=cfg.balance_bias_update,
                      route_per=cfg.route_per)
            for m, t in steps.items()})
        fusion = TaskAdaptiveFusion if cfg.fusion == "adaptive" else ConcatFusion
        self.fusion = nn.ModuleList(fusion(d, self.modalities) for _ in range(self.num_streams))
        self.sentiment_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(d, 1))
        self.emotion_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(cfg.dropout),
                                          nn.Linear(d, len(EMOTIONS)))

    def moe_layer_names(self) -> list[str]:
        """'text.0', 'text.1', ... in the order DeepSpeed numbers MoE layers in checkpoints."""
        return [f"{m}.{i}" for m in self.modalities for i in range(self.cfg.blocks)]

    def moe_blocks(self):
        """(layer name, UniTSEBlock) for every MoE layer, in checkpoint order."""
        for m in self.modalities:
            for i, block in enumerate(self.unitse[m].blocks):
                yield f"{m}.{i}", block

    def expert_banks(self):
        """(layer name, ExpertBank) for every MoE layer on the fast path, in checkpoint order."""
        for name, block in self.moe_blocks():
            if block.expert_bank is not None:
                yield name, block.expert_bank

    def init_shared_experts(self, seed: int, ep_rank: int) -> None:
        """Give every shared expert its own initial weights, a function of (seed, layer, GLOBAL expert id)
        only, so the same seed builds the same global model under any expert-parallel size."""
        for layer_idx, (_, block) in enumerate(self.moe_blocks()):
            local = block.num_local_shared
            for local_id in range(local):
                global_id = ep_rank * local + local_id
                block.reset_shared_expert(
                    local_id, torch.Generator().manual_seed(seed * 1_000_003 + layer_idx * 10_007 + global_id))

    def forward(self, features: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                real: torch.Tensor | None = None) -> ModelOutput:
        """`real` [B] bool: which samples are real where a batch is padded (None: all); padding gets no route."""
        masks = dict(masks)   # the front ends replace some (the caller's stay as they were)
        streams: dict[str, list[torch.Tensor]] = {}
        stats: list[BlockStats] = []
        for m in self.modalities:
            x = features[m]
            if m == "text" and self.text_backbone is not None:
                x = self.text_backbone(x, masks[m])
            if m in self.frontends:
                x, masks[m] = self.frontends[m](x, masks[m])
            x = self.encoders[m](x)
            streams[m], s = self.unitse[m](x, masks[m], real)
            stats.extend(s)
        fused, weights = [], []
        for stream, fusion in enumerate(self.fusion):
            z, w = fusion({m: streams[m][stream] for m in self.modalities}, masks)
            fused.append(z)
            weights.append(w)
        if self.num_streams == 1:  # hard sharing: both heads read the one shared representation
            fused, weights = fused * len(TASKS), weights * len(TASKS)
        return ModelOutput(
            sentiment=self.sentiment_head(fused[0]).squeeze(-1),
            emotion_logits=self.emotion_head(fused[1]),
            aux_loss=torch.stack([s.aux_loss for s in stats]),
            expert_load=torch.stack([s.expert_load for s in stats]),
            router_entropy=torch.stack([s.router_entropy for s in stats]),
            dropped_fraction=torch.stack([s.dropped_fraction for s in stats]),
            z_loss=torch.stack([s.z_loss for s in stats]),
            routes=_stack_routes([s.routes for s in stats], -1), combine=_stack_routes([s.combine for s in stats], 0.0),
            modality_weights=torch.stack(weights).detach(),
            layer_names=self.moe_layer_names())


def _stack_routes(per_layer: list[torch.Tensor], fill) -> torch.Tensor:
    """[layers, tasks, B, k']; k' = 0 for every layer if some layer has no shared experts (an ablation). Step
    routes of modalities with fewer steps are filled to the longest with `fill` (not routed)."""
    widths = {r.shape[-1] for r in per_layer}
    if 0 in widths:
        return torch.stack([r[..., :0] for r in per_layer])
    width = max(widths)
    return torch.stack([F.pad(r, (0, width - r.shape[-1]), value=fill) for r in per_layer])


def count_parameters(model: MMoLRE) -> dict[str, int]:
    """Global parameter counts (all experts on all ranks), whatever this rank holds."""
    cfg = model.cfg
    local_shared = sum(t.numel() for _, block in model.moe_blocks() for t in block.shared_expert_tensors())
    dense = sum(p.numel() for p in model.parameters() if not is_moe_param(p))
    shared = local_shared * model.ep_size
    layers = sum(1 for _, b in model.moe_blocks() if b.moe is not None)
    per_expert = shared // (cfg.num_experts * layers) if layers else 0
    # Each task's row visits k shared experts per MoE layer: the parameters one utterance touches
    # (both tasks) are the dense ones plus at most tasks*k experts per layer (tasks*k per step with step rows).
    rows = [model.num_streams * block.layout.rows_per_utterance for _, block in model.moe_blocks()
            if block.moe is not None]
    active = dense + sum(min(cfg.num_experts, r * cfg.effective_top_k) for r in rows) * per_expert
    full_rank_shared = layers * cfg.num_experts * sum(
        p.numel() for p in LowRankExpert(cfg.d_model, cfg.d_model).parameters())
    return {"total": dense + shared, "expert": shared, "dense": dense, "per_expert": per_expert,
            "active_per_utterance": active, "full_rank_expert_equivalent": full_rank_shared}
