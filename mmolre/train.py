"""The one training loop: data -> DeepSpeed engine -> epochs with validation and checkpoints -> test once.

Every rank runs every forward (MoE all-to-alls need all ranks); rank 0 alone prints, logs and writes files.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from . import __version__, checkpoint, distributed
from .config import EMOTIONS, ConfigError, RunConfig
from .data import Batch, PreparedData, eval_batches, prepare, train_loader
from .engine import compute_dtype, initialize, load_ds_config
from .losses import compute_loss
from .metrics import baselines, emotion_metrics, sentiment_metrics
from .model import MMoLRE, count_parameters
from .monitor import Monitor, tensorboard_dir

SYNTHETIC_NOTICE = "SYNTHETIC DATA: these numbers say nothing about accuracy on real MOSI/MOSEI."


@dataclass
class TrainState:
    """Everything besides the engine's own state that a resumed run needs; saved as client state."""
    epoch: int = 0                 # completed epochs
    global_step: int = 0
    train_seconds: float = 0.0
    train_samples: int = 0
    best_tag: str | None = None
    best_epoch: int = 0
    best_valid_loss: float = float("inf")
    history: list = field(default_factory=list)


@dataclass
class EvalResult:
    loss: float
    metrics: dict
    predictions: dict | None = None   # rank 0 only: arrays keyed by column


def log(info: distributed.DistInfo, *parts) -> None:
    if info.is_main:
        print(*parts, flush=True)


def resolve_run_dir(cfg: RunConfig, info: distributed.DistInfo) -> str:
    t = cfg.train
    name = t.run_name
    if info.is_main:
        if name is None and t.resume:
            candidates = [d for d in os.listdir(t.output_dir)
                          if checkpoint.latest_tag(checkpoint.checkpoint_dir(os.path.join(t.output_dir, d)))] \
                if os.path.isdir(t.output_dir) else []
            if not candidates:
                raise ConfigError(f"--resume: no run with a checkpoint in {t.output_dir!r}")
            name = max(candidates, key=lambda d: os.path.getmtime(os.path.join(t.output_dir, d)))
        if name is None:
            name = (f"{cfg.data.dataset}-e{cfg.model.num_experts}k{cfg.model.top_k}-"
                    f"{time.strftime('%Y%m%d-%H%M%S')}")
    name = distributed.broadcast_from_main(name, info)
    return os.path.join(t.output_dir, name)


def _to_device(batch: Batch, device, dtype) -> Batch:
    batch = batch.to(device)
    batch.features = {m: x.to(dtype) for m, x in batch.features.items()}
    return batch


@torch.no_grad()
def evaluate(engine, data: PreparedData, split: str, cfg: RunConfig, info, device, dtype) -> EvalResult:
    """Run on every rank (padded to equal batches); gather predictions with ids to rank 0."""
    engine.eval()
    ds = data.splits[split]
    parts = {"ids": [], "sentiment_pred": [], "sentiment_true": [], "emotion_prob": [], "emotion_true": [],
             "has_emotion": []}
    for batch in eval_batches(ds, engine.train_micro_batch_size_per_gpu(), info.rank, info.world_size):
        out = engine(*_inputs(_to_device(batch, device, dtype)))
        keep = batch.valid.numpy()
        parts["ids"].extend(i for i, k in zip(batch.ids, keep) if k)
        parts["sentiment_pred"].append(out.sentiment.float().cpu().numpy()[keep])
        parts["sentiment_true"].append(batch.sentiment.numpy()[keep])
        parts["emotion_prob"].append(torch.sigmoid(out.emotion_logits.float()).cpu().numpy()[keep])
        parts["emotion_true"].append(batch.emotions.numpy()[keep])
        parts["has_emotion"].append(batch.has_emotion.numpy()[keep])
    engine.train()
    local = {k: (v if k == "ids" else np.concatenate(v)) for k, v in parts.items()}
    gathered = distributed.gather_to_main(local, info)
    preds, summary = None, None
    if info.is_main:
        preds = {k: (sum((g[k] for g in gathered), []) if k == "ids" else np.concatenate([g[k] for g in gathered]))
                 for k in local}
        summary = _score(preds, cfg)
    loss, metrics = distributed.broadcast_from_main(summary, info)  # every rank selects the same checkpoint
    return EvalResult(loss, metrics, preds)


