"""DeepSpeed's top-1 and top-2 gating, computed from the routes instead of from [rows, experts] masks.

DeepSpeed's `top1gating` and `top2gating` find each route's expert, slot and combine weight through int64
one-hot masks of shape [rows, experts], their cumulative sums and products: some twenty passes over
rows x experts values per call. At tens of thousands of experts those passes, not the experts, were most of
a step (at 16,384 experts, `cumsum` alone took 114 of 438 ms of the model's forward and backward; see
docs/performance.md). This module computes the same routes from a softmax and k argmaxes over the logits
(fp32, as DeepSpeed's), then from the rows x k chosen ids: counts by `bincount`, slots by a stable sort.

The outputs equal DeepSpeed's bit for bit, gradients included (tests/unit/test_sparse_gating.py): same
experts (argmax takes the first of tied values, as DeepSpeed's does), same slots (row order within an
expert, second choices after all first choices), same combine weights, -1 for the routes a capacity limit
drops, the same capacity. It takes the cases that are fully determined by row order: top-1 without a
capacity limit, top-2 with or without one. `deepspeed_gating` sends the rest to DeepSpeed's own functions:
top-1 with a capacity limit (DeepSpeed keeps the rows `torch.topk` picks among equal mask values) and
top-k for k >= 3 (it normalises by a sum over all experts, whose rounding depends on where the k values lie).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F
from deepspeed import comm as dist
from deepspeed.comm import pg_utils
from deepspeed.moe.sharded_moe import _capacity, gumbel_rsample, top1gating, topkgating
from deepspeed.utils import groups
from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size


def deepspeed_gating(logits: torch.Tensor, k: int, capacity_factor: float, min_capacity: int, drop: bool,
                     ep_group, second_expert_sampling: bool, probs: torch.Tensor | None = None):
    """DeepSpeed's gating of `logits` [S, E] with sparse routes: (capacity, indices [k, S] int32 (-1: dropped),
    locations [k, S] int32, combine weights [k, S] fp32). The route-based computation where it is exact, else
    DeepSpeed's function. `logits` may be modified in place (top-2 sampling adds noise to it, as DeepSpeed's).
    `probs`: softmax(logits) where the caller has it (the route-based paths then do not compute it again)."""
    if k == 1 and not drop:
        return top1_routes(logits, ep_group, probs)
    if k == 2:
        return top2_routes(logits, capacity_factor, min_capacity, drop, ep_group, second_expert_sampling, probs)
    if k == 1:
        out = top1gating(logits, capacity_factor, min_capacity, None, None, drop, False, ep_group, True)
    else:
        out = topkgating(logits, k, capacity_factor, min_capacity, drop, ep_group, sparse_routes=True)
    return out[1], out[3], out[4], out[5]


def top1_routes(logits: torch.Tensor, ep_group, probs: torch.Tensor | None = None):
    """`top1gating(logits, ..., drop_tokens=False, use_rts=False, sparse_routes=True)`'s routes."""
    gates = F.softmax(logits, dim=1) if probs is None else probs
    num_rows, num_experts = gates.shape
    expert = torch.argmax(gates, dim=1)
    counts = torch.bincount(expert, minlength=num_experts)
    # DeepSpeed caps this by the rank's own row count, which can only bind where ranks hold different numbers of
    # rows (--route_per step, evaluation's padding); there it would give the ranks different buffers for one
    # all-to-all. Without tensor parallelism (this trainer has none) the agreed busiest load never exceeds the
    # largest rank's rows, so without the cap the result is DeepSpeed's wherever the ranks' rows are equal, and
    # one shape everywhere.
    capacity = _agreed_capacity(counts, ep_group)
    weight = gates.gather(1, expert.unsqueeze(1)).squeeze(1)
    slot = _slots_in_row_order(expert, num_experts)
    return capacity, expert.to(torch.int32).unsqueeze(0), slot.to(torch.int32).unsqueeze(0), weight.unsqueeze(0)


def top2_routes(logits: torch.Tensor, capacity_factor: float, min_capacity: int, drop: bool, ep_group,
                second_expert_sampling: bool, probs: torch.Tensor | None = None):
    """`top2gating(logits, ..., sparse_routes=True)`'s routes."""
    gates = F.softmax(logits, dim=1) if probs is None else probs
    num_rows, num_experts = gates.shape
    first = torch.argmax(gates, dim=1)
    if second_expert_sampling:   # the same draw, in the same place, as DeepSpeed's (the RNG stays in step)
        logits += gumbel_rsample(logits.shape, device=logits.device)
    second = torch.argmax(logits.scatter(1, first.unsqueeze(1), float("-inf")), dim=1)
    first_counts = torch.bincount(first, minlength=num_experts)
    slot1 = _slots_in_row_order(first, num_experts)
    slot2 = _slots_in_row_order(second, num_experts) + first_counts[second]   # after every first choice
    if drop:
        capacity = _capacity(gates, torch.tensor(capacity_factor * 2), torch.tensor(min_capacity))
    else:
        capacity = _agreed_capacity(first_counts + torch.bincount(second, minlength=num_experts), ep_group)
    kept1, kept2 = slot1 < capacity, slot2 < capacity
    chosen = gates.gather(1, torch.stack([first, second], 1))   # one gather: one [S, E] buffer in its backward
    weight1, weight2 = chosen[:, 0] * kept1, chosen[:, 1] * kept2
    denom = torch.clamp(weight1 + weight2, min=torch.finfo(weight1.dtype).eps)
    weight1, weight2 = weight1 / denom, weight2 / denom
    none = torch.full_like(first, -1)
    indices = torch.stack([torch.where(kept1, first, none), torch.where(kept2, second, none)])
    slots = torch.stack([slot1 * kept1, slot2 * kept2])
    return capacity, indices.to(torch.int32), slots.to(torch.int32), torch.stack([weight1, weight2])


def _slots_in_row_order(expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Each row's place among the rows that chose the same expert, in row order: `cumsum(one_hot) - 1` at the
    row's expert, from a stable sort of S ids instead of S x E values."""
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=num_experts)
    start = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(expert)
    slot[order] = torch.arange(len(expert), device=expert.device) - start[expert[order]]
    return slot


def _agreed_capacity(counts: torch.Tensor, ep_group) -> torch.Tensor:
    """DeepSpeed's no-drop capacity: the busiest expert's load, the largest over the expert-parallel group,
    rounded up to the tensor-parallel size."""
    capacity = torch.max(counts)
    if pg_utils.is_parallel(ep_group):
        dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=ep_group)
    if groups._get_expert_model_parallel_world_size() == 1:
        tp = 1 if groups.mpu is None else bwc_tensor_model_parallel_world_size(mpu=groups.mpu)
        capacity = torch.ceil(capacity / tp).mul(tp).to(capacity.dtype)
    return capacity


def agreed_maximum(capacity: torch.Tensor, ep_group, device: torch.device) -> torch.Tensor:
    """The largest capacity over the expert-parallel group (a collective: every rank of the group calls it;
    on the rank's device, which NCCL needs, returned where it was)."""
    if not pg_utils.is_parallel(ep_group):
        return capacity
    capacity = torch.as_tensor(capacity)
    agreed = capacity.to(device=device, copy=True)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=ep_group)
    return agreed.to(capacity.device)
