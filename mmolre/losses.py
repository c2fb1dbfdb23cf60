"""The training objective: L1(sentiment) + λ·BCE(emotions, where labelled) + α·Σ per-task aux losses
+ β·Σ per-task router z-losses."""
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
    z: torch.Tensor          # Σ over layers and tasks (unweighted)


def compute_loss(out: "ModelOutput", batch: "Batch", aux_weight: float, emotion_weight: float,
                 tasks: str = "both", z_weight: float = 0.0, pos_weight: torch.Tensor | None = None) -> LossParts:
    """tasks: 'both', or 'sentiment' / 'emotion' for single-task training (the other head and its router
    get no loss). aux_weight is 0 when the routers are not balanced by the loss (--balance aux_free/none).
    pos_weight [6]: the weight of each emotion's present cases in the BCE (--emotion_pos_weight)."""
    valid = batch.valid
    sentiment = F.l1_loss(out.sentiment[valid].float(), batch.sentiment[valid])
    emo_rows = valid & batch.has_emotion
    if emo_rows.any():
        target = (batch.emotions[emo_rows] > 0).float()
        emotion = F.binary_cross_entropy_with_logits(out.emotion_logits[emo_rows].float(), target,
                                                     pos_weight=pos_weight)
    else:  # keep the head in the graph so every rank reduces the same gradients
        emotion = out.emotion_logits.float().sum() * 0.0
    aux_terms, z_terms = out.aux_loss.float(), out.z_loss.float()
    if tasks != "both" and aux_terms.shape[-1] == 2:
        trained = 0 if tasks == "sentiment" else 1
        aux_terms, z_terms = aux_terms[:, trained], z_terms[:, trained]
    aux, z = aux_terms.sum(), z_terms.sum()
    w_sent = 0.0 if tasks == "emotion" else 1.0
    w_emo = 0.0 if tasks == "sentiment" else emotion_weight
    total = w_sent * sentiment + w_emo * emotion + aux_weight * aux
    if z_weight:
        total = total + z_weight * z
    return LossParts(total, sentiment, emotion, aux, z)


def zero_loss(model: torch.nn.Module) -> torch.Tensor:
    """An exact zero that depends on every trainable parameter: its backward gives each parameter a zero
    gradient (also where the parameter is NaN), for a micro batch whose own loss cannot be used."""
    return torch.stack([p.reshape(-1)[:1].float().sum() for p in model.parameters() if p.requires_grad]).sum() * 0.0
