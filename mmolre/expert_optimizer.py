"""AdamW for the shared experts held in expert banks (`model/expert_bank.py`), at the cost of the rows routed.

DeepSpeed's engine steps the dense model (ZeRO 0/1/2, fp32 or bf16); this steps the experts, at the same
points and with the same rules, so the two together train what one AdamW over the whole model would:

1. **Reduction** (`reduce_gradients`, at the end of an accumulation window's backward, as DeepSpeed reduces):
   each rank's sparse expert gradients are summed over the expert's replicas (the expert-data-parallel group:
   world size / expert-parallel size ranks hold the same experts) and scaled by 1 / world size, DeepSpeed's own
   rule for expert gradients. The replicas first agree, by one all-reduce of row counts, on which experts got
   rows anywhere, so they reduce, clip and step exactly the same rows and their states never drift apart.
2. **The clipping norm** (`squared_norm`): the experts' share of the model's gradient norm, every expert once,
   which `engine.py` adds into the norm DeepSpeed clips the dense model by.
3. **The update** (`apply_update`, after DeepSpeed's step, and only when DeepSpeed applied it): the experts'
   gradients are clipped by the same coefficient DeepSpeed used, then AdamW, decoupled weight decay on the
   weights and none on the biases (as for every bias of the model):
   * `dense` (the default): every local expert takes the step, a zero gradient for those that got no row,
     exactly torch's AdamW: momentum and decay move idle experts too. Cost: every expert's state, every step.
   * `lazy`: only experts that received rows in the window (on any replica) take a step, each with its own
     step count, as if each expert were its own AdamW parameter stepped only when it has work; the moments,
     the step count and the weights (decay included) of every other expert stay untouched (lazy / sparse
     Adam). Cost: the experts that worked.
4. **Zeroing** (`zero_grad`): the banks' sparse gradients are dropped.

The state (fp32 weights in the banks, AdamW moments and step counts here) is saved by `checkpointer.py` in
one file per expert-parallel rank, indexed by global expert id, which any topology can load its share of.
"""
from __future__ import annotations

import math

import torch

from . import distributed

BETAS, EPS = (0.9, 0.999), 1e-8     # torch's AdamW defaults, as the dense model's optimizer uses them
BLOCK_VALUES = 2 ** 18              # values per block of a whole-bank update (1 MB of fp32: stays in cache)
NO_DECAY = ("down.bias", "up.bias")


