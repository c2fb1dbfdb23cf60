"""The task-aware gate that sits inside DeepSpeed's MoE layer.

DeepSpeed's `TopKGate` computes logits with one linear map over every row. Our rows are whole
utterances (width T*d) of two tasks, so the gate instead:
  1. takes the masked time-average of each row (the utterance summary, width d),
  2. scores it with the router of the row's own task (a small MLP, d -> N),
  3. hands the logits to DeepSpeed's own `top1gating`/`top2gating`/`topkgating`, which keep the
     capacity and dispatch logic exactly as DeepSpeed ships it,
  4. computes one load-balancing loss per task over that task's rows (N/k * sum_e f_e * P_e, which is
     1.0 at perfect balance) and per-task expert loads and router entropies for monitoring.

The task of each row (and the time mask) reaches the gate through `MoE.forward`'s second argument,
`used_token`, which DeepSpeed passes to its gate untouched. The per-task aux losses replace DeepSpeed's
single l_aux, so `MoE.forward` returns them as `l_aux` with shape [num_tasks] and the per-task expert
counts as `exp_counts` with shape [num_tasks, N].
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from deepspeed.moe.sharded_moe import TopKGate, top1gating, top2gating, topkgating


class RowRouting(NamedTuple):
    """What the gate needs beyond the rows: each row's task id [S] and time mask [S, T]."""
    task_ids: torch.Tensor
    time_mask: torch.Tensor


class Router(nn.Module):
    """g^tau: utterance summary (d) -> expert logits (N)."""

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, num_experts))

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        return self.net(summary)


def masked_time_mean(seqs: torch.Tensor, time_mask: torch.Tensor) -> torch.Tensor:
    """[S, T, d], [S, T] -> [S, d]; rows with an empty mask average to zero instead of NaN."""
    m = time_mask.to(seqs.dtype).unsqueeze(-1)
    return (seqs * m).sum(1) / m.sum(1).clamp_min(1.0)


def load_balancing_loss(probs: torch.Tensor, topk_idx: torch.Tensor, k: int) -> torch.Tensor:
    """GShard/Switch balance loss over one task's rows: N/k * sum_e f_e * P_e.

    f_e is the fraction of routes sent to expert e (k per row), P_e the mean router probability.
    At perfect balance f_e = k/N and P_e = 1/N, so the loss is 1.0 for every k.
    """
    num_experts = probs.shape[1]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    routed = torch.zeros_like(probs).scatter_(1, topk_idx, 1.0)
    f = routed.mean(0)
    p = probs.mean(0)
    return (f * p).sum() * num_experts / k


class TaskRoutedGate(TopKGate):
    """A `TopKGate` whose logits come from one router per task on the utterance summary."""

    def __init__(self, d_model: int, seq_len: int, num_experts: int, num_tasks: int, k: int,
                 capacity_factor: float = 0.0, router_noise: bool = False, uniform: bool = False):
        drop_tokens = capacity_factor > 0
        super().__init__(model_dim=1, num_experts=num_experts, k=k,
                         capacity_factor=capacity_factor or 1.0, eval_capacity_factor=capacity_factor or 1.0,
                         min_capacity=0, noisy_gate_policy=None, drop_tokens=drop_tokens, use_rts=False,
                         top2_2nd_expert_sampling=router_noise)
        del self.wg  # replaced by the task routers below; a T*d -> N linear map is what we avoid
        self.d_model, self.seq_len, self.num_tasks, self.num_experts = d_model, seq_len, num_tasks, num_experts
        # uniform: the "without routers" ablation; every row gets equal logits (use k = N for a uniform mixture)
        self.routers = nn.ModuleList() if uniform else nn.ModuleList(Router(d_model, num_experts)
                                                                      for _ in range(num_tasks))
        self.last_stats: dict[str, torch.Tensor] = {}

    def route_logits(self, rows: torch.Tensor, routing: RowRouting) -> torch.Tensor:
        """Per-row logits [S, N], each row scored by its own task's router."""
        if not len(self.routers):
            return rows.new_zeros(rows.shape[0], self.num_experts, dtype=torch.float32)
        summary = masked_time_mean(rows.float().view(-1, self.seq_len, self.d_model), routing.time_mask)
        summary = summary.to(self.routers[0].net[0].weight.dtype)  # bf16 engines cast the routers too
        all_logits = torch.stack([router(summary).float() for router in self.routers])  # [tasks, S, N]
        pick = routing.task_ids.view(1, -1, 1).expand(1, -1, all_logits.shape[-1])
        return all_logits.gather(0, pick).squeeze(0)

    def forward(self, input: torch.Tensor, used_token: RowRouting = None, sparse_routes: bool = False,
                use_tutel: bool = False):
        if not isinstance(used_token, RowRouting):
            raise TypeError("TaskRoutedGate needs RowRouting(task_ids, time_mask) as the MoE's 2nd argument")
        logits = self.route_logits(input, used_token)
        capacity = self.capacity_factor if self.training else self.eval_capacity_factor
        if self.k == 1:
            out = top1gating(logits, capacity, self.min_capacity, None, None, self.drop_tokens, False,
                             self.ep_group, sparse_routes, use_tutel)
        elif self.k == 2:
            out = top2gating(logits.clone(), capacity, self.min_capacity, self.drop_tokens, self.ep_group,
                             self.top2_2nd_expert_sampling and self.training, sparse_routes)
        else:
            out = topkgating(logits, self.k, capacity, self.min_capacity, self.drop_tokens, self.ep_group,
                             sparse_routes=sparse_routes)
        task_aux, task_counts = self._per_task_balance(logits, used_token.task_ids, out)
        return (task_aux, *out[1:-1], task_counts)

    def _per_task_balance(self, logits: torch.Tensor, task_ids: torch.Tensor, gate_out):
        probs = F.softmax(logits, dim=1)
        topk_idx = probs.topk(self.k, dim=1).indices
        aux, counts, entropy = [], [], []
        for task in range(self.num_tasks):
            rows = task_ids == task
            aux.append(load_balancing_loss(probs[rows], topk_idx[rows], self.k))
            counts.append(torch.zeros_like(probs[0]).index_add_(
                0, topk_idx[rows].reshape(-1), torch.ones_like(topk_idx[rows].reshape(-1), dtype=probs.dtype)))
            p = probs[rows].detach()
            entropy.append(-(p * p.clamp_min(1e-12).log()).sum(1).mean() if len(p) else p.new_zeros(()))
        # Routes DeepSpeed evicted for capacity are flagged with expert index -1 (sparse routes).
        indices = gate_out[3] if len(gate_out) == 7 else None
        dropped = (indices < 0).float().mean() if indices is not None else logits.new_zeros(())
        self.last_stats = {"entropy": torch.stack(entropy).detach(), "dropped_fraction": dropped.detach()}
        return torch.stack(aux), torch.stack(counts).detach()
