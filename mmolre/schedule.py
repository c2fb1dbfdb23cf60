"""The learning-rate schedule, measured in training samples rather than optimizer steps.

Linear warm-up, then cosine decay to 5 % of the peak. The position on the curve is the number of training
samples the applied optimizer steps have consumed, so the curve does not depend on how those samples were
grouped into steps: a resume under another world size, micro batch or gradient accumulation continues it
where it was, and micro 16 x accumulation 2 follows the same curve as micro 32 x accumulation 1.

DeepSpeed steps the scheduler once per optimizer step (at accumulation boundaries, never on a skipped
step), and saves and restores it with the engine's checkpoints. The state holds the position and the plan
(total and warm-up samples, and the sample budget of --max_steps) with the flags that made it: a resume with
the same --epochs and --max_steps keeps the plan even under another world size (whose batches would divide
the samples a little differently), while a resume with other values re-plans, so resuming with more epochs
stretches the rest of the curve.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

FLOOR = 0.05   # the cosine ends at 5 % of the peak learning rate


def warmup_cosine_factor(samples_before: int, samples_per_step: int, total_samples: int,
                         warmup_samples: int) -> float:
    """The LR factor of the step that trains samples (samples_before, samples_before + samples_per_step]."""
    if samples_before + samples_per_step <= warmup_samples:
        return (samples_before + samples_per_step) / warmup_samples
    progress = min(1.0, max(0.0, (samples_before - warmup_samples) / max(1, total_samples - warmup_samples)))
    return FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosineBySamples(LRScheduler):
    def __init__(self, optimizer: torch.optim.Optimizer, total_samples: int, warmup_ratio: float,
                 samples_per_step: int, max_samples: int = 0, plan_key: tuple = ()):
        self.total_samples = max(1, total_samples)
        self.warmup_samples = max(samples_per_step, int(self.total_samples * warmup_ratio))
        self.max_samples = max_samples   # --max_steps as a sample budget (0: none)
        self.plan_key = list(plan_key)   # the flags the plan was made from
        self.samples_per_step = samples_per_step
        self.samples = 0                 # samples consumed by the optimizer steps applied so far
        self._started = False
        super().__init__(optimizer)      # applies the first step's LR (LRScheduler's initial step)

    def factor(self) -> float:
        return warmup_cosine_factor(self.samples, self.samples_per_step, self.total_samples, self.warmup_samples)

    def get_lr(self) -> list[float]:
        return [base * self.factor() for base in self.base_lrs]

    def step(self, epoch=None) -> None:
        """Called by DeepSpeed after each applied optimizer step (and once by LRScheduler's constructor)."""
        if self._started:
            self.samples += self.samples_per_step
        self._started = True
        self.last_epoch += 1
        self._apply()

    def _apply(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"samples": self.samples, "last_epoch": self.last_epoch, "plan_key": self.plan_key,
                "plan": {"total_samples": self.total_samples, "warmup_samples": self.warmup_samples,
                         "max_samples": self.max_samples}}

    def load_state_dict(self, state_dict: dict) -> None:
        """The position always; the plan where it was made from the same --epochs and --max_steps."""
        if "samples" not in state_dict:
            raise ValueError("not a WarmupCosineBySamples state (a checkpoint of an earlier version?)")
        self.last_epoch = state_dict["last_epoch"]
        self.samples = int(state_dict["samples"])
        if state_dict.get("plan_key") == self.plan_key:
            for name, value in state_dict["plan"].items():
                setattr(self, name, value)
        self._apply()
