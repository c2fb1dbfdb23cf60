"""Temporal front ends: a modality's [B, T, F] sequence -> a shorter one, before its encoder and experts.

The shared experts see each (utterance, task) row as a whole sequence of width T*d, so their cost grows
with T; MMSA's unaligned files have 375-500 audio/vision steps, mostly padding. `LengthAwarePool` averages
each utterance's valid steps in `steps` equal parts, so its output has `steps` steps whatever T was, and
padding never enters a mean. A new front end is one class here with the same forward signature.
"""
from __future__ import annotations

import torch
from torch import nn


class LengthAwarePool(nn.Module):
    """[B, T, F] + mask [B, T] -> [B, steps, F] + mask [B, steps] (valid steps first).

    An utterance with L > steps valid steps is cut into `steps` contiguous parts of L/steps steps (rounded
    down at each boundary), each averaged: all output steps are valid. One with L <= steps keeps its steps
    as they are, followed by masked padding. No parameters."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = mask.sum(1, keepdim=True)                                  # [B, 1]
        rank = mask.long().cumsum(1) - 1                                     # [B, T]: which valid step this is
        long = lengths > self.steps
        part = torch.where(long, torch.div(rank * self.steps, lengths.clamp_min(1), rounding_mode="floor"), rank)
        part = part.masked_fill(~mask, self.steps)                           # padding -> a part that is dropped
        weights = nn.functional.one_hot(part, self.steps + 1)[..., :self.steps].float()   # [B, T, steps]
        counts = weights.sum(1)                                               # [B, steps]
        # in fp32 whatever the run's precision: a bf16 sum of hundreds of steps would lose the mean's digits
        pooled = torch.einsum("bts,btf->bsf", weights, x.float()) / counts.clamp_min(1).unsqueeze(-1)
        return pooled.to(x.dtype), counts > 0


def output_steps(seq_len: int, steps: int) -> int:
    """The sequence length after the front end (`steps` = 0: no front end)."""
    return min(seq_len, steps) if steps else seq_len


def steps_per_modality(shapes: dict[str, tuple[int, int]], steps: int) -> dict[str, int]:
    """modality -> the time steps the model works on, from the data's (T, F) shapes and --temporal_steps."""
    return {m: output_steps(t, steps) for m, (t, _) in shapes.items()}


def build_frontend(seq_len: int, steps: int) -> nn.Module | None:
    """The front end of a modality with seq_len steps, or None where it is already short enough."""
    return LengthAwarePool(steps) if steps and seq_len > steps else None
