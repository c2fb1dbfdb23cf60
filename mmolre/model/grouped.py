"""The fast path of the shared experts: routed rows only, all local experts in one batched computation.

DeepSpeed's MoE layer, as it comes, lays the routed rows out in an [experts, capacity, row] buffer, with
capacity = the busiest expert's load, and calls each local expert in Python on its whole slab, padding
included. With rows that are whole utterances (T*d wide) and many experts, that buffer and those calls,
not the arithmetic, are the cost, and both grow with the expert count. This module keeps the layer a
DeepSpeed MoE layer and changes two things:

* `StackedLowRankExperts` subclasses DeepSpeed's `Experts` and holds the local experts as four stacked
  parameters carrying DeepSpeed's expert marks; its state dict shows them per expert under DeepSpeed's own
  keys, so the optimizer groups and the per-global-id checkpoint files are DeepSpeed's. Each routed row
  gets its expert's weights and both convolutions run as batched matmuls: no per-expert Python call, and
  no per-expert parameter for autograd, ZeRO or the optimizer to visit.
* `CompactMOELayer` subclasses DeepSpeed's `MOELayer`: same gate (its top-k, capacity and aux logic), same
  `_AllToAll`, but the buffer sent to each rank holds only the rows routed there, padded to the largest
  per-rank count (agreed by one all-reduce, as DeepSpeed's no-drop capacity is), not to experts x capacity.
  Expert ids travel in a small integer all-to-all beside the rows.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from deepspeed.moe.experts import Experts
from deepspeed.moe.sharded_moe import MOELayer, _AllToAll

from .experts import LowRankExpert, init_low_rank_


PARAMS = ("down.weight", "down.bias", "up.weight", "up.bias")   # a LowRankExpert's parameters, in order


def _stacked_name(name: str) -> str:
    return name.replace(".", "_")


class StackedLowRankExperts(Experts):
    """All local low-rank experts as four stacked parameters [E_local, ...].

    One Parameter per weight kind instead of four per expert: autograd, ZeRO's gradient hooks and the
    optimizer do a constant amount of per-parameter work whatever the expert count. The parameters carry
    DeepSpeed's expert marks (`allreduce=False`, the expert group name), and the state dict shows them per
    expert, under the keys DeepSpeed's `Experts` uses (`deepspeed_experts.<i>.down.weight`, ...), so
    DeepSpeed writes and reads one checkpoint file per global expert id exactly as for its own experts.
    """

    def __init__(self, template: LowRankExpert, num_local_experts: int, expert_group_name: str):
        nn.Module.__init__(self)  # not Experts.__init__: no per-expert deep copies
        self.num_local_experts = num_local_experts
        self.seq_len, self.d_model, self.rank = template.seq_len, template.d_model, template.rank
        for name, p in template.named_parameters():
            stacked = nn.Parameter(p.detach().unsqueeze(0).repeat(num_local_experts, *[1] * p.ndim))
            stacked.allreduce, stacked.group_name = False, expert_group_name
            self.register_parameter(_stacked_name(name), stacked)
        self.register_state_dict_post_hook(self._per_expert_keys)
        self.register_load_state_dict_pre_hook(self._stack_keys)

    def expert(self, i: int) -> dict[str, torch.Tensor]:
        """Views of local expert i's parameters, named like a LowRankExpert's."""
        return {name: getattr(self, _stacked_name(name))[i] for name in PARAMS}

    def reset_expert(self, i: int, generator: torch.Generator | None = None) -> None:
        init_low_rank_(*self.expert(i).values(), generator)

    @staticmethod
    def _per_expert_keys(module, state_dict, prefix, local_metadata) -> None:
        for name in PARAMS:
            stacked = state_dict.pop(prefix + _stacked_name(name))
            for i in range(stacked.shape[0]):
                state_dict[f"{prefix}deepspeed_experts.{i}.{name}"] = stacked[i]

    @staticmethod
    def _stack_keys(module, state_dict, prefix, *args) -> None:
        for name in PARAMS:
            keys = [f"{prefix}deepspeed_experts.{i}.{name}" for i in range(module.num_local_experts)]
            if all(k in state_dict for k in keys):
                state_dict[prefix + _stacked_name(name)] = torch.stack([state_dict.pop(k) for k in keys])

    def forward_rows(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """rows [n, T*d] for local expert local_ids [n] (-1: padding, output 0) -> [n, T*d]."""
        t, d = self.seq_len, self.d_model
        real = (local_ids >= 0).nonzero().squeeze(1)
        all_real = len(real) == len(local_ids)
        idx = local_ids if all_real else local_ids.index_select(0, real)
        x = (rows if all_real else rows.index_select(0, real)).view(-1, t, d)
        # Each row gets its expert's weights. index_select, not fancy indexing: its backward is an
        # index_add, far cheaper on CPU than the accumulating index_put that `w[idx]` backpropagates through.
        down = self.down_weight.permute(0, 3, 2, 1).index_select(0, idx)          # [n, 3, d, r]
        up = self.up_weight.squeeze(-1).transpose(1, 2).index_select(0, idx)      # [n, r, d]
        # Conv1d(k=3, padding=1) = three time-shifted matmuls on the zero-padded sequence (views, no copies).
        padded = F.pad(x, (0, 0, 1, 1))                                            # [n, T+2, d]
        h = self.down_bias.index_select(0, idx).unsqueeze(1)
        for tap in range(3):
            h = h + torch.bmm(padded[:, tap:tap + t], down[:, tap])               # [n, T, r]
        y = torch.baddbmm(self.up_bias.index_select(0, idx).unsqueeze(1), F.gelu(h), up).flatten(1)
        return y if all_real else rows.new_zeros(rows.shape).index_copy(0, real, y)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """DeepSpeed's `Experts` signature: [ep, E_local, C, M], every slot computed by its slab's expert."""
        ep, num_local, capacity, width = inputs.shape
        ids = torch.arange(num_local, device=inputs.device).view(1, -1, 1).expand(ep, -1, capacity)
        return self.forward_rows(inputs.reshape(-1, width), ids.reshape(-1)).view(inputs.shape)


class CompactMOELayer(MOELayer):
    """DeepSpeed's MOELayer with a dispatch that sends routed rows only."""

    def forward(self, *input, **kwargs) -> torch.Tensor:
        x = input[0].reshape(-1, input[0].shape[-1])
        num_rows, width = x.shape
        self.l_aux, _, _, indices, _, gates, self.exp_counts = self.gate(x, input[1], True, False)
        k = indices.shape[0]
        expert = indices.reshape(-1).long()                     # route j of row s sits at j * num_rows + s
        row = torch.arange(num_rows, device=x.device).repeat(k)
        weight = gates.reshape(-1)
        keep = (expert >= 0).nonzero().squeeze(1)               # routes the capacity limit dropped are -1
        order = keep[torch.argsort(expert[keep], stable=True)]  # grouped by destination rank, then expert
        expert, row, weight = expert[order], row[order], weight[order]

        ep, per_rank = self.ep_size, self.num_local_experts
        dest = torch.div(expert, per_rank, rounding_mode="floor")
        counts = torch.bincount(dest, minlength=ep)
        slab = counts.max().reshape(1)
        if ep > 1:  # every rank must send equal slabs: agree on the largest per-rank count
            dist.all_reduce(slab, op=dist.ReduceOp.MAX, group=self.ep_group)
        slab = max(int(slab), 1)
        start = torch.cumsum(counts, 0) - counts
        slot = dest * slab + torch.arange(len(expert), device=x.device) - start[dest]

        picked = x.index_select(0, row)
        if ep == 1:  # one destination, no padding: the sorted routes are the buffer
            recv, recv_ids = picked, expert
        else:
            send = x.new_zeros(ep * slab, width).index_copy(0, slot, picked)
            send_ids = torch.full((ep * slab, ), -1, dtype=torch.long, device=x.device)
            send_ids[slot] = expert - dest * per_rank
            recv = _AllToAll.apply(self.ep_group, send.view(ep, slab, width)).reshape(-1, width)
            recv_ids = torch.empty_like(send_ids)
            dist.all_to_all_single(recv_ids, send_ids, group=self.ep_group)
        out = self.experts.forward_rows(recv, recv_ids)
        if ep > 1:
            out = _AllToAll.apply(self.ep_group, out.view(ep, slab, width)).reshape(-1, width).index_select(0, slot)
        # Weight by the fp32 gates and sum the k routes in fp32, as DeepSpeed's combine does.
        routed = out.float() * weight.unsqueeze(1)
        combined = torch.zeros(num_rows, width, dtype=torch.float32, device=x.device).index_add(0, row, routed)
        return combined.to(x.dtype).reshape(input[0].shape)
