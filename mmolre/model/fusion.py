"""Task-adaptive multimodal fusion: one per task.

Each modality's task stream is pooled over time by masked attention, then the modalities are mixed with
weights computed from the input (softmax over modalities), so each task can lean on different modalities
for each utterance.
"""
from __future__ import annotations

import torch
from torch import nn


class AttentionPool(nn.Module):
    """[B, T, d] + mask [B, T] -> [B, d], with a learned score per time step.

    The score has no final bias: softmax over time ignores a constant, so that bias would get only
    rounding noise as its gradient, which Adam turns into full-size random steps."""

    def __init__(self, d_model: int):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(d_model, d_model), nn.Tanh(), nn.Linear(d_model, 1, bias=False))
        self.register_load_state_dict_pre_hook(self._drop_obsolete_bias)

    @staticmethod
    def _drop_obsolete_bias(module, state_dict, prefix, *args) -> None:
        state_dict.pop(prefix + "score.2.bias", None)   # checkpoints of versions that had it (no effect)

    def forward(self, x: torch.Tensor, time_mask: torch.Tensor) -> torch.Tensor:
        scores = self.score(x).squeeze(-1).masked_fill(~time_mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-masked row pools to zero
        return torch.einsum("bt,btd->bd", weights, x)


class TaskAdaptiveFusion(nn.Module):
    def __init__(self, d_model: int, modalities: list[str]):
        super().__init__()
        self.modalities = list(modalities)
        self.pools = nn.ModuleDict({m: AttentionPool(d_model) for m in self.modalities})
        self.weigher = nn.Sequential(nn.Linear(d_model * len(self.modalities), d_model), nn.GELU(),
                                     nn.Linear(d_model, len(self.modalities)))

    def forward(self, streams: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]):
        """Returns the fused vector [B, d] and the modality weights [B, M]."""
        pooled = torch.stack([self.pools[m](streams[m], masks[m]) for m in self.modalities], 1)  # [B, M, d]
        weights = torch.softmax(self.weigher(pooled.flatten(1)), dim=-1)
        return torch.einsum("bm,bmd->bd", weights, pooled), weights


class ConcatFusion(nn.Module):
    """The ablation of task-adaptive fusion: masked mean of each modality, concatenated, projected to d."""

    def __init__(self, d_model: int, modalities: list[str]):
        super().__init__()
        self.modalities = list(modalities)
        self.proj = nn.Linear(d_model * len(self.modalities), d_model)

    def forward(self, streams: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]):
        pooled = []
        for m in self.modalities:
            w = masks[m].unsqueeze(-1).to(streams[m].dtype)
            pooled.append((streams[m] * w).sum(1) / w.sum(1).clamp_min(1.0))
        z = self.proj(torch.cat(pooled, -1))
        return z, z.new_full((z.shape[0], len(self.modalities)), 1.0 / len(self.modalities))
