"""TensorBoard logging (rank 0 only): losses, routing health, fusion weights, throughput, validation."""
from __future__ import annotations

import os

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from .config import TASKS
from .tensorboard_tags import MODALITY_WEIGHTS, MOE

# Above this many experts, per-expert scalars would flood TensorBoard; the histogram and the
# max/mean ratio still show the load.
MAX_PER_EXPERT_SCALARS = 32


class Monitor:
    def __init__(self, log_dir: str | None):
        self.writer = SummaryWriter(log_dir) if log_dir else None

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for tag, v in values.items():
                self.writer.add_scalar(tag, float(v), step)

    def routing(self, layer_names: list[str], aux: np.ndarray, load: np.ndarray, entropy: np.ndarray,
                dropped: np.ndarray, step: int) -> None:
        """aux, entropy, dropped: [layers, tasks]; load: [layers, tasks, N] rows each expert received (all ranks);
        dropped: the fraction of the task's routes the capacity limit dropped."""
        if not self.writer or load.shape[-1] == 0:   # no shared experts (an ablation): nothing routed
            return
        streams = TASKS if aux.shape[1] == len(TASKS) else ("shared",)
        for li, layer in enumerate(layer_names):
            for ti, task in enumerate(streams):
                prefix = f"{MOE}/{layer}/{task}"
                counts = load[li, ti]
                self.writer.add_scalar(f"{prefix}/dropped_fraction", float(dropped[li, ti]), step)
                self.writer.add_scalar(f"{prefix}/aux_loss", float(aux[li, ti]), step)
                self.writer.add_scalar(f"{prefix}/router_entropy", float(entropy[li, ti]), step)
                self.writer.add_scalar(f"{prefix}/load_max_over_mean", float(counts.max() / max(counts.mean(), 1e-9)),
                                       step)
                if counts.sum() > 0:  # a histogram over expert ids, one sample per routed row
                    expert_of_row = np.repeat(np.arange(len(counts)), np.rint(counts).astype(np.int64))
                    self.writer.add_histogram(f"{prefix}/rows_per_expert", expert_of_row, step,
                                              bins=np.arange(len(counts) + 1) - 0.5)
                if len(counts) <= MAX_PER_EXPERT_SCALARS:
                    for e, c in enumerate(counts):
                        self.writer.add_scalar(f"{prefix}/rows/expert_{e:03d}", float(c), step)

    def hparams(self, hparams: dict, metrics: dict[str, float], step: int) -> None:
        """The run's hyper-parameters and final metrics for TensorBoard's HParams tab, written into this run's
        own event file (SummaryWriter.add_hparams would start a second run beside it); the metrics are also
        scalars, which is where the tab reads their values."""
        if not self.writer:
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summaries
        file_writer = self.writer._get_file_writer()
        for summary in hparams_summaries(hparams, metrics):   # the experiment, session start and session end
            file_writer.add_summary(summary)
        self.scalars(metrics, step)

    def fusion(self, modalities: list[str], weights: np.ndarray, step: int) -> None:
        """weights: [tasks, M] mean modality weight per task."""
        if self.writer:
            for ti, task in enumerate(TASKS):
                for mi, m in enumerate(modalities):
                    self.writer.add_scalar(f"{MODALITY_WEIGHTS}/{task}/{m}", float(weights[ti, mi]), step)

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def flatten(prefix: str, d: dict) -> dict[str, float]:
    """{"a": {"b": 1}} -> {"prefix/a/b": 1}: nested metrics as TensorBoard tags (non-numbers left out)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(f"{prefix}/{k}", v))
        elif isinstance(v, (int, float)):
            out[f"{prefix}/{k}"] = v
    return out


def tensorboard_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "tensorboard")
