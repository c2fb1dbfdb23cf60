"""What may end a step early, agreed on by every rank: a stop request, a non-finite loss, and the test hooks
that make either happen at a chosen point.

Once per micro batch the ranks all-reduce two flags, "this rank's loss is not finite" and "this rank was
asked to stop", so a NaN or a SIGTERM/SIGUSR1 on any rank is acted on by all of them at the same point.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import distributed
from .preemption import StopRequest

# Test hooks: make the loss of the N-th micro batch this process trains on (1-based) NaN on rank
# MMOLRE_FAULT_NAN_RANK (default 0); ask for a graceful stop once optimizer step N is reached.
FAULT_NAN_STEP = "MMOLRE_FAULT_NAN_STEP"
FAULT_NAN_RANK = "MMOLRE_FAULT_NAN_RANK"
FAULT_STOP_STEP = "MMOLRE_FAULT_STOP_STEP"


class NonFiniteLoss(RuntimeError):
    pass


@dataclass(frozen=True)
class FaultHooks:
    nan_micro_batch: int = 0   # 1-based count of this process's micro batches; 0: never
    nan_rank: int = 0
    stop_step: int = 0         # optimizer step at which rank 0 asks for a stop; 0: never

    @classmethod
    def from_env(cls, env=None) -> "FaultHooks":
        env = os.environ if env is None else env
        return cls(int(env.get(FAULT_NAN_STEP, 0)), int(env.get(FAULT_NAN_RANK, 0)), int(env.get(FAULT_STOP_STEP, 0)))


class StepGuards:
    """Installs the stop-signal handlers at construction (before the process group exists, so a signal during
    start-up is kept), then checks every micro batch's loss."""

    def __init__(self, on_nonfinite: str, faults: FaultHooks | None = None):
        self.stop = StopRequest().install()
        self.on_nonfinite = on_nonfinite
        self.faults = FaultHooks.from_env() if faults is None else faults
        self.micro_batches = 0   # trained by this process, for the NaN hook

    def inject_faults(self, loss: torch.Tensor, info: distributed.DistInfo, global_step: int) -> torch.Tensor:
        """The test hooks' effect on this micro batch (none unless their variables are set)."""
        self.micro_batches += 1
        if self.faults.nan_micro_batch == self.micro_batches and info.rank == self.faults.nan_rank:
            loss = loss * float("nan")
        if self.faults.stop_step and global_step + 1 >= self.faults.stop_step and info.is_main:
            self.stop.signal_name = self.stop.signal_name or FAULT_STOP_STEP
        return loss

    def agree(self, loss: torch.Tensor, info: distributed.DistInfo) -> tuple[bool, bool]:
        """(some rank's loss is not finite, some rank was asked to stop), the same on every rank."""
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                             torch.tensor(float(self.stop.requested), device=loss.device)])
        flags = distributed.all_reduce_sum(flags, info).cpu()
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def nonfinite(self, loss: torch.Tensor, batch, info: distributed.DistInfo, where: str) -> None:
        """Every rank calls this when some rank's loss is not finite: raises NonFiniteLoss naming the samples
        (--on_nonfinite stop), or warns (skip; the caller counts the skipped micro batch)."""
        bad = [] if torch.isfinite(loss.detach()).item() else [i for i, v in zip(batch.ids, batch.valid) if v]
        ids = sum(distributed.all_gather(bad, info), [])
        if self.on_nonfinite == "stop":
            raise NonFiniteLoss(f"non-finite loss at {where}; the weights were not updated. Samples of the "
                                f"batch: {ids[:20]}{' ...' if len(ids) > 20 else ''}. Use --on_nonfinite skip "
                                f"to skip such micro batches instead")
        if info.is_main:
            print(f"warning: skipped a non-finite loss at {where}; samples {ids[:10]}", flush=True)

    @property
    def stop_reason(self) -> str:
        return self.stop.signal_name or "on another rank"
