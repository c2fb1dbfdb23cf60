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


@torch.no_grad()
def init_low_rank_(down_w, down_b, up_w, up_b, generator: torch.Generator | None = None) -> None:
    """nn.Conv1d's default init (kaiming-uniform weights, uniform biases, bound 1/sqrt(fan_in)), in a fixed
    draw order so a standalone expert and a slice of stacked experts get the same values."""
    for weight, bias in ((down_w, down_b), (up_w, up_b)):
        bound = 1.0 / math.sqrt(weight.shape[1] * weight.shape[2])   # in_channels * kernel_size
        weight.uniform_(-bound, bound, generator=generator)
        bias.uniform_(-bound, bound, generator=generator)


class LowRankExpert(nn.Module):
    """Conv1d(d -> r, k=3) -> GELU -> Conv1d(r -> d, k=1); about 4*d*r parameters instead of 4*d^2."""

    def __init__(self, d_model: int, rank: int, seq_len: int | None = None):
        super().__init__()
        self.d_model, self.rank, self.seq_len = d_model, rank, seq_len
        self.down = nn.Conv1d(d_model, rank, kernel_size=3, padding=1)
        self.up = nn.Conv1d(rank, d_model, kernel_size=1)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draws from `generator` so that each expert gets its own start (DeepSpeed deep-copies one
        template into every expert)."""
        init_low_rank_(self.down.weight, self.down.bias, self.up.weight, self.up.bias, generator)

    def forward_sequences(self, x: torch.Tensor) -> torch.Tensor:
        """[N, T, d] -> [N, T, d]."""
        h = self.down(x.transpose(1, 2))
        return self.up(F.gelu(h)).transpose(1, 2)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """MoE use: [..., rows, T*d] flattened utterances -> same shape (DeepSpeed's stock `Experts` calls
        this on every capacity slot of the expert, padding included)."""
        width = self.seq_len * self.d_model
        assert rows.shape[-1] == width, f"expert expects rows of width T*d = {width}, got {rows.shape[-1]}"
        return self.forward_sequences(rows.reshape(-1, self.seq_len, self.d_model)).reshape(rows.shape)


def expert_parameter_count(d_model: int, rank: int) -> int:
    """3*d*r + r (down) + r*d + d (up) = 4*d*r + r + d."""
    return 4 * d_model * rank + rank + d_model
