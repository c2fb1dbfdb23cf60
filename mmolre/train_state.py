"""The progress of a run that every checkpoint carries besides the engine's own state.

Units: a micro batch is one forward/backward per rank; an optimizer step is one accumulation window.
Step counts are optimizer steps; the data position and the LR schedule are measured in samples, so both
continue across a change of world size, micro batch or accumulation.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class TrainState:
    epoch: int = 0                 # completed epochs
    epoch_samples: int = 0         # samples of the current epoch's permutation consumed (all ranks)
    global_step: int = 0           # optimizer steps applied
    train_seconds: float = 0.0
    train_samples: int = 0         # samples of the applied optimizer steps: the LR schedule's position
    skipped_nonfinite: int = 0     # micro batches whose loss was not finite (--on_nonfinite skip)
    best_tag: str | None = None
    best_epoch: int = 0
    best_valid_loss: float = float("inf")
    history: list = field(default_factory=list)
    schedule: dict = field(default_factory=dict)   # the LR schedule's state, for a resume without the engine's
    valid_routes: dict | None = None   # the last validation's routes by id, for routing stability
    epoch_seconds: list = field(default_factory=list)   # per epoch: its training, validation and checkpoint seconds

    @classmethod
    def from_client_state(cls, saved: dict, marker: dict, micro_batch: int) -> "TrainState":
        """From a checkpoint's `train_state` (which also holds the epoch's expert loads: expert_loads.py)."""
        saved = dict(saved)
        if "epoch_step" in saved:   # older checkpoints counted the batches of their own world size
            saved["epoch_samples"] = (saved.pop("epoch_step") * marker.get("micro_batch", micro_batch)
                                      * marker["world_size"])
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})

    def previous_valid_routes(self) -> dict | None:
        """The last validation's routes by id, as the next evaluation compares them (routing stability)."""
        return self.valid_routes and {"ids": self.valid_routes["ids"],
                                      "routes": self.valid_routes["routes"].numpy().astype("int64")}

    def record_validation(self, tag: str, valid_loss: float) -> bool:
        """Select this epoch's checkpoint if its validation loss is the best so far; True if it was."""
        if valid_loss < self.best_valid_loss:
            self.best_valid_loss, self.best_tag, self.best_epoch = valid_loss, tag, self.epoch
            return True
        return False