def _score(preds: dict, cfg: RunConfig) -> tuple[float, dict]:
    sent = sentiment_metrics(preds["sentiment_pred"], preds["sentiment_true"])
    metrics = {"sentiment": sent, "samples": len(preds["ids"])}
    loss = sent["mae"]
    has = preds["has_emotion"].astype(bool)
    if has.any():
        metrics["emotion"] = emotion_metrics(preds["emotion_prob"][has], preds["emotion_true"][has])
        p = np.clip(preds["emotion_prob"][has], 1e-7, 1 - 1e-7)
        y = (preds["emotion_true"][has] > 0).astype(np.float64)
        bce = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
        metrics["emotion"]["bce"] = bce
        loss += cfg.train.emotion_loss_weight * bce
    metrics["loss"] = loss
    return loss, metrics


def _inputs(batch: Batch):
    return batch.features, batch.masks


def _write_predictions(path: str, preds: dict) -> None:
    order = np.argsort(np.asarray(preds["ids"]), kind="stable")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "sentiment_true", "sentiment_pred", "has_emotion",
                    *[f"{e}_true" for e in EMOTIONS], *[f"{e}_prob" for e in EMOTIONS]])
        for i in order:
            w.writerow([preds["ids"][i], f"{preds['sentiment_true'][i]:.6g}", f"{preds['sentiment_pred'][i]:.6g}",
                        int(preds["has_emotion"][i]), *[f"{v:.6g}" for v in preds["emotion_true"][i]],
                        *[f"{v:.6g}" for v in preds["emotion_prob"][i]]])


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    import deepspeed
    return {"mmolre": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def format_table(results: dict) -> str:
    """The final test table, printed at the end of a run and by `mmolre show`."""
    test, base = results["test"], results["baselines"]
    s = test["sentiment"]
    lines = ["", "test metrics" + (" (SYNTHETIC DATA)" if results["synthetic"] else ""),
             "| sentiment | Has0 Acc-2 | Has0 F1 | Non0 Acc-2 | Non0 F1 | Acc-5 | Acc-7 | MAE | Corr |",
             "|---|---|---|---|---|---|---|---|---|",
             "| MMoLRE | " + " | ".join(f"{s[k]:.4f}" for k in
                                          ("has0_acc2", "has0_f1", "non0_acc2", "non0_f1", "acc5", "acc7", "mae",
                                           "corr")) + " |",
             f"| baseline | | | {base['majority_non0_acc2']:.4f} (majority) | | | | {base['mean_mae']:.4f} "
             f"(train mean) | |"]
    if "emotion" in test:
        e = test["emotion"]
        lines += ["", "| emotions | micro-F1 | Jaccard acc | mean WA | mean wF1 |", "|---|---|---|---|---|",
                  f"| MMoLRE | {e['micro_f1']:.4f} | {e['jaccard_acc']:.4f} | {e['mean_wacc']:.4f} | "
                  f"{e['mean_wf1']:.4f} |"]
        if "majority_emotion_micro_f1" in base:
            lines.append(f"| majority | {base['majority_emotion_micro_f1']:.4f} | "
                         f"{base['majority_emotion_jaccard_acc']:.4f} | | |")
    if results["synthetic"]:
        lines += ["", SYNTHETIC_NOTICE]
    return "\n".join(lines)


def _routing_summary(out, info) -> tuple[np.ndarray, ...]:
    """Per-layer/task aux loss and entropy averaged over ranks, expert loads summed over ranks."""
    aux = out.aux_loss.detach().float()
    load = out.expert_load.float()
    entropy = out.router_entropy.float()
    dropped = out.dropped_fraction.float()
    weights = out.modality_weights.float().mean(1)
    packed = torch.cat([aux.flatten(), entropy.flatten(), dropped.flatten(), weights.flatten(), load.flatten()])
    packed = distributed.all_reduce_sum(packed.cpu(), info)
    sizes = [aux.numel(), entropy.numel(), dropped.numel(), weights.numel(), load.numel()]
    a, e, d, w, l = torch.split(packed, sizes)
    n = info.world_size
    return ((a / n).view_as(aux).numpy(), (e / n).view_as(entropy).numpy(), (d / n).numpy(),
            (w / n).view_as(weights).numpy(), l.view_as(load).numpy())


def train(cfg: RunConfig) -> dict | None:
    """Run training end to end; returns results.json's content on rank 0 (None on other ranks)."""
    if os.environ.get("MMOLRE_DS_LOG", "warning").lower() != "info":
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    info = distributed.init()
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    on_gpu = acc.device_name() != "cpu"
    device = torch.device(acc.device_name(info.local_rank) if on_gpu else "cpu")
    if on_gpu:
        acc.set_device(info.local_rank)

    m, t = cfg.model, cfg.train
    ep_size = distributed.choose_ep_size(t.ep_size, info.world_size, m.num_experts, info.local_world_size)
    run_dir = resolve_run_dir(cfg, info)
    ds_config = load_ds_config(t, tensorboard_dir(run_dir), on_gpu)
    if info.is_main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({**cfg.to_dict(), "ds_config": ds_config}, f, indent=1)

    data = prepare(cfg.data, builds=info.local_rank == 0, barrier=lambda: distributed.barrier(info))
    if data.synthetic:
        log(info, SYNTHETIC_NOTICE)
    for split, rep in data.meta["splits"].items():
        if rep["nonfinite_replaced"]:
            log(info, f"data: {split}: replaced non-finite feature values with 0: {rep['nonfinite_replaced']}")

    torch.manual_seed(t.seed)
    model = MMoLRE(m, data.shapes, ep_size=ep_size)
    model.init_shared_experts(t.seed, distributed.expert_parallel_rank(info.rank, ep_size))
    params = count_parameters(model)
    micro = t.batch_size or ds_config["train_micro_batch_size_per_gpu"]
    loader = train_loader(data.splits["train"], micro, info.rank, info.world_size, t.seed)
    steps_per_epoch = len(loader)
    total_steps = min(steps_per_epoch * t.epochs, t.max_steps or 10**12)
    engine = initialize(model, t, ds_config, total_steps)
    torch.manual_seed(t.seed * 1000 + info.rank + 1)  # dropout differs per rank, weights were broadcast
    dtype = compute_dtype(engine)
    log(info, f"run: {run_dir} | world {info.world_size} | expert parallel {ep_size} | "
              f"{m.num_experts} experts, top-{m.top_k}, rank {m.expert_rank} | params {params['total']:,} "
              f"(experts {params['expert']:,}) | {steps_per_epoch} steps/epoch x {t.epochs} epochs")

    ckpt_dir = checkpoint.checkpoint_dir(run_dir)
    state = TrainState()
    if t.resume and checkpoint.latest_tag(ckpt_dir):
        client = checkpoint.load(engine, ckpt_dir)
        state = TrainState(**client["train_state"])
        log(info, f"resumed from {ckpt_dir}/{checkpoint.latest_tag(ckpt_dir)}: epoch {state.epoch}, "
                  f"step {state.global_step}")
    elif t.resume:
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir}")

    monitor = Monitor(tensorboard_dir(run_dir) if info.is_main else None)
    global_batch = micro * info.world_size
    done = t.max_steps and state.global_step >= t.max_steps
    while state.epoch < t.epochs and not done:
        loader.sampler.set_epoch(state.epoch)
        bar = tqdm(loader, desc=f"epoch {state.epoch + 1}/{t.epochs}", disable=not info.is_main,
                   dynamic_ncols=True, leave=False)
        tick, window_samples = time.perf_counter(), 0
        for batch in bar:
            step_start = time.perf_counter()
            batch = _to_device(batch, device, dtype)
            out = engine(*_inputs(batch))
            loss = compute_loss(out, batch, t.aux_loss_weight, t.emotion_loss_weight)
            engine.backward(loss.total)
            engine.step()
            state.global_step += 1
            state.train_samples += global_batch
            state.train_seconds += time.perf_counter() - step_start
            window_samples += global_batch
            if state.global_step % t.log_every == 0:
                losses = distributed.all_reduce_sum(torch.stack(
                    [loss.total.detach(), loss.sentiment.detach(), loss.emotion.detach(), loss.aux.detach()]).float()
                    .cpu(), info) / info.world_size
                aux, entropy, dropped, weights, load = _routing_summary(out, info)
                now = time.perf_counter()
                monitor.scalars({"loss/total": losses[0], "loss/sentiment": losses[1], "loss/emotion": losses[2],
                                 "loss/aux": losses[3], "train/lr": engine.get_lr()[0],
                                 "train/samples_per_s": window_samples / (now - tick),
                                 "train/epoch": state.epoch}, state.global_step)
                monitor.routing(out.layer_names, aux, load, entropy, dropped, state.global_step)
                monitor.fusion(model.modalities, weights, state.global_step)
                tick, window_samples = now, 0
                bar.set_postfix(loss=f"{losses[0]:.3f}", mae=f"{losses[1]:.3f}", bce=f"{losses[2]:.3f}")
            if t.max_steps and state.global_step >= t.max_steps:
                done = True
                break
        bar.close()
        state.epoch += 1

        valid = evaluate(engine, data, "valid", cfg, info, device, dtype)
        state.history.append({"epoch": state.epoch, "step": state.global_step, "valid_loss": valid.loss,
                              "valid": valid.metrics})
        monitor.scalars(_flatten("valid", valid.metrics), state.global_step)
        tag = f"epoch{state.epoch}"
        if valid.loss < state.best_valid_loss:
            state.best_valid_loss, state.best_tag, state.best_epoch = valid.loss, tag, state.epoch
        checkpoint.save(engine, ckpt_dir, tag, {"train_state": state.__dict__, "config": cfg.to_dict()})
        if info.local_rank == 0:
            checkpoint.prune(ckpt_dir, keep={tag, state.best_tag})
        distributed.barrier(info)
        v = valid.metrics["sentiment"]
        log(info, f"epoch {state.epoch}: valid loss {valid.loss:.4f} | MAE {v['mae']:.4f} | Non0 Acc-2 "
                  f"{v['non0_acc2']:.4f}" + (f" | emotion micro-F1 {valid.metrics['emotion']['micro_f1']:.4f}"
                                             if "emotion" in valid.metrics else "")
                  + (" (best)" if state.best_tag == tag else ""))
        monitor.flush()

    # The test split is evaluated once, with the checkpoint that validation selected.
    checkpoint.load(engine, ckpt_dir, tag=state.best_tag, weights_only=True)
    test = evaluate(engine, data, "test", cfg, info, device, dtype)
    monitor.scalars(_flatten("test", test.metrics), state.global_step)
    monitor.close()
    if not info.is_main:
        return None

    train_split = data.splits["train"].hf
    best = next(h for h in state.history if h["epoch"] == state.best_epoch)
    emo_rows = np.asarray(train_split["has_emotion"], bool)
    results = {
        "config": cfg.to_dict(), "synthetic": data.synthetic, "dataset": cfg.data.dataset,
        "world_size": info.world_size, "ep_size": ep_size, "num_experts": m.num_experts, "top_k": m.top_k,
        "best_epoch": state.best_epoch, "global_step": state.global_step, "params": params,
        "train": {"seconds": state.train_seconds, "samples": state.train_samples,
                  "samples_per_s": state.train_samples / max(state.train_seconds, 1e-9), "epochs": state.epoch},
        "valid": best["valid"], "test": test.metrics,
        "baselines": baselines(np.asarray(train_split["sentiment"]), np.asarray(train_split["emotions"])[emo_rows],
                               test.predictions["sentiment_true"],
                               test.predictions["emotion_true"][test.predictions["has_emotion"].astype(bool)]),
        "history": state.history, "seed": t.seed, "versions": _versions(), "git_commit": _git_commit(),
    }
    _write_predictions(os.path.join(run_dir, "predictions_test.csv"), test.predictions)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(format_table(results), flush=True)
    print(f"\nwrote {run_dir}/results.json, predictions_test.csv, tensorboard/, checkpoints/", flush=True)
    return results


def _flatten(prefix: str, d: dict) -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(f"{prefix}/{k}", v))
        elif isinstance(v, (int, float)):
            out[f"{prefix}/{k}"] = v
    return out

