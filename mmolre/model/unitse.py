"""UniTSE: the unified task-specific/shared expert encoder of one modality.

Each block holds ONE DeepSpeed MoE layer of N shared low-rank experts and one dense low-rank expert per
task. Both tasks' streams go through the MoE in a single call (one all-to-all pair per block), each row routed
by its task's router. What a row is (a whole utterance of one task, or one time step of it) is the block's row
layout (`granularity.py`, --route_per).

    x^tau <- LayerNorm(x^tau + dropout(sum_topk p_e E_e(x^tau) + E_tau(x^tau)))

Naming note: DeepSpeed's checkpointing treats every state-dict key under an MoE module that contains
"expert" as an expert weight, so no module on the path to the MoE layer may have "expert" in its name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from deepspeed.moe.layer import MoE

from .experts import LowRankExpert, init_low_rank_
from .granularity import row_layout
from .grouped import ExpertParallelMoE, StackedLowRankExperts
from .routing import TaskRoutedGate


@dataclass
class BlockStats:
    """What one block reports for the loss and for monitoring."""
    aux_loss: torch.Tensor        # [tasks], differentiable
    expert_load: torch.Tensor     # [tasks, N] routes per expert on this rank (detached)
    router_entropy: torch.Tensor  # [tasks]
    dropped_fraction: torch.Tensor  # [tasks] routes dropped for capacity
    z_loss: torch.Tensor          # [tasks] router z-loss, differentiable
    routes: torch.Tensor          # [tasks, B, k'] experts assigned to each utterance's rows (k' = k per utterance
    combine: torch.Tensor         # row, T*k per step rows, -1 unrouted; 0 without shared experts), their weights


def draw_like_deepspeeds_gate(num_experts: int) -> None:
    """Consume the random numbers DeepSpeed's `MoE` wrapper draws for its own gate's weights (a Linear(1, N)
    that the task routers replace), so one seed builds the same model with and without the wrapper."""
    nn.Linear(1, num_experts, bias=False)


class UniTSEBlock(nn.Module):
    def __init__(self, d_model: int, seq_len: int, num_experts: int, top_k: int, expert_rank: int,
                 task_rank: int, num_tasks: int, ep_size: int, dropout: float, capacity_factor: float,
                 router_noise: bool, grouped_experts: bool = True, use_shared: bool = True,
                 use_task: bool = True, uniform_gate: bool = False, eval_capacity_factor: float = 0.0,
                 balance: str = "aux", bias_rate: float = 1e-2, router_temperature: float = 1.0,
                 bias_update: str = "relative", route_per: str = "utterance"):
        super().__init__()
        self.seq_len, self.d_model, self.num_tasks, self.num_experts = seq_len, d_model, num_tasks, num_experts
        self.layout = row_layout(route_per, seq_len, d_model, num_tasks)
        self.moe = None
        if use_shared:
            template = LowRankExpert(d_model, expert_rank, self.layout.expert_seq_len)
            if not grouped_experts:   # DeepSpeed's layer as it comes (its experts are ZeRO's parameters)
                self.moe = MoE(hidden_size=1, expert=template, num_experts=num_experts, ep_size=ep_size, k=top_k,
                               min_capacity=0, drop_tokens=capacity_factor > 0, use_rts=False)
            else:
                draw_like_deepspeeds_gate(num_experts)
            gate = TaskRoutedGate(d_model, self.layout.expert_seq_len, num_experts, num_tasks, top_k, capacity_factor,
                                  router_noise, uniform=uniform_gate, eval_capacity_factor=eval_capacity_factor,
                                  balance=balance, bias_rate=bias_rate, temperature=router_temperature,
                                  bias_update=bias_update)
            if grouped_experts:  # DeepSpeed's MOELayer, a compact dispatch, experts in a bank (grouped.py)
                experts = StackedLowRankExperts(template, num_experts // ep_size, f"ep_size_{ep_size}",
                                                centre_only=route_per == "step")
                self.moe = ExpertParallelMoE(gate, experts, num_experts, ep_size)
                gate.agree_on_capacity = False   # the compact dispatch sizes its own buffers
            else:   # with our gate
                self.moe.deepspeed_moe.gate = gate
            gate.rows_vary_by_rank = route_per == "step"   # each rank routes its own valid steps
        self.task_specific = (nn.ModuleList(LowRankExpert(d_model, task_rank) for _ in range(num_tasks))
                              if use_task else None)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    @property
    def shared_experts(self) -> nn.Module:
        """This rank's shared experts (num_experts / ep_size of them): DeepSpeed's `Experts` or ours
        (an empty module when the block has no shared experts)."""
        return self.moe.deepspeed_moe.experts if self.moe is not None else nn.Module()

    def shared_expert_tensors(self) -> list[torch.Tensor]:
        """This rank's shared-expert weights: the bank's tensors, or DeepSpeed's expert parameters."""
        bank = self.expert_bank
        return list(bank.tensors.values()) if bank is not None else list(self.shared_experts.parameters())

    @property
    def num_local_shared(self) -> int:
        return self.moe.num_local_experts if self.moe is not None else 0

    def shared_expert(self, i: int) -> dict[str, torch.Tensor]:
        """Local shared expert i's parameters (views for stacked experts), named like a LowRankExpert's."""
        experts = self.shared_experts
        if isinstance(experts, StackedLowRankExperts):
            return experts.expert(i)
        return dict(experts.deepspeed_experts[i].named_parameters())

    def shared_expert_grads(self, i: int) -> dict[str, torch.Tensor | None]:
        experts = self.shared_experts
        if isinstance(experts, StackedLowRankExperts):
            return experts.bank.grad_of(i)
        return {n: p.grad for n, p in experts.deepspeed_experts[i].named_parameters()}

    @property
    def expert_bank(self):
        """The bank of this block's shared experts (the fast path), or None."""
        experts = self.shared_experts
        return experts.bank if isinstance(experts, StackedLowRankExperts) else None

    def reset_shared_expert(self, i: int, generator: torch.Generator) -> None:
        init_low_rank_(*self.shared_expert(i).values(), generator)

    def forward(self, streams: list[torch.Tensor], time_mask: torch.Tensor, real: torch.Tensor | None = None):
        """streams: one [B, T, d] tensor per task; time_mask: [B, T] bool; real: [B] bool or None (all real)."""
        batch = streams[0].shape[0]
        keep = time_mask.unsqueeze(-1).to(streams[0].dtype)
        updates = [torch.zeros_like(x) for x in streams]
        if self.moe is not None:
            rows, routing, placement = self.layout.rows(streams, time_mask, real)
            shared, aux, load = self.moe(rows, routing)
            updates = [u + s for u, s in zip(updates, self.layout.updates(shared, placement))]
            g = self.moe.deepspeed_moe.gate.last_stats
            stats = BlockStats(aux, load, g["entropy"], g["dropped_fraction"], g["z_loss"],
                               self.layout.per_utterance(g["routes"], placement, -1),
                               self.layout.per_utterance(g["combine"], placement, 0.0))
        else:
            zero = streams[0].new_zeros(self.num_tasks, dtype=torch.float32)
            none = torch.zeros(self.num_tasks, batch, 0, dtype=torch.long, device=zero.device)
            stats = BlockStats(zero, zero.new_zeros(self.num_tasks, 0), zero, zero, zero, none, none.float())
        if self.task_specific is not None:
            updates = [u + e.forward_sequences(x * keep) for u, e, x in zip(updates, self.task_specific, streams)]
        out = [self.norm(x + self.dropout(u)) for x, u in zip(streams, updates)]
        return out, stats


class UniTSE(nn.Module):
    """L stacked blocks; block 1 starts every task stream from the same encoded sequence."""

    def __init__(self, num_blocks: int, **block_kwargs):
        super().__init__()
        self.num_tasks = block_kwargs["num_tasks"]
        self.blocks = nn.ModuleList(UniTSEBlock(**block_kwargs) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor, time_mask: torch.Tensor, real: torch.Tensor | None = None):
        streams = [x] * self.num_tasks
        stats = []
        for block in self.blocks:
            streams, s = block(streams, time_mask, real)
            stats.append(s)
        return streams, stats
