"""Per optimizer step: the window's losses, its time, the learning rates it used and its routing; every
--log_every steps these go to TensorBoard and the progress bar.

A step's losses are the mean over its counted micro batches (a skipped non-finite one does not count) and
over the ranks; its routing is that of its last micro batch; samples/s is measured over the steps since the
last log.
"""
from __future__ import annotations

import numpy as np
import torch

from . import distributed
from .losses import LossParts
from .monitor import Monitor
from .tensorboard_tags import LOSSES, TRAIN


def learning_rates(engine) -> dict[str, float]:
    """The model's LR and, with --finetune_text, the text encoder's (its own groups, warm-up and peak)."""
    groups = engine.lr_scheduler.optimizer.param_groups
    out = {f"{TRAIN}/lr": groups[0]["lr"]}
    text = [g["lr"] for g in groups if str(g.get("name", "")).startswith("text_")]
    if text:
        out[f"{TRAIN}/lr_text"] = text[0]
    return out


def reduce_routing_over_ranks(out, info: distributed.DistInfo) -> tuple[np.ndarray, ...]:
    """One micro batch's routing health: per-layer/task aux loss, router entropy, dropped fraction and the mean
    modality weights averaged over ranks (the mean of the ranks' means: with --route_per step ranks route
    different numbers of rows, so this weighs each rank alike, not each row), expert loads summed over ranks.
    One all-reduce."""
    aux = out.aux_loss.detach().float()
    load = out.expert_load.float()
    entropy = out.router_entropy.float()
    dropped = out.dropped_fraction.float()
    weights = out.modality_weights.float().mean(1)
    packed = torch.cat([aux.flatten(), entropy.flatten(), dropped.flatten(), weights.flatten(), load.flatten()])
    packed = distributed.all_reduce_sum(packed, info).cpu()
    sizes = [aux.numel(), entropy.numel(), dropped.numel(), weights.numel(), load.numel()]
    a, e, d, w, l = torch.split(packed, sizes)
    n = info.world_size
    return ((a / n).view(aux.shape).numpy(), (e / n).view(entropy.shape).numpy(),
            (d / n).view(dropped.shape).numpy(), (w / n).view(weights.shape).numpy(), l.view(load.shape).numpy())


class StepMetrics:
    def __init__(self, monitor: Monitor, info: distributed.DistInfo, samples_per_step: int, has_emotions: bool,
                 modalities: list[str]):
        self.monitor, self.info = monitor, info
        self.samples_per_step, self.has_emotions, self.modalities = samples_per_step, has_emotions, modalities
        self._open()
        self.finished = (None, 0)                 # the last closed window's (summed losses, counted micro batches)
        self.log_seconds, self.log_steps = 0.0, 0  # steps applied since the last log

    def _open(self) -> None:
        self.losses, self.counted, self.seconds = None, 0, 0.0

    def micro_batch(self, loss: LossParts, counted: bool, seconds: float) -> None:
        if counted:
            parts = torch.stack([loss.total, loss.sentiment, loss.emotion, loss.aux, loss.z]).detach().float()
            self.losses = parts if self.losses is None else self.losses + parts
            self.counted += 1
        self.seconds += seconds

    def close_window(self, stepped: bool) -> float:
        """End the accumulation window; returns its seconds (counted towards throughput if it was applied)."""
        seconds = self.seconds
        self.finished = (self.losses, self.counted)
        if stepped:
            self.log_seconds += seconds
            self.log_steps += 1
        self._open()
        return seconds

    def due(self, step: int, log_every: int) -> bool:
        return step % log_every == 0 and self.finished[1] > 0

    def log(self, step: int, state, out, lr: dict, grad_norm: float | None, bar) -> None:
        """TensorBoard scalars of the closed step (a collective: every rank calls it) and the progress bar.
        `out`: the step's last ModelOutput; `grad_norm`: the global norm DeepSpeed clipped by (None: unknown)."""
        window, count = self.finished
        info = self.info
        losses = (distributed.all_reduce_sum(window, info) / (info.world_size * count)).cpu()
        aux, entropy, dropped, weights, load = reduce_routing_over_ranks(out, info)
        self.monitor.scalars({f"{LOSSES}/total": losses[0], f"{LOSSES}/sentiment": losses[1],
                              **({f"{LOSSES}/emotion": losses[2]} if self.has_emotions else {}),
                              f"{LOSSES}/aux": losses[3], f"{LOSSES}/router_z": losses[4], **lr,
                              f"{TRAIN}/samples": state.train_samples,
                              f"{TRAIN}/samples_per_s": self.samples_per_step * self.log_steps
                              / max(self.log_seconds, 1e-9),
                              f"{TRAIN}/epoch": state.epoch}, step)
        if grad_norm is not None:
            self.monitor.scalars({f"{TRAIN}/grad_norm": grad_norm}, step)
        self.monitor.routing(out.layer_names, aux, load, entropy, dropped, step)
        self.monitor.fusion(self.modalities, weights, step)
        if bar is not None:
            bar.set_postfix(loss=f"{losses[0]:.3f}", mae=f"{losses[1]:.3f}",
                            **({"bce": f"{losses[2]:.3f}"} if self.has_emotions else {}))
        self.log_seconds, self.log_steps = 0.0, 0