class ExpertOptimizer:
    def __init__(self, model, mode: str, weight_decay: float, info: distributed.DistInfo, ep_size: int):
        if mode not in ("dense", "lazy"):
            raise ValueError(f"expert optimizer mode must be dense or lazy, got {mode!r}")
        self.banks = list(model.expert_banks())
        self.mode, self.weight_decay, self.info = mode, weight_decay, info
        self.state = {layer: {"exp_avg": {}, "exp_avg_sq": {}, "step": torch.zeros(bank.num_local, dtype=torch.int64)}
                      for layer, bank in self.banks}
        self.stepped: dict[str, torch.Tensor] = {}   # layer -> local ids that got rows this window (after reduce)
        self.norm_squared: torch.Tensor | None = None   # this step's, while DeepSpeed computes its norm
        self.edp_group = self.ep_group = None
        if ep_size and self.banks and torch.distributed.is_initialized():   # at world size 1 too (one GPU runs
            # the same collectives as many)
            from deepspeed.utils import groups
            name = f"ep_size_{ep_size}"
            self.edp_group = groups._get_expert_data_parallel_group(name)
            self.ep_group = groups._get_expert_parallel_group(name)

    def __bool__(self) -> bool:
        return bool(self.banks)

    # ---- 1. reduction -------------------------------------------------------------------------------------
    def reduce_gradients(self) -> None:
        """Sum each expert's gradient over its replicas, scaled by 1 / world size; keep the rows any replica
        touched (`self.stepped`)."""
        world = self.info.world_size
        for layer, bank in self.banks:
            grads = {name: t.grad.coalesce() if t.grad is not None and t.grad.is_sparse else t.grad
                     for name, t in bank.tensors.items()}
            touched = torch.zeros(bank.num_local)
            for g in grads.values():
                if g is not None:
                    touched[g.indices()[0].cpu() if g.is_sparse else torch.arange(bank.num_local)] = 1.0
            if self.edp_group is not None:
                touched = distributed.all_reduce_sum(touched, self.info, group=self.edp_group)
            ids = touched.nonzero().flatten()
            self.stepped[layer] = ids
            for name, t in bank.tensors.items():
                rows = _rows_of(grads[name], ids.to(t.device), t)
                rows.mul_(1.0 / world)
                if self.edp_group is not None:
                    rows = distributed.all_reduce_sum(rows, self.info, group=self.edp_group)
                t.grad = torch.sparse_coo_tensor(ids.to(t.device).unsqueeze(0), rows, t.shape,
                                                 check_invariants=False).coalesce()

    # ---- 2. the clipping norm -----------------------------------------------------------------------------
    def squared_norm(self) -> torch.Tensor:
        """Sum of squares of every expert's reduced gradient over the whole model (each expert once: summed
        over the expert-parallel group, whose ranks hold the experts between them). A collective."""
        local = torch.zeros((), dtype=torch.float64)
        for _, bank in self.banks:
            for t in bank.tensors.values():
                if t.grad is not None:
                    local += t.grad.coalesce().values().double().pow(2).sum().cpu()
        if self.ep_group is not None:
            local = distributed.all_reduce_sum(local, self.info, group=self.ep_group)
        return local

    # ---- 3. the update ------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_update(self, lr: float, clip_divisor: float) -> None:
        """One AdamW step of the experts with learning rate `lr`; gradients divided by `clip_divisor` first
        (DeepSpeed's clipping: (norm + 1e-6) / max_norm when that exceeds 1, else 1). An infinite divisor (a
        non-finite norm: an overflow that DeepSpeed's step did not skip) steps no expert."""
        if not math.isfinite(clip_divisor):
            return
        whole_banks = []   # every expert stepped, one step count: torch's arithmetic over whole tensors
        for layer, bank in self.banks:
            state = self.state[layer]
            ids = self.stepped.get(layer)
            if self.mode == "dense":
                ids = torch.arange(bank.num_local)
            elif ids is None or not len(ids):
                continue
            state["step"][ids] += 1
            steps = state["step"][ids].double()
            if len(ids) == bank.num_local and bool((steps == steps[0]).all()):
                whole_banks.append((state, bank, float(steps[0])))
                continue
            for name, t in bank.tensors.items():
                decay = 0.0 if name in NO_DECAY else self.weight_decay
                block = max(1, BLOCK_VALUES // max(1, t[0].numel()))   # a block of rows: bounded temporaries
                for lo in range(0, len(ids), block):
                    rows = ids[lo:lo + block].to(t.device)
                    grad = _rows_of(t.grad, rows, t)
                    if clip_divisor != 1.0:
                        grad.mul_(1.0 / clip_divisor)
                    self._adamw_rows(state, name, t, rows, grad, steps[lo:lo + block], lr, decay)
        if whole_banks:
            self._adamw_whole(whole_banks, lr, clip_divisor)

    def _adamw_whole(self, whole_banks: list, lr: float, clip_divisor: float) -> None:
        """torch's single-tensor AdamW (its arithmetic exactly) on whole banks, weights with decay, biases
        without, a block of rows at a time: the sparse gradient becomes dense one block at a time, and the
        update's eight passes run over a block that stays in cache instead of over the whole bank."""
        b1, b2 = BETAS
        for state, bank, step in whole_banks:
            step_size, bias2_sqrt = lr / (1 - b1 ** step), (1 - b2 ** step) ** 0.5
            for name, t in bank.tensors.items():
                if name not in state["exp_avg"]:
                    state["exp_avg"][name], state["exp_avg_sq"][name] = torch.zeros_like(t), torch.zeros_like(t)
                avg, avg_sq = state["exp_avg"][name], state["exp_avg_sq"][name]
                decay = 0.0 if name in NO_DECAY else self.weight_decay
                ids, values = _sparse_rows(t.grad, t)
                block = max(1, BLOCK_VALUES // max(1, t[0].numel()))
                for lo in range(0, t.shape[0], block):
                    hi = min(lo + block, t.shape[0])
                    a, b = torch.searchsorted(ids, torch.tensor([lo, hi], device=ids.device)).tolist()
                    grad = t.new_zeros((hi - lo, *t.shape[1:])).index_copy_(0, ids[a:b] - lo, values[a:b])
                    if clip_divisor != 1.0:
                        grad.mul_(1.0 / clip_divisor)
                    p, m, v = t.data[lo:hi], avg[lo:hi], avg_sq[lo:hi]
                    if decay:
                        p.mul_(1 - lr * decay)
                    m.lerp_(grad, 1 - b1)
                    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                    p.addcdiv_(m, (v.sqrt() / bias2_sqrt).add_(EPS), value=-step_size)

    def _adamw_rows(self, state, name, weight, ids, grad, steps, lr, decay) -> None:
        """torch's single-tensor AdamW on the rows `ids` of `weight`, each row with its own step count: its
        arithmetic on each expert as if the expert were a parameter of its own (bit for bit on CPU, where
        torch's addcdiv computes (value * a) / b; its CUDA kernel computes value * (a / b))."""
        if name not in state["exp_avg"]:   # created at the first step, as torch's AdamW creates its state
            state["exp_avg"][name], state["exp_avg_sq"][name] = torch.zeros_like(weight), torch.zeros_like(weight)
        avg, avg_sq = state["exp_avg"][name], state["exp_avg_sq"][name]
        whole = len(ids) == weight.shape[0]
        p, m, v = (weight.data, avg, avg_sq) if whole else (weight.data[ids], avg[ids], avg_sq[ids])
        b1, b2 = BETAS
        if decay:
            p.mul_(1 - lr * decay)
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        # torch's scalars, one per row (computed in double, rounded to fp32 as torch rounds them)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        bias2_sqrt = (1 - b2 ** steps).sqrt().to(weight.dtype).view(shape).to(weight.device)
        neg_step_size = (-lr / (1 - b1 ** steps)).to(weight.dtype).view(shape).to(weight.device)
        denom = (v.sqrt() / bias2_sqrt).add_(EPS)
        p.addcdiv_(m * neg_step_size, denom)
        if not whole:
            weight.data[ids], avg[ids], avg_sq[ids] = p, m, v

    # ---- 4. zeroing ---------------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        for _, bank in self.banks:
            for t in bank.tensors.values():
                t.grad = None
        self.stepped = {}

    # ---- state ------------------------------------------------------------------------------------------------
    def layer_state(self, layer: str, bank) -> dict:
        """A layer's full state for a checkpoint: weights, moments (zeros before the first step) and step counts
        of its local experts."""
        state = self.state[layer]
        out = {"step": state["step"].clone()}
        for name, t in bank.tensors.items():
            out[f"{name}/weight"] = t.detach()
            out[f"{name}/exp_avg"] = state["exp_avg"].get(name, torch.zeros_like(t))
            out[f"{name}/exp_avg_sq"] = state["exp_avg_sq"].get(name, torch.zeros_like(t))
        return out

    @torch.no_grad()
    def load_layer_state(self, layer: str, bank, saved: dict, with_moments: bool = True) -> None:
        """Weights (and moments and step counts) of this rank's local experts, from `saved` rows in the same
        order as the bank's."""
        bank.load_rows({name: saved[f"{name}/weight"] for name in bank.tensors})
        state = self.state[layer]
        if with_moments:
            state["step"] = saved["step"].to(torch.int64).clone()
            for name, t in bank.tensors.items():
                state["exp_avg"][name] = saved[f"{name}/exp_avg"].to(t.dtype).to(t.device).clone()
                state["exp_avg_sq"][name] = saved[f"{name}/exp_avg_sq"].to(t.dtype).to(t.device).clone()
        else:
            state["step"].zero_()
            state["exp_avg"].clear()
            state["exp_avg_sq"].clear()


def _rows_of(grad: torch.Tensor | None, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Dense rows `ids` of a sparse (or dense, or missing) gradient of `like`: zeros where it has none."""
    rows = like.new_zeros((len(ids), *like.shape[1:]))
    if grad is None or not len(ids):
        return rows
    if not grad.is_sparse:
        return grad.index_select(0, ids).clone()
    grad = grad.coalesce()
    where = torch.full((like.shape[0],), -1, dtype=torch.long, device=like.device)
    where[ids] = torch.arange(len(ids), device=like.device)
    at = where[grad.indices()[0]]
    keep = at >= 0
    rows[at[keep]] = grad.values()[keep].to(rows.dtype)
    return rows


def _sparse_rows(grad: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted row ids, their rows) of a sparse (or dense, or missing) gradient of `like`."""
    if grad is None:
        return torch.zeros(0, dtype=torch.long, device=like.device), like.new_zeros((0, *like.shape[1:]))
    if not grad.is_sparse:
        return torch.arange(like.shape[0], device=like.device), grad
    grad = grad.coalesce()   # coalesced: ids sorted and unique
    return grad.indices()[0], grad.values().to(like.dtype)
