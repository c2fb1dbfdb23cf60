"""Routing granularity: what one row of a shared-expert MoE layer is (--route_per).

* `utterance` (the paper's): one row per (utterance, task), the whole sequence flattened to width T*d and routed
  on its masked time average. A step routes one row per utterance and task, so at thousands of experts most
  experts see no row.
* `step`: one row per (utterance, task, valid time step), DeepSpeed's token granularity. The row is the step and
  its two neighbours (width 3*d: the window the experts' kernel-3 convolution reads, zeros past the ends and at
  padded steps, as in the utterance row), and it is routed on the step itself. Padded time steps and padded
  utterances are not rows at all, so they take no route, no capacity slot and no load, and a rank's row count
  is its valid steps.

The experts' arithmetic is the same: the up-projection has kernel 1, so a window's centre output is the
utterance path's output at that step. With one shared expert the two granularities compute the same model
(tests/unit/test_granularity.py). The experts of either granularity have the same weights, so a checkpoint or an
export of one loads into the other.

A layout turns a block's task streams into rows (`rows`), the experts' combined outputs back into per-task updates
(`updates`), and per-row routing values into one table per utterance (`per_utterance`: [tasks, B, k] for
utterances, [tasks, B, T*k] for steps, -1 / 0 where a step is not routed) for the specialisation statistics.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.nn import functional as F

from ..config import ROUTE_PER
from .routing import RowRouting

WINDOW = 3   # the low-rank experts' down-convolution kernel: a step row carries the step and its two neighbours


class Placement(NamedTuple):
    """Where a call's rows came from: the batch size, the steps per utterance, and for step rows the flat
    (task, utterance, step) index of each row (None for utterance rows)."""
    batch: int
    steps: int
    index: torch.Tensor | None = None


class _RowLayout:
    expert_seq_len: int       # the steps an expert's row holds
    rows_per_utterance: int   # the most rows one utterance routes per task

    def __init__(self, seq_len: int, d_model: int, num_tasks: int):
        self.seq_len, self.d_model, self.num_tasks = seq_len, d_model, num_tasks

    def task_major(self, streams: list[torch.Tensor], time_mask: torch.Tensor) -> torch.Tensor:
        """[tasks*B, T, d], task after task, zero past each sequence's end (what the experts see)."""
        keep = time_mask.unsqueeze(-1).to(streams[0].dtype)
        return torch.cat(streams, 0) * keep.repeat(self.num_tasks, 1, 1)


class UtteranceRows(_RowLayout):
    """One row per (utterance, task): the masked sequence flattened to T*d."""

    def __init__(self, seq_len: int, d_model: int, num_tasks: int):
        super().__init__(seq_len, d_model, num_tasks)
        self.expert_seq_len, self.rows_per_utterance = seq_len, 1

    def rows(self, streams: list[torch.Tensor], time_mask: torch.Tensor, real: torch.Tensor | None):
        batch = streams[0].shape[0]
        rows = self.task_major(streams, time_mask)
        task_ids = torch.arange(self.num_tasks, device=rows.device).repeat_interleave(batch)
        routing = RowRouting(task_ids, time_mask.repeat(self.num_tasks, 1),
                             None if real is None else real.repeat(self.num_tasks))
        return rows.reshape(rows.shape[0], -1), routing, Placement(batch, self.seq_len)

    def updates(self, shared: torch.Tensor, placement: Placement) -> list[torch.Tensor]:
        """The experts' combined rows [tasks*B, T*d] -> one [B, T, d] update per task."""
        return list(shared.view(-1, placement.steps, self.d_model).split(placement.batch, 0))

    def per_utterance(self, values: torch.Tensor, placement: Placement, fill) -> torch.Tensor:
        """Per-row values [tasks*B, k] -> [tasks, B, k]."""
        return values.reshape(self.num_tasks, placement.batch, -1)


class StepRows(_RowLayout):
    """One row per (utterance, task, valid step): the step's window of WINDOW steps, flattened to WINDOW*d."""

    def __init__(self, seq_len: int, d_model: int, num_tasks: int):
        super().__init__(seq_len, d_model, num_tasks)
        self.expert_seq_len, self.rows_per_utterance = WINDOW, seq_len

    def rows(self, streams: list[torch.Tensor], time_mask: torch.Tensor, real: torch.Tensor | None):
        batch, steps, d = streams[0].shape
        valid = time_mask if real is None else time_mask & real.unsqueeze(1)     # padding is not a row
        seqs = self.task_major(streams, time_mask)
        index = valid.repeat(self.num_tasks, 1).reshape(-1).nonzero().squeeze(1)   # rows in (task, b, t) order
        padded = F.pad(seqs, (0, 0, 1, 1)).reshape(-1, d)                      # [tasks*B*(T+2), d]
        # the window of step t of sequence s is padded steps t, t+1, t+2 of s: one gather of the valid steps' windows
        sequence, step = torch.div(index, steps, rounding_mode="floor"), index % steps
        start = sequence * (steps + 2) + step
        window = (start.unsqueeze(1) + torch.arange(WINDOW, device=index.device)).reshape(-1)
        rows = padded.index_select(0, window).view(len(index), WINDOW * d)     # [S, WINDOW*d]
        task_ids = torch.div(index, batch * steps, rounding_mode="floor")
        centre = torch.zeros(len(index), WINDOW, dtype=torch.bool, device=rows.device)
        centre[:, WINDOW // 2] = True   # the gate's masked time mean over this mask is the step itself
        return rows, RowRouting(task_ids, centre), Placement(batch, steps, index)

    def updates(self, shared: torch.Tensor, placement: Placement) -> list[torch.Tensor]:
        """The experts' combined rows -> one [B, T, d] update per task, zero at unrouted steps. The rows are the
        window's centre output (width d, the fast path computes only that) or the whole window's (width
        WINDOW*d, DeepSpeed's own expert loop), whose middle step is the centre."""
        d = self.d_model
        windows = shared.view(shared.shape[0], shared.shape[1] // d, d)
        centre = windows[:, windows.shape[1] // 2]
        out = centre.new_zeros(self.num_tasks * placement.batch * placement.steps, d).index_copy(
            0, placement.index, centre)
        return list(out.view(self.num_tasks * placement.batch, placement.steps, d).split(placement.batch, 0))

    def per_utterance(self, values: torch.Tensor, placement: Placement, fill) -> torch.Tensor:
        """Per-row values [S, k] -> [tasks, B, T*k], every step's k values in step order, `fill` where a step is
        not routed (padding)."""
        k = values.shape[1]
        table = values.new_full((self.num_tasks * placement.batch * placement.steps, k), fill)
        table = table.index_copy(0, placement.index, values)
        return table.view(self.num_tasks, placement.batch, placement.steps * k)


def row_layout(route_per: str, seq_len: int, d_model: int, num_tasks: int):
    if route_per not in ROUTE_PER:
        raise ValueError(f"route_per must be one of {ROUTE_PER}, got {route_per!r}")
    return (UtteranceRows if route_per == "utterance" else StepRows)(seq_len, d_model, num_tasks)
