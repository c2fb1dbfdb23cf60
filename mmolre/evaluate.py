"""Evaluation on every rank (equal padded batches), predictions gathered with their ids to rank 0, and
the metrics of the gathered predictions."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import distributed
from .config import RunConfig, evaluation_batch
from .data import Batch, PreparedData, eval_batches
from .metrics import emotion_metrics, sentiment_metrics
from .routing_stats import specialisation_statistics


@dataclass
class EvalResult:
    loss: float
    metrics: dict
    predictions: dict | None = None   # rank 0 only: arrays keyed by column
    routing: dict | None = None       # rank 0 only: routing_stats.specialisation_statistics of this split


def to_device(batch: Batch, device, dtype) -> Batch:
    batch = batch.to(device)
    batch.features = {m: x.to(dtype) if x.is_floating_point() else x for m, x in batch.features.items()}  # not ids
    return batch


@torch.no_grad()
def predict_batches(forward, batches) -> dict:
    """Predictions and labels of the real (non-padding) samples of `batches`, as arrays keyed by column;
    `forward(batch)` returns the model's output. Shared by evaluation and `mmolre predict`."""
    parts = {"ids": [], "sentiment_pred": [], "sentiment_true": [], "emotion_prob": [], "emotion_true": [],
             "has_emotion": [], "routes": [], "combine": []}
    for batch in batches:
        out = forward(batch)
        keep = batch.valid.numpy()
        parts["ids"].extend(i for i, k in zip(batch.ids, keep) if k)
        parts["sentiment_pred"].append(out.sentiment.float().cpu().numpy()[keep])
        parts["sentiment_true"].append(batch.sentiment.numpy()[keep])
        parts["emotion_prob"].append(torch.sigmoid(out.emotion_logits.float()).cpu().numpy()[keep])
        parts["emotion_true"].append(batch.emotions.numpy()[keep])
        parts["has_emotion"].append(batch.has_emotion.numpy()[keep])
        parts["routes"].append(out.routes.permute(2, 0, 1, 3).to(torch.int32).cpu().numpy()[keep])  # [B, L, tasks, k]
        parts["combine"].append(out.combine.permute(2, 0, 1, 3).float().cpu().numpy()[keep])
    return {k: (v if k == "ids" else np.concatenate(v)) for k, v in parts.items()}


@torch.no_grad()
def evaluate(engine, data: PreparedData, split: str, cfg: RunConfig, info, device, dtype,
             previous: dict | None = None) -> EvalResult:
    """Run on every rank (padded to equal batches); gather predictions with ids to rank 0. `previous`: an
    earlier evaluation's predictions of this split (rank 0), whose routes the routing stability compares."""
    engine.eval()
    size = evaluation_batch(cfg, engine.train_micro_batch_size_per_gpu(), len(engine.module.modalities))
    batches = eval_batches(data.splits[split], size, info.rank, info.world_size)
    local = predict_batches(lambda batch: engine(*padded_inputs(to_device(batch, device, dtype))), batches)
    engine.train()
    gathered = distributed.gather_to_main(local, info)
    preds, summary = None, None
    if info.is_main:
        preds = {k: (sum((g[k] for g in gathered), []) if k == "ids" else np.concatenate([g[k] for g in gathered]))
                 for k in local}
        summary = _score(preds, cfg)
        routing = _routing(preds, engine.module, previous)
        if len(data.names) > 1:  # mixed datasets: each one's metrics too (ids carry "name/")
            for name in data.names:
                rows = np.array([i.startswith(f"{name}/") for i in preds["ids"]])
                summary[1].setdefault("per_dataset", {})[name] = _score(
                    {k: ([i for i, r in zip(v, rows) if r] if k == "ids" else v[rows]) for k, v in preds.items()},
                    cfg)[1]
    loss, metrics = distributed.broadcast_from_main(summary, info)  # every rank selects the same checkpoint
    return EvalResult(loss, metrics, preds, routing if info.is_main else None)


def _routing(preds: dict, model, previous: dict | None) -> dict | None:
    """Routing statistics where rows choose experts (none without shared experts, or in a dense mixture, where
    every row visits every expert)."""
    if preds["routes"].shape[-1] == 0 or model.cfg.dense_mixture:
        return None
    before = None
    if previous is not None and set(previous["ids"]) >= set(preds["ids"]):   # aligned by id: the order of the
        where = {i: n for n, i in enumerate(previous["ids"])}                 # gathered rows depends on the world
        before = previous["routes"][[where[i] for i in preds["ids"]]]
        if before.shape != preds["routes"].shape:   # a resume that changed --route_per: no earlier routes to compare
            before = None
    return specialisation_statistics(preds["routes"], preds["combine"], model.moe_layer_names(), model.cfg.num_experts,
                           preds["sentiment_true"], preds["emotion_true"], preds["has_emotion"], before,
                           routes_per_row=model.cfg.effective_top_k)


def _score(preds: dict, cfg: RunConfig) -> tuple[float, dict]:
    """The metrics, and the validation loss that selects the checkpoint: sentiment MAE + λ·emotion BCE, or
    only the trained task's term in a single-task run (the untrained head's loss must not choose)."""
    sent = sentiment_metrics(preds["sentiment_pred"], preds["sentiment_true"])
    metrics = {"sentiment": sent, "samples": len(preds["ids"])}
    tasks = cfg.train.tasks
    loss = sent["mae"] if tasks != "emotion" else 0.0
    has = preds["has_emotion"].astype(bool)
    if has.any():
        metrics["emotion"] = emotion_metrics(preds["emotion_prob"][has], preds["emotion_true"][has])
        p = np.clip(preds["emotion_prob"][has], 1e-7, 1 - 1e-7)
        y = (preds["emotion_true"][has] > 0).astype(np.float64)
        bce = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
        metrics["emotion"]["bce"] = bce
        if tasks != "sentiment":
            loss += cfg.train.emotion_loss_weight * bce
    metrics["loss"] = loss
    return loss, metrics


def inputs(batch: Batch):
    return batch.features, batch.masks


def padded_inputs(batch: Batch):
    """An evaluation batch's inputs with which rows are real: padding rows then take no expert slot."""
    return batch.features, batch.masks, batch.valid
