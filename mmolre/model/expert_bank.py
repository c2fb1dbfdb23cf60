"""The weights of one MoE layer's local shared experts, kept outside the module's parameters.

Why outside: a parameter of the module is something DeepSpeed's engine treats whole on every step (ZeRO's flat
gradient buffers, the clipping norm, AdamW over every element, zeroing, the all-gather of updated weights)
and its checkpoints write one file per expert. With thousands of experts of which a step feeds a few hundred,
that is the cost of the experts that exist, not of the work done. So each layer's experts are four fp32
tensors here, one row per local expert ([experts, *shape of a LowRankExpert's parameter]); a forward gathers
only the rows of experts that received rows, and their gradients come back sparse (those rows only).
`mmolre/expert_optimizer.py` reduces, clips and steps them, and saves them in one file per rank.

The tensors are the fp32 master weights whatever the engine's precision (a bf16 run computes with bf16
copies of the gathered rows). The DeepSpeed MoE layer around them (gate, dispatch, all-to-all, expert-parallel
groups) is unchanged; `grouped.py` holds it.
"""
from __future__ import annotations

import torch

from .experts import LowRankExpert

PARAMS = ("down.weight", "down.bias", "up.weight", "up.bias")   # a LowRankExpert's parameters, in order


class _GatherRows(torch.autograd.Function):
    """weight.index_select(0, ids) whose gradient is sparse: only the gathered rows (ids unique)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.shape = weight.shape
        return weight.index_select(0, ids)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ids, = ctx.saved_tensors
        return torch.sparse_coo_tensor(ids.unsqueeze(0), grad.contiguous(), ctx.shape, check_invariants=False), None


class ExpertBank:
    """One MoE layer's `num_local` experts: for each of PARAMS a leaf tensor [num_local, *shape] (fp32,
    requires_grad) whose gradient is sparse over expert rows."""

    def __init__(self, template: LowRankExpert, num_local: int):
        self.num_local = num_local
        self.tensors = {}
        for name, p in template.named_parameters():
            stacked = p.detach().float().unsqueeze(0).repeat(num_local, *[1] * p.ndim)
            self.tensors[name] = stacked.requires_grad_(True)
        assert tuple(self.tensors) == PARAMS, tuple(self.tensors)

    def rows(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameters of local experts `ids` (unique) [len(ids), *shape]; their gradients reach the bank as
        sparse rows."""
        return {name: _GatherRows.apply(t, ids) for name, t in self.tensors.items()}

    def expert(self, i: int) -> dict[str, torch.Tensor]:
        """Views of local expert i's parameters, named like a LowRankExpert's."""
        return {name: t[i] for name, t in self.tensors.items()}

    def grad_of(self, i: int) -> dict[str, torch.Tensor | None]:
        """Local expert i's gradient per parameter (zeros where the expert got no row); None where no backward
        has run."""
        out = {}
        for name, t in self.tensors.items():
            g = t.grad
            if g is None:
                out[name] = None
            elif g.is_sparse:
                g = g.coalesce()
                hit = (g.indices()[0] == i).nonzero().flatten()
                out[name] = g.values()[hit[0]] if len(hit) else torch.zeros_like(t[i])
            else:
                out[name] = g[i]
        return out

    def to_device(self, device: torch.device) -> None:
        """Move (never cast: the bank holds the fp32 masters)."""
        for name, t in self.tensors.items():
            if t.device != device:
                self.tensors[name] = t.detach().to(device).requires_grad_(True)

    @torch.no_grad()
    def load_rows(self, values: dict[str, torch.Tensor]) -> None:
        """Set every local expert's weights from {name: [num_local, *shape]}."""
        for name, t in self.tensors.items():
            t.copy_(values[name])
