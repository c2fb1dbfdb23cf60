"""The fast path of the shared experts: routed rows only, all local experts in one batched computation, their
state in an expert bank.

DeepSpeed's MoE layer, as it comes, lays the routed rows out in an [experts, capacity, row] buffer, with
capacity = the busiest expert's load, and calls each local expert in Python on its whole slab, padding
included; and DeepSpeed's engine treats every expert parameter whole on every step. With rows that are whole
utterances (T*d wide) and many experts, those, not the arithmetic, are the cost, and they grow with the expert
count. This module keeps DeepSpeed's MoE layer (its MOELayer, gate, all-to-all and expert-parallel groups)
and changes three things:

* `StackedLowRankExperts` subclasses DeepSpeed's `Experts` and computes every routed row with its expert's
  weights as batched matmuls: no per-expert Python call. The weights live in an `ExpertBank` (one row per local
  expert, fp32, outside the module's parameters); only the rows of experts that received rows are gathered, and
  only their gradients come back (sparse). `mmolre/expert_optimizer.py` steps and saves them.
* `CompactMOELayer` subclasses DeepSpeed's `MOELayer`: same gate (its top-k, capacity and aux logic), same
  `_AllToAll`, but the buffer sent to each rank holds only the rows routed there, padded to the largest
  per-rank count (agreed by one all-reduce, as DeepSpeed's no-drop capacity is), not to experts x capacity.
  Expert ids travel in a small integer all-to-all beside the rows.
* `ExpertParallelMoE` is what `deepspeed.moe.layer.MoE` is to its MOELayer (the expert-parallel groups, the
  (output, l_aux, exp_counts) interface), without marking the experts as parameters for DeepSpeed's ZeRO (which
  would otherwise require them in its optimizer groups and save one checkpoint file per expert).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from deepspeed.moe.experts import Experts
from deepspeed.moe.sharded_moe import MOELayer, _AllToAll

from .expert_bank import PARAMS, ExpertBank
from .experts import LowRankExpert


# Step rows grouped by expert are padded to at most this many times their number, plus one slot per expert: a
# padded row holds 4*d + 2*r values against a copy of the weights per row's 4*d*r (memory_estimate.py counts it).
WINDOW_PADDING = 4


def per_expert_key(prefix: str, expert_id: int, name: str) -> str:
    """DeepSpeed's key of one expert's parameter (`...experts.deepspeed_experts.<id>.down.weight`), which
    exports and checkpoints of earlier versions use, with global expert ids."""
    return f"{prefix}deepspeed_experts.{expert_id}.{name}"


class StackedLowRankExperts(Experts):
    """All local low-rank experts of one MoE layer, their weights in an ExpertBank.

    The module has no parameters and no state of its own (so neither DeepSpeed's engine nor its checkpoints see
    the experts); `load_state_dict` still takes DeepSpeed's per-expert keys (exports, earlier checkpoints) into
    the bank."""

    def __init__(self, template: LowRankExpert, num_local_experts: int, expert_group_name: str,
                 centre_only: bool = False):
        """centre_only: each row is a window of steps (--route_per step) whose centre step alone is wanted, so the
        output row is that step's (width d), not the window's."""
        nn.Module.__init__(self)  # not Experts.__init__: no per-expert deep copies
        self.num_local_experts = num_local_experts
        self.centre_only = centre_only
        self.expert_group_name = expert_group_name
        self.seq_len, self.d_model, self.rank = template.seq_len, template.d_model, template.rank
        self.bank = ExpertBank(template, num_local_experts)
        self.register_load_state_dict_pre_hook(self._take_per_expert_keys)

    def expert(self, i: int) -> dict[str, torch.Tensor]:
        """Views of local expert i's parameters, named like a LowRankExpert's."""
        return self.bank.expert(i)

    def _apply(self, fn, recurse=True):
        """Follow the module's device moves; never its dtype casts (the bank holds fp32 masters)."""
        super()._apply(fn, recurse)
        probe = fn(torch.empty(0, device=self.bank.tensors[PARAMS[0]].device))
        self.bank.to_device(probe.device)
        return self

    @staticmethod
    def _take_per_expert_keys(module, state_dict, prefix, *args) -> None:
        """Per-expert keys with LOCAL ids (an ep-1 export: global = local) into the bank."""
        keys = {name: [per_expert_key(prefix, i, name) for i in range(module.num_local_experts)] for name in PARAMS}
        present = [k for ks in keys.values() for k in ks if k in state_dict]
        if not present:   # e.g. DeepSpeed's module states: the banks are loaded from the expert state files
            return
        missing = [k for ks in keys.values() for k in ks if k not in state_dict]
        if missing:   # a partial set would leave experts at their initialisation, unseen by a strict load
            raise KeyError(f"per-expert weights incomplete under {prefix!r}: {len(missing)} missing, e.g. "
                           f"{missing[:3]}")
        module.bank.load_rows({name: torch.stack([state_dict.pop(k) for k in ks]) for name, ks in keys.items()})

    def forward_rows(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """rows [n, T*d] for local expert local_ids [n] (-1: padding, output 0) -> [n, T*d] ([n, d] centre_only)."""
        t, d = self.seq_len, self.d_model
        real = (local_ids >= 0).nonzero().squeeze(1)
        all_real = len(real) == len(local_ids)
        idx = local_ids if all_real else local_ids.index_select(0, real)
        x = (rows if all_real else rows.index_select(0, real)).view(-1, t, d)
        # The weights of the experts that received rows; their gradients come back to the bank as sparse rows.
        used, which = torch.unique(idx, return_inverse=True)
        w = {name: v.to(rows.dtype) for name, v in self.bank.rows(used).items()}
        y = self._windows_by_expert(x, which, w) if self.centre_only else self._sequences_per_row(x, which, w)
        return y if all_real else y.new_zeros(len(local_ids), y.shape[1]).index_copy(0, real, y)

    @staticmethod
    def _sequences_per_row(x: torch.Tensor, which: torch.Tensor, w: dict) -> torch.Tensor:
        """Whole sequences [n, T, d] -> [n, T*d]: each row gets a copy of its expert's weights (4*d*r values, about
        one row's T*d; index_select, not fancy indexing: its backward is an index_add, far cheaper on CPU than the
        accumulating index_put that `w[idx]` backpropagates through), then batched matmuls."""
        t = x.shape[1]
        down = w["down.weight"].permute(0, 3, 2, 1).index_select(0, which)          # [n, 3, d, r]
        up = w["up.weight"].squeeze(-1).transpose(1, 2).index_select(0, which)      # [n, r, d]
        # Conv1d(k=3, padding=1) = three time-shifted matmuls on the zero-padded sequence (views, no copies).
        padded = F.pad(x, (0, 0, 1, 1))                                            # [n, T+2, d]
        h = w["down.bias"].index_select(0, which).unsqueeze(1)
        for tap in range(3):
            h = h + torch.bmm(padded[:, tap:tap + t], down[:, tap])                # [n, T, r]
        return torch.baddbmm(w["up.bias"].index_select(0, which).unsqueeze(1), F.gelu(h), up).flatten(1)

    @staticmethod
    def _windows_by_expert(x: torch.Tensor, which: torch.Tensor, w: dict) -> torch.Tensor:
        """Windows of 3 steps [n, 3, d] -> their centre step's output [n, d] (--route_per step). At the centre,
        the kernel-3 convolution is one matmul of the flattened window [3*d] with the kernel [3*d, r]. A row is
        far smaller than its expert's weights here (3*d against 4*d*r values) and many rows share an expert, so
        the rows are grouped by expert and each expert's weights are used once, in batched matmuls, instead of
        copied per row. Every expert is padded to the busiest one's row count where that makes at most
        WINDOW_PADDING times the rows plus one per expert (one batched matmul on the weights as they are), at most
        WINDOW_PADDING + 1 times the rows (an expert has a row); otherwise to the next power
        of two of its own count, batched with the experts of the same size (at most twice the rows however
        unequal the loads, for a copy of the weights of the experts in each batch)."""
        n, d = x.shape[0], x.shape[2]
        if n == 0:   # no row: an empty output still on the graph, so this rank's backward runs the all-to-alls
            return x.reshape(0, 3 * d)[:, :d]
        experts, rank = w["down.weight"].shape[:2]                                       # [E, r, d, 3]
        counts = torch.bincount(which, minlength=experts)
        busiest = int(counts.max())
        size = (torch.full_like(counts, busiest) if experts * busiest <= WINDOW_PADDING * n + experts else
                torch.pow(2, torch.ceil(torch.log2(counts.double()))).long())   # each expert's slots
        by_size = torch.argsort(size, stable=True)
        start = torch.zeros_like(size).index_copy(0, by_size, torch.cumsum(size[by_size], 0) - size[by_size])
        order = torch.argsort(which, stable=True)
        first = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(which)                       # row -> its place among the padded groups
        slot[order] = start[which[order]] + torch.arange(n, device=x.device) - first[which[order]]
        grouped = x.new_zeros(int(size.sum()), 3 * d).index_copy(0, slot, x.reshape(n, 3 * d))
        down = w["down.weight"].permute(0, 3, 2, 1).reshape(experts, 3 * d, rank)        # [E, 3*d, r]
        up = w["up.weight"].squeeze(-1).transpose(1, 2)                                 # [E, r, d]
        outputs, done, offset = [], 0, 0
        batches = torch.unique_consecutive(size[by_size], return_counts=True)
        for rows_each, members in zip(*(b.tolist() for b in batches)):   # the batches lie in `grouped` in order
            ids = by_size[done:done + members]
            pick = (lambda t: t) if members == experts else (lambda t: t.index_select(0, ids))  # noqa: E731
            block = grouped[offset:offset + members * rows_each].view(members, rows_each, 3 * d)
            h = torch.baddbmm(pick(w["down.bias"]).unsqueeze(1), block, pick(down))
            outputs.append(torch.baddbmm(pick(w["up.bias"]).unsqueeze(1), F.gelu(h), pick(up)).reshape(-1, d))
            done, offset = done + members, offset + members * rows_each
        return torch.cat(outputs).index_select(0, slot)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """DeepSpeed's `Experts` signature: [ep, E_local, C, M], every slot computed by its slab's expert."""
        ep, num_local, capacity, width = inputs.shape
        ids = torch.arange(num_local, device=inputs.device).view(1, -1, 1).expand(ep, -1, capacity)
        return self.forward_rows(inputs.reshape(-1, width), ids.reshape(-1)).view(ep, num_local, capacity, -1)


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
        out_width = out.shape[1]   # the rows' width, or one step's where the experts return a window's centre
        if ep > 1:
            out = _AllToAll.apply(self.ep_group, out.view(ep, slab, out_width)).reshape(-1, out_width)
            out = out.index_select(0, slot)
        # Weight by the fp32 gates and sum the k routes in fp32, as DeepSpeed's combine does.
        routed = out.float() * weight.unsqueeze(1)
        combined = torch.zeros(num_rows, out_width, dtype=torch.float32, device=x.device).index_add(0, row, routed)
        return combined.to(x.dtype).reshape(*input[0].shape[:-1], out_width)


class ExpertParallelMoE(nn.Module):
    """DeepSpeed's MOELayer with its expert-parallel groups and `MoE`'s interface, for experts held in a bank.

    `deepspeed.moe.layer.MoE` builds the same layer, creates the groups (`set_deepspeed_parallelism`, which
    DeepSpeed's engine calls on every module that has it) and returns (output, l_aux, exp_counts). It also
    makes DeepSpeed's engine treat the model as an MoE model, whose ZeRO optimizer then requires the experts
    among its parameter groups and whose checkpoints write one file per expert: the two costs this path avoids."""

    def __init__(self, gate: nn.Module, experts: StackedLowRankExperts, num_experts: int, ep_size: int):
        super().__init__()
        assert num_experts % ep_size == 0, f"{num_experts} experts do not divide into {ep_size} ranks"
        self.ep_size, self.num_experts = ep_size, num_experts
        self.expert_group_name = f"ep_size_{ep_size}"
        self.num_local_experts = num_experts // ep_size
        self.deepspeed_moe = CompactMOELayer(gate, experts, self.expert_group_name, ep_size, self.num_local_experts)

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """DeepSpeed's expert-parallel and expert-data-parallel groups, as MoE._create_process_groups makes them."""
        from deepspeed.utils import groups
        if self.expert_group_name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(self.ep_size,
                                                    use_data_before_expert_parallel_=use_data_before_expert_parallel_)
        self.deepspeed_moe._set_ep_group(groups._get_expert_parallel_group(self.expert_group_name))

    def forward(self, hidden_states: torch.Tensor, used_token=None):
        output = self.deepspeed_moe(hidden_states, used_token)
        return output, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts
