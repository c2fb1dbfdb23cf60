"""The task-aware gate that sits inside DeepSpeed's MoE layer.

DeepSpeed's `TopKGate` computes logits with one linear map over every row. Our rows are sequences of two
tasks (width T*d: a whole utterance, or with --route_per step a step's window, `granularity.py`), so the gate
instead:
  1. takes the masked time-average of each row (the utterance summary, width d; a step row's mask holds its
     centre step only, so the summary is the step itself),
  2. scores it with the router of the row's own task (a small MLP, d -> N),
  3. hands the logits to DeepSpeed's gating: its `top1gating`/`top2gating`/`topkgating` capacity and
     dispatch logic, computed from the routes where that gives the same result bit for bit
     (`sparse_gating.py`: DeepSpeed's [rows, experts] masks cost more than the experts at large counts),
  4. computes one load-balancing loss per task over that task's rows (N/k * sum_e f_e * P_e, which is
     1.0 at perfect balance) over the routes the gate assigned, and per-task expert loads and dropped
     fractions over the routes DeepSpeed actually dispatched, and router entropies.

Balancing (`balance`): "aux" adds the per-task aux losses to the objective; "aux_free" instead keeps a
per-task, per-expert bias that is added to the logits for the top-k *selection only* (the combine weights
and the aux loss read the unbiased probabilities) and is nudged after every optimizer step against that
task's load error (DeepSeek-V3's auxiliary-loss-free balancing, here per task; `nudge_selection_bias`);
"none" neither. The router z-loss (ST-MoE: mean logsumexp(logits)^2 per task, on the logits after the
temperature) keeps the logits small.

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
from deepspeed.moe.sharded_moe import TopKGate

from .sparse_gating import agreed_maximum, deepspeed_gating


class RowRouting(NamedTuple):
    """What the gate needs beyond the rows: each row's task id [S] and time mask [S, T], and, where a batch
    is padded (evaluation's last batches), which rows are real [S] bool (None: all)."""
    task_ids: torch.Tensor
    time_mask: torch.Tensor
    real: torch.Tensor | None = None


class Router(nn.Module):
    """g^tau: utterance summary (d) -> expert logits (N), computed in fp32 whatever the engine's dtype.

    A bf16 engine casts every module to bf16; routing in bf16 would flip top-k choices on near-ties. As in
    DeepSpeed's own gate (`F.linear(x.float(), wg.weight.float())`), the weights are read in fp32 for the
    computation while their storage (and the optimizer's fp32 master copy) stays the engine's."""

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, num_experts))

    def forward(self, summary: torch.Tensor) -> torch.Tensor:
        hidden, _, out = self.net
        h = F.gelu(F.linear(summary.float(), hidden.weight.float(), hidden.bias.float()))
        return F.linear(h, out.weight.float(), out.bias.float())


def masked_time_mean(seqs: torch.Tensor, time_mask: torch.Tensor) -> torch.Tensor:
    """[S, T, d], [S, T] -> [S, d]; rows with an empty mask average to zero instead of NaN."""
    m = time_mask.to(seqs.dtype).unsqueeze(-1)
    return (seqs * m).sum(1) / m.sum(1).clamp_min(1.0)


def load_balancing_loss(probs: torch.Tensor, routes: torch.Tensor, k: int) -> torch.Tensor:
    """GShard/Switch balance loss over one task's rows: N/k * sum_e f_e * P_e.

    routes [S, k]: the expert each route of a row was assigned (-1 entries count for no expert). f_e is the
    fraction of routes assigned to expert e (k per row), P_e the mean router probability. At perfect
    balance f_e = k/N and P_e = 1/N, so the loss is 1.0 for every k.
    """
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    return balance_loss_of_mean(probs.mean(0), routes, k, probs.shape[0])


def balance_loss_of_mean(mean_probs: torch.Tensor, routes: torch.Tensor, k: int, num_rows: int) -> torch.Tensor:
    """`load_balancing_loss` from P (the mean router probability [N] over the task's `num_rows` rows)."""
    num_experts = mean_probs.shape[0]
    kept = routes >= 0
    f = torch.bincount(routes[kept].long(), minlength=num_experts).to(mean_probs.dtype) / num_rows   # O(routes)
    return (f * mean_probs).sum() * num_experts / k


class TaskRoutedGate(TopKGate):
    """A `TopKGate` whose logits come from one router per task on the utterance summary.

    Capacity: `capacity_factor` in training, `eval_capacity_factor` in evaluation; 0 means no row is
    dropped. Our rows are stacked task-major, and DeepSpeed decides which rows keep an over-subscribed
    expert's slots by their order: top-2 fills slots in row order (the emotion task lost its rows first),
    top-1 by an unspecified tie order of `torch.topk` over the rows (not random: it favoured one task too).
    So when rows can be dropped the gate hands DeepSpeed its rows in a random order (a fresh order per
    training step, a fixed one in evaluation so the same batch always gets the same predictions). Top-k
    for k >= 3 keeps the highest-probability rows; there the order only breaks ties.
    """

    def __init__(self, d_model: int, seq_len: int, num_experts: int, num_tasks: int, k: int,
                 capacity_factor: float = 0.0, router_noise: bool = False, uniform: bool = False,
                 eval_capacity_factor: float = 0.0, balance: str = "aux", bias_rate: float = 1e-2,
                 temperature: float = 1.0, bias_update: str = "relative"):
        super().__init__(model_dim=1, num_experts=num_experts, k=k,
                         capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                         min_capacity=0, noisy_gate_policy=None, drop_tokens=capacity_factor > 0, use_rts=False,
                         top2_2nd_expert_sampling=router_noise)
        del self.wg  # replaced by the task routers below; a T*d -> N linear map is what we avoid
        self.d_model, self.seq_len, self.num_tasks, self.num_experts = d_model, seq_len, num_tasks, num_experts
        # uniform: the "without routers" ablation; every row gets equal logits (use k = N for a uniform mixture)
        self.routers = nn.ModuleList() if uniform else nn.ModuleList(Router(d_model, num_experts)
                                                                      for _ in range(num_tasks))
        # DeepSpeed's no-drop gating all-reduces the busiest expert's load over the expert-parallel group to
        # size its [experts, capacity] buffers; a dispatch that does not use them switches this off.
        self.agree_on_capacity = True
        self.rows_vary_by_rank = False   # True where ranks route different numbers of rows in training too
        self.balance, self.bias_rate, self.temperature = balance, bias_rate, temperature
        if bias_update not in ("sign", "relative"):
            raise ValueError(f"bias_update must be 'sign' or 'relative', got {bias_update!r}")
        self.bias_update = bias_update
        if balance == "aux_free":   # saved with the module (checkpoints carry it); fp32 whatever the engine's dtype
            self.register_buffer("selection_bias", torch.zeros(num_tasks, num_experts))
        self.pending_counts: torch.Tensor | None = None   # assigned routes per task since the last nudge
        self.last_stats: dict[str, torch.Tensor] = {}

    def _apply(self, fn, recurse=True):
        """Keep the selection bias in fp32, exactly, when the engine casts the module to bf16/fp16 (its nudges
        are below bf16's resolution at the values it reaches): moved with the module, never rounded."""
        bias = getattr(self, "selection_bias", None)
        super()._apply(fn, recurse)
        if bias is not None and self.selection_bias.dtype != torch.float32:
            self.selection_bias = bias.to(device=self.selection_bias.device, dtype=torch.float32)
        return self

    @torch.no_grad()
    def nudge_selection_bias(self, counts: torch.Tensor) -> None:
        """aux_free: after an optimizer step, move each task's bias against its load error.
        counts [tasks, N]: the routes each expert was assigned over the step, summed over all ranks (so every
        replica of the gate takes the same nudge). A task that routed no rows is left alone.

        "sign" (DeepSeek-V3): an expert above its task's mean load loses bias_rate, one below gains it.
        "relative": the error in units of the task's mean load m: an expert with c routes moves by
        bias_rate * (1 - c/m). With fewer routes per step than experts, the sign rule charges a route 2 *
        bias_rate whatever the count; here a route costs bias_rate * N/R (R: the task's routes per step over
        all ranks and the accumulation window, N experts), so the bias counts the routes an expert is ahead of
        or behind its share at any expert count, as strongly at 16,384 experts as at 8. Every route is
        charged: a burst (many rows of one step on one expert) benches that expert for as many steps as its
        rows' share, up to N steps for a whole step's rows. Charging at most max(2m, 1) routes per step was
        tried and left fewer experts benched but let bursts recur (1,024 experts, top-1, MOSEI text: busiest
        expert 5.6-11.8x the mean after epoch 1, against 4.2-4.9x; docs/results.md)."""
        mean = counts.mean(1, keepdim=True)
        error = mean - counts
        if self.bias_update == "relative":
            step = torch.where(mean > 0, error / mean.clamp_min(1e-12), torch.zeros_like(error))
        else:
            step = torch.sign(error)
        self.selection_bias += self.bias_rate * step.to(self.selection_bias)
    def route_logits(self, rows: torch.Tensor, routing: RowRouting) -> torch.Tensor:
        """Per-row fp32 logits [S, N], each row scored by its own task's router."""
        if not len(self.routers):
            return rows.new_zeros(rows.shape[0], self.num_experts, dtype=torch.float32)
        summary = masked_time_mean(rows.float().view(-1, self.seq_len, self.d_model), routing.time_mask)
        rows = task_rows(routing.task_ids, len(self.routers))
        if all(isinstance(r, slice) for r in rows):   # task-major rows (as UniTSE stacks them): no scatter
            return torch.cat([router(summary[r]) for router, r in zip(self.routers, rows)])
        logits = summary.new_empty(summary.shape[0], self.num_experts)
        for router, r in zip(self.routers, rows):   # each task's router scores its own rows only
            index = r.nonzero().squeeze(1)
            logits = logits.index_copy(0, index, router(summary.index_select(0, index)))
        return logits

    def forward(self, input: torch.Tensor, used_token: RowRouting = None, sparse_routes: bool = True,
                use_tutel: bool = False):
        if not isinstance(used_token, RowRouting):
            raise TypeError("TaskRoutedGate needs RowRouting(task_ids, time_mask) as the MoE's 2nd argument")
        if not sparse_routes:
            raise ValueError("TaskRoutedGate returns sparse routes only (DeepSpeed's MOELayer asks for them)")
        logits = self.route_logits(input, used_token)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        select = logits   # what chooses the experts; the combine weights come from `logits`
        if self.balance == "aux_free":
            select = logits + self.selection_bias[used_token.task_ids]
        probs = F.softmax(logits, dim=1)   # the router's probabilities: combine weights, balance loss, entropy
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        real = used_token.real
        if factor > 0 and real is not None and not bool(real.all()):
            capacity, indices, locations, gates = self._route_real_rows(select, logits, probs, factor, real)
        else:
            capacity, indices, locations, gates = self._route(select, logits, probs, factor)
        if (factor > 0 and self.agree_on_capacity and self.ep_group is not None
                and (not self.training or self.rows_vary_by_rank)):
            # ranks may hold different numbers of rows (evaluation's padding; --route_per step's valid steps): every
            # rank of the group sizes its dispatch buffers alike (its own rows' capacity decided which routes it
            # dropped)
            capacity = agreed_maximum(capacity, self.ep_group, logits.device)
        if self.balance == "aux_free":   # DeepSpeed weighed the routes by the biased logits; use the router's
            gates = combine_weights(probs, indices, self.k)
        task_aux, task_counts = self._per_task_balance(logits, probs, select, used_token.task_ids, indices, gates,
                                                       real)
        return task_aux, capacity, self.num_experts, indices, locations, gates, task_counts

    def _route(self, select: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, factor: float):
        """DeepSpeed's gating of every row: (capacity, indices, locations, combine weights)."""
        drop = factor > 0
        order = None
        if drop:
            generator = None if self.training else torch.Generator(logits.device).manual_seed(0)
            order = torch.randperm(logits.shape[0], device=logits.device, generator=generator)
            select = select.index_select(0, order)
        ep_group = self.ep_group if drop or self.agree_on_capacity else None
        factor = factor or 1.0   # unused when nothing is dropped
        sampling = self.top2_2nd_expert_sampling and self.training   # adds noise to the logits it is given
        capacity, indices, locations, gates = deepspeed_gating(
            select.clone() if sampling else select, self.k, factor, self.min_capacity, drop, ep_group,
            sampling, probs=probs if select is logits else None)   # (no bias, no reordering: the same softmax)
        if order is not None:   # back to the rows' own order
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(len(order), device=order.device)
            indices, locations, gates = indices[:, inverse], locations[:, inverse], gates[:, inverse]
        return capacity, indices, locations, gates

    def _route_real_rows(self, select, logits, probs, factor: float, real: torch.Tensor):
        """A padded batch under a capacity limit: only the real rows are gated (their capacity, their order),
        so the padding takes no slot and the real rows' routes do not depend on how many padding rows there
        are; padding rows get no route (-1, weight 0)."""
        rows = real.nonzero().squeeze(1)
        sub = (select.index_select(0, rows), logits.index_select(0, rows), probs.index_select(0, rows))
        capacity, sub_indices, sub_locations, sub_gates = self._route(*sub, factor)
        k, n = sub_indices.shape[0], logits.shape[0]
        indices = sub_indices.new_full((k, n), -1).index_copy(1, rows, sub_indices)
        locations = sub_locations.new_zeros((k, n)).index_copy(1, rows, sub_locations)
        gates = sub_gates.new_zeros((k, n)).index_copy(1, rows, sub_gates)
        return capacity, indices, locations, gates

    def _per_task_balance(self, logits: torch.Tensor, probs: torch.Tensor, select: torch.Tensor,
                          task_ids: torch.Tensor, indices: torch.Tensor, gates: torch.Tensor,
                          real: torch.Tensor | None = None):
        """Per task: the aux loss, the rows each expert received, the fraction of routes dropped, the router
        entropy, the z-loss; per row: the experts assigned and their combine weights.

        Loads and dropped fractions count the routes DeepSpeed dispatched (indices [k, S], -1 where the
        capacity limit dropped a route). The aux loss counts the routes the gate assigned before any
        capacity limit, as DeepSpeed's, GShard's and Switch's do: counting only dispatched routes would cap
        an over-subscribed expert's f_e at its capacity, so the pressure to move rows away from it would
        stop growing exactly where it is needed. A dropped route's assignment is its slot's choice among
        the router's probabilities (slot j holds the j-th choice, as in DeepSpeed's gating)."""
        dispatched = indices.t().long()                                              # [S, k]
        assigned = dispatched
        if bool((dispatched < 0).any()):   # only a capacity limit drops routes
            assigned = torch.where(dispatched >= 0, dispatched, select.topk(self.k, dim=1).indices)
        log_norm = torch.logsumexp(logits, dim=1)
        z = log_norm ** 2
        with torch.no_grad():   # H(p) = logsumexp(l) - sum(p * l): two passes over [S, N], not five
            row_entropy = log_norm - (probs * logits).sum(1)
        aux, counts, entropy, dropped, z_loss = [], [], [], [], []
        tasks = task_rows(task_ids, self.num_tasks)
        sizes = {r.stop - r.start for r in tasks if isinstance(r, slice)}
        mean_probs = None
        if len(sizes) == 1 and all(isinstance(r, slice) for r in tasks) and sizes != {0}:
            # equal task-major blocks (UniTSE's rows): every task's mean in one op, whose backward is one expand
            # instead of a zero-filled [S, N] buffer per task
            mean_probs = probs.view(self.num_tasks, sizes.pop(), self.num_experts).mean(1)
        for task, rows in enumerate(tasks):
            aux.append(load_balancing_loss(probs[rows], assigned[rows], self.k) if mean_probs is None else
                       balance_loss_of_mean(mean_probs[task], assigned[rows], self.k, rows.stop - rows.start))
            task_routes = dispatched[rows]
            kept = task_routes >= 0
            counts.append(torch.bincount(task_routes[kept], minlength=self.num_experts).to(probs.dtype))
            if real is not None:   # of the real rows' routes (padding has none to drop)
                kept = kept[real[rows]]
            dropped.append((~kept).float().mean() if kept.numel() else probs.new_zeros(()))
            has_rows = len(task_routes) > 0
            entropy.append(row_entropy[rows].mean() if has_rows else probs.new_zeros(()))
            z_loss.append(z[rows].mean() if has_rows else z.sum() * 0.0)
        if self.balance == "aux_free" and self.training:   # the assigned routes of the step, per task
            pending = torch.zeros(self.num_tasks, self.num_experts, device=probs.device).index_put_(
                (task_ids.view(-1, 1).expand_as(assigned), assigned), torch.ones_like(assigned, dtype=torch.float32),
                accumulate=True)
            self.pending_counts = pending if self.pending_counts is None else self.pending_counts + pending
        self.last_stats = {"entropy": torch.stack(entropy).detach(), "dropped_fraction": torch.stack(dropped),
                           "z_loss": torch.stack(z_loss), "routes": assigned.detach(),
                           "combine": gates.t().detach().float()}
        return torch.stack(aux), torch.stack(counts).detach()


def task_rows(task_ids: torch.Tensor, num_tasks: int) -> list:
    """Each task's rows: a slice where they are contiguous and in task order (UniTSE stacks them task-major, so
    indexing gives views, not copies), else a boolean mask."""
    sizes = torch.bincount(task_ids, minlength=num_tasks).tolist()
    starts = [sum(sizes[:t]) for t in range(num_tasks)]
    if torch.equal(task_ids, torch.repeat_interleave(torch.arange(num_tasks, device=task_ids.device),
                                                     torch.tensor(sizes, device=task_ids.device))):
        return [slice(start, start + size) for start, size in zip(starts, sizes)]
    return [task_ids == task for task in range(num_tasks)]


def combine_weights(probs: torch.Tensor, indices: torch.Tensor, k: int) -> torch.Tensor:
    """The combine weights DeepSpeed's gating gives routes `indices` [k, S] (-1: dropped) under router
    probabilities `probs` [S, N]: top-1 the chosen expert's probability, top-k (k >= 2) the kept routes'
    probabilities renormalised to sum to one. [k, S], 0 for dropped routes."""
    kept = indices >= 0
    g = probs.gather(1, indices.t().long().clamp_min(0)).t() * kept
    if k == 1:
        return g
    return g / g.sum(0, keepdim=True).clamp_min(torch.finfo(g.dtype).eps)
