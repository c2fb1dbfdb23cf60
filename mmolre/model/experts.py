"""Low-rank experts: a Conv1d bottleneck over time (kernel 3 down to rank r, GELU, kernel 1 back to d).

A shared expert lives inside DeepSpeed's MoE layer, which hands it rows of width T*d (one row = one whole
utterance of one task) stacked as `[..., rows, T*d]`; it reshapes them to sequences, convolves along
time, and flattens back. The task-specific experts use `forward_sequences` on `[B, T, d]` directly.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class LowRankExpert(nn.Module):
    """Conv1d(d -> r, k=3) -> GELU -> Conv1d(r -> d, k=1); about 4*d*r parameters instead of 4*d^2."""

    def __init__(self, d_model: int, rank: int, seq_len: int | None = None):
        super().__init__()
        self.d_model, self.rank, self.seq_len = d_model, rank, seq_len
        self.down = nn.Conv1d(d_model, rank, kernel_size=3, padding=1)
        self.up = nn.Conv1d(rank, d_model, kernel_size=1)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Kaiming-uniform weights and uniform biases like nn.Conv1d, drawn from `generator` so that each
        expert gets its own start (DeepSpeed deep-copies one template into every expert)."""
        for conv in (self.down, self.up):
            fan_in = conv.in_channels * conv.kernel_size[0]
            bound = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                conv.weight.uniform_(-bound, bound, generator=generator)
                conv.bias.uniform_(-bound, bound, generator=generator)

    def forward_sequences(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, d] -> [N, T, d]."""
        h = self.down(x.transpose(1, 2))
        return self.up(F.gelu(h)).transpose(1, 2)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """MoE use: [..., rows, T*d] flattened utterances -> same shape."""
        width = self.seq_len * self.d_model
        assert rows.shape[-1] == width, f"expert expects rows of width T*d = {width}, got {rows.shape[-1]}"
        seqs = rows.reshape(-1, self.seq_len, self.d_model)
        return self.forward_sequences(seqs).reshape(rows.shape)


def expert_parameter_count(d_model: int, rank: int) -> int:
    """3*d*r + r (down) + r*d + d (up) = 4*d*r + r + d."""
    return 4 * d_model * rank + rank + d_model
