"""The learning-rate schedule, measured in training samples rather than optimizer steps.

Linear warm-up, then cosine decay to 5 % of the peak. The position on the curve is the number of training
samples the applied optimizer steps have consumed, so the curve does not depend on how those samples were
grouped into steps: a resume under another world size, micro batch or gradient accumulation continues it
where it was, and micro 16 x accumulation 2 follows the same curve as micro 32 x accumulation 1.

DeepSpeed steps the scheduler once per optimizer step (at accumulation boundaries, never on a skipped
step), and saves and restores it with the engine's checkpoints. The state holds the position and the plan
the run was started with: the total and warm-up samples, kept on a resume while --epochs, --max_steps and
--warmup_ratio are unchanged (another world size divides an epoch into batches a little differently; that
must not move the curve), and the sample budget of --max_steps, kept while --max_steps is unchanged. A
resume with other values re-plans: more epochs stretch the rest of the curve, and a new --max_steps counts
its remaining steps at the current batch size.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

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


@dataclass(frozen=True)
class SchedulePlan:
    """What the schedule is planned from: the flags that shape it and this run's batch geometry."""
    epochs: int
    max_steps: int
    warmup_ratio: float
    samples_per_epoch: int
    samples_per_step: int
    text_warmup_ratio: float | None = None   # the pretrained text encoder's groups (text_*): their own warm-up


class WarmupCosineBySamples(LRScheduler):
    def __init__(self, optimizer: torch.optim.Optimizer, plan: SchedulePlan):
        self.plan = plan
        self.samples_per_step = plan.samples_per_step
        self.samples = 0                 # samples consumed by the optimizer steps applied so far
        self.max_samples = plan.max_steps * plan.samples_per_step   # --max_steps as a sample budget (0: none)
        self._plan_total()
        self._started = False
        super().__init__(optimizer)      # applies the first step's LR (LRScheduler's initial step)

    def _plan_total(self) -> None:
        f = self.plan
        self.total_samples = max(1, min(f.epochs * f.samples_per_epoch, self.max_samples or 10**18))
        self.warmup_samples = max(f.samples_per_step, int(self.total_samples * f.warmup_ratio))

    def factor(self, warmup_ratio: float | None = None) -> float:
        """The LR factor now; with warmup_ratio, for a group warmed up over that fraction of the samples
        instead (same total, same cosine)."""
        warmup = self.warmup_samples if warmup_ratio is None else \
            max(self.samples_per_step, int(self.total_samples * warmup_ratio))
        return warmup_cosine_factor(self.samples, self.samples_per_step, self.total_samples, warmup)

    def get_lr(self) -> list[float]:
        text = self.plan.text_warmup_ratio
        return [base * self.factor(text if str(group.get("name", "")).startswith("text_") else None)
                for base, group in zip(self.base_lrs, self.optimizer.param_groups)]

    def step(self, epoch=None) -> None:
        """Called by DeepSpeed after each applied optimizer step (and once by LRScheduler's constructor)."""
        if self._started:
            self.samples += self.samples_per_step
        self._started = True
        self.last_epoch += 1
        self.apply_lr()

    def apply_lr(self) -> None:
        """Write this position's LR into the optimizer (also after something else, e.g. loading an optimizer
        state, put another there)."""
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        # "flags" (the plan's inputs) and "plan" (what was derived from them): the keys checkpoints have always had
        return {"samples": self.samples, "last_epoch": self.last_epoch, "flags": asdict(self.plan),
                "plan": {"total_samples": self.total_samples, "warmup_samples": self.warmup_samples,
                         "max_samples": self.max_samples}}

    def load_state_dict(self, state_dict: dict) -> None:
        """The position always; the derived plan where the flags it was made from are unchanged (module
        docstring)."""
        if "samples" not in state_dict:
            raise ValueError("not a WarmupCosineBySamples state (a checkpoint of an earlier version?)")
        self.last_epoch = state_dict["last_epoch"]   # = optimizer steps applied
        self.samples = int(state_dict["samples"])
        saved, derived = state_dict.get("flags") or {}, state_dict.get("plan") or {}
        if saved.get("max_steps") == self.plan.max_steps and "max_samples" in derived:
            self.max_samples = derived["max_samples"]
        elif self.plan.max_steps:   # a new step budget: its remaining steps at today's batch size
            self.max_samples = self.samples + max(0, self.plan.max_steps - self.last_epoch) * self.samples_per_step
        same = all(saved.get(k) == getattr(self.plan, k) for k in ("epochs", "max_steps", "warmup_ratio"))
        # (the text groups' warm-up is a fraction of the kept total, so a changed --text_warmup_ratio applies)
        if same and "total_samples" in derived:
            self.total_samples, self.warmup_samples = derived["total_samples"], derived["warmup_samples"]
        else:
            self._plan_total()
        self.apply_lr()
