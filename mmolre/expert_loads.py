"""Which shared experts received rows: the epoch's expert loads (dead experts) and --balance aux_free's nudges.

`EpochExpertLoads` is the one owner of the rows each shared expert received over the current epoch's
training steps. Every rank adds its own micro batches. A checkpoint stores the sum over all ranks (so a
resume under any topology reports what an uninterrupted run would); after a save or a resume rank 0 alone
holds that sum and the other ranks count on from zero, so every row is counted once. The epoch's end takes
the sum over ranks and the next epoch starts from nothing.
"""
from __future__ import annotations

import numpy as np
import torch

from . import distributed
from .monitor import flatten
from .routing_stats import dead_experts
from .tensorboard_tags import ROUTING


class EpochExpertLoads:
    def __init__(self, shape: tuple[int, ...], device: torch.device, info: distributed.DistInfo):
        """shape: [MoE layers, task streams, experts] (experts 0 without shared experts)."""
        self.shape, self.device, self.info = shape, device, info
        self.local: torch.Tensor | None = None   # this rank's share of the epoch's loads

    def add(self, load: torch.Tensor) -> None:
        """One micro batch's loads on this rank [layers, tasks, N]."""
        load = load.detach().float()
        self.local = load if self.local is None else self.local + load

    def take(self) -> torch.Tensor | None:
        """The loads summed over all ranks (on the CPU), after which no rank holds any. A collective: every rank
        calls it, also where only rank 0 holds loads (a save right after a resume). None where no rank has any."""
        have = distributed.all_reduce_sum(torch.tensor([float(self.local is not None)]), self.info)
        if not have.item():
            return None
        local = self.local if self.local is not None else torch.zeros(self.shape, device=self.device)
        self.local = None
        return distributed.all_reduce_sum(local, self.info).cpu()

    def collect_for_checkpoint(self) -> torch.Tensor | None:
        """The epoch's loads so far, summed over ranks (any topology can resume them); afterwards rank 0 alone
        keeps counting from that sum. A collective: every rank calls it."""
        total = self.take()
        self.restore(total)
        return total

    def restore(self, saved: torch.Tensor | None) -> None:
        """A checkpoint's loads, counted once: on rank 0."""
        if saved is not None and self.info.is_main:
            self.local = saved.to(self.device)

    def end_epoch(self) -> np.ndarray | None:
        total = self.take()
        return None if total is None else total.numpy()


def dead_experts_by_layer(load: np.ndarray | None, layer_names: list[str]) -> dict[str, int] | None:
    """{layer: shared experts that received no row of either task} over a window's loads; None without
    loads or without shared experts."""
    if load is None or not load.shape[-1]:
        return None
    return dict(zip(layer_names, dead_experts(load).tolist()))


def epoch_load_record(load: np.ndarray | None, layer_names: list[str]) -> dict:
    """What the epoch's training loads [layers, tasks, N] say, per layer: `dead_experts` (no row of either task)
    and `train_load_max_over_mean` (the busiest expert's routes over the mean, the worse of the tasks);
    {} without loads or without shared experts."""
    dead = dead_experts_by_layer(load, layer_names)
    if dead is None:
        return {}
    mean = load.mean(-1)
    ratio = np.where(mean > 0, load.max(-1) / np.maximum(mean, 1e-12), 0.0).max(-1)   # [layers]
    return {"dead_experts": dead, "train_load_max_over_mean": dict(zip(layer_names, ratio.round(4).tolist()))}


def routing_record(valid, loads: dict, num_experts: int, epoch: int) -> tuple[dict, dict | None, str | None]:
    """An epoch's routing record for the history (validation's specialisation statistics, `loads`: the
    epoch_load_record of its training steps), the validation routes by id to keep for the next epoch's stability
    (int16 keeps checkpoints small), and a warning when experts received no row. `valid`: rank 0's EvalResult."""
    record = {"routing": valid.routing} if valid.routing else {}
    routes = None
    if valid.routing:
        r = valid.predictions["routes"]
        routes = {"ids": list(valid.predictions["ids"]),
                  "routes": torch.from_numpy(r.astype(np.int16 if num_experts < 2 ** 15 else np.int32))}
    warning = None
    record.update(loads)
    dead = loads.get("dead_experts")
    if dead is not None:
        if any(dead.values()):
            warning = (f"warning: epoch {epoch}: shared experts that received no row: "
                       + ", ".join(f"{layer} {n} of {num_experts}" for layer, n in dead.items() if n))
    return record, routes, warning


def routing_scalars(record: dict) -> dict[str, float]:
    """TensorBoard's `routing/` scalars of an epoch's routing record (`routing_record`; empty off rank 0)."""
    return flatten(ROUTING, {**(record.get("routing") or {}),
                             **{k: record.get(k, {}) for k in ("dead_experts", "train_load_max_over_mean")}})


class SelectionBiasNudges:
    """--balance aux_free: after an applied optimizer step every gate's selection bias moves against its tasks'
    load error over the step's routes, summed over all ranks in one all-reduce (so the replicas stay equal).
    A step that was not applied leaves the biases as they were."""

    def __init__(self, model, balance: str, info: distributed.DistInfo):
        self.info = info
        self.gates = [block.moe.deepspeed_moe.gate for _, block in model.moe_blocks()
                      if block.moe is not None and balance == "aux_free"]
        self.marks: list = [None] * len(self.gates)

    def before_micro_batch(self) -> None:
        """Mark the routes counted so far in the window (a skipped micro batch is dropped back to this mark)."""
        self.marks = [g.pending_counts for g in self.gates]

    def drop_micro_batch(self) -> None:
        """A skipped (non-finite) micro batch's routes leave the window's counts, as its gradient does."""
        for gate, mark in zip(self.gates, self.marks):
            gate.pending_counts = mark

    def after_step(self, stepped: bool) -> None:
        if not self.gates:
            return
        pending = [g.pending_counts for g in self.gates]
        for g in self.gates:
            g.pending_counts = None
        if not stepped or any(p is None for p in pending):
            return
        counts = distributed.all_reduce_sum(torch.stack(pending), self.info)
        for gate, c in zip(self.gates, counts):
            gate.nudge_selection_bias(c)
