"""The training objective: L1(sentiment) + λ·BCE(emotions, where labelled) + α·Σ per-task aux losses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as F

if TYPE_CHECKING:  # type names only: the loss sits below the data and model layers
    from .data import Batch
    from .model import ModelOutput


@dataclass
class LossParts:
    total: torch.Tensor
    sentiment: torch.Tensor
    emotion: torch.Tensor
    aux: torch.Tensor        # Σ over layers and tasks (unweighted)


def compute_loss(out: "ModelOutput", batch: "Batch", aux_weight: float, emotion_weight: float) -> LossParts:
    valid = batch.valid
    sentiment = F.l1_loss(out.sentiment[valid].float(), batch.sentiment[valid])
    emo_rows = valid & batch.has_emotion
    if emo_rows.any():
        target = (batch.emotions[emo_rows] > 0).float()
        emotion = F.binary_cross_entropy_with_logits(out.emotion_logits[emo_rows].float(), target)
    else:  # keep the head in the graph so every rank reduces the same gradients
        emotion = out.emotion_logits.float().sum() * 0.0
    aux = out.aux_loss.float().sum()
    return LossParts(sentiment + emotion_weight * emotion + aux_weight * aux, sentiment, emotion, aux)
