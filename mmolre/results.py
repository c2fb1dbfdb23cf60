"""What one run leaves: its directory, its records (config.json, data_meta.json), results.json (assembled by
a pure function), predictions_test.csv and the printed test table."""
from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import time

import numpy as np
import torch

from . import checkpoint, distributed
from .version import __version__
from .config import EMOTIONS, ConfigError, RunConfig
from .emotion_decisions import labelled_emotions
from .metrics import baselines
from .routing_stats import headline
from .tensorboard_tags import FINAL

SYNTHETIC_NOTICE = "SYNTHETIC DATA: these numbers say nothing about accuracy on real MOSI/MOSEI."


def resolve_run_dir(cfg: RunConfig, info: distributed.DistInfo) -> str:
    """--output_dir/--run_name; without a name, the newest run with a checkpoint (--resume) or a new name of
    dataset, experts, top-k and time. Chosen on rank 0 and broadcast (a collective)."""
    t = cfg.train
    name = t.run_name
    if info.is_main:
        if name is None and t.resume:
            candidates = [d for d in os.listdir(t.output_dir)
                          if checkpoint.latest_complete(checkpoint.checkpoint_dir(os.path.join(t.output_dir, d)),
                                                        warn=False)] if os.path.isdir(t.output_dir) else []
            if not candidates:
                raise ConfigError(f"--resume: no run with a checkpoint in {t.output_dir!r}")
            name = max(candidates, key=lambda d: os.path.getmtime(os.path.join(t.output_dir, d)))
        if name is None:
            name = (f"{cfg.data.dataset}-e{cfg.model.num_experts}k{cfg.model.top_k}-"
                    f"{time.strftime('%Y%m%d-%H%M%S')}")
    name = distributed.broadcast_from_main(name, info)
    return os.path.join(t.output_dir, name)


def run_records(cfg: RunConfig, ds_config: dict, data) -> dict[str, dict]:
    """The run's config.json (flags and the DeepSpeed config as used) and data_meta.json (what export and
    predict read: shapes, normalisation, sources)."""
    return {"config.json": {**cfg.to_dict(), "ds_config": ds_config},
            "data_meta.json": {"shapes": {k: list(v) for k, v in data.shapes.items()},
                               "normalisation": data.normalisation,
                               "sources": {n: meta["source"] for n, meta in data.sources.items()},
                               "synthetic": data.synthetic}}


def write_records(run_dir: str, records: dict[str, dict]) -> None:
    os.makedirs(run_dir, exist_ok=True)
    for name, content in records.items():
        with open(os.path.join(run_dir, name), "w") as f:
            json.dump(content, f, indent=1)


def provenance() -> dict:
    """What made the run: the seedless facts results.json records besides the config."""
    return {"versions": versions(), "git_commit": git_commit()}


def assemble_results(cfg: RunConfig, data, *, world_size: int, ep_size: int, params: dict, state, test,
                     decisions: dict | None, made_by: dict) -> dict:
    """results.json's content from the run's parts (no I/O): `state` the TrainState after training, `test` the
    test split's EvalResult (rank 0), `decisions` the emotion decisions chosen on valid, `made_by` provenance()."""
    m = cfg.model
    best = next(h for h in state.history if h["epoch"] == state.best_epoch)
    train = data.splits["train"]
    has = test.predictions["has_emotion"].astype(bool)
    return {
        "config": cfg.to_dict(), "synthetic": data.synthetic, "dataset": cfg.data.dataset,
        "world_size": world_size, "ep_size": ep_size, "num_experts": m.num_experts, "top_k": m.top_k,
        "best_epoch": state.best_epoch, "best_checkpoint": state.best_tag, "global_step": state.global_step,
        "epochs_trained": state.epoch, "stopped_early": stops_early(state, cfg.train),
        "params": params,
        "data": {name: {k: meta[k] for k in ("source", "converted_from", "sha256", "converted_from_sha256", "modalities",
                                                  "shapes", "splits")
                        if k in meta}
                 | {"emotion_labels": (meta.get("emotion_labels") or {}).get("summary")}
                 for name, meta in data.sources.items()},
        "train": {"seconds": state.train_seconds, "samples": state.train_samples,
                  "samples_per_s": state.train_samples / max(state.train_seconds, 1e-9), "epochs": state.epoch,
                  "skipped_nonfinite": state.skipped_nonfinite, "epoch_seconds": state.epoch_seconds,
                  "epoch_overhead": epoch_overhead(state.epoch_seconds)},
        "valid": best["valid"], "test": test.metrics,
        "routing": {"valid": best.get("routing"), "test": test.routing,
                    "dead_experts": best.get("dead_experts"),
                    "summary": headline(best["routing"], best.get("dead_experts"), best.get("train_load_max_over_mean"))
                    if best.get("routing") else None},
        "baselines": baselines(train.column("sentiment"), labelled_emotions(train),
                               test.predictions["sentiment_true"], test.predictions["emotion_true"][has]),
        "emotion_decisions": decisions,
        "history": state.history, "seed": cfg.train.seed, **made_by,
    }


# where a run is written, how often it logs or saves, how it handles faults: flags that name or run a run but do not
# change what it learns, left out of the HParams table so that its columns are the ones a sweep varies
NOT_HYPER_PARAMETERS = {"output_dir", "run_name", "resume", "reshard_only", "cache_dir", "log_every", "save_every",
                        "keep_checkpoints", "dist_timeout", "memory_check"}


def hparams_record(cfg: RunConfig, results: dict) -> tuple[dict, dict[str, float]]:
    """For TensorBoard's HParams tab: the flags that differ from their defaults (but NOT_HYPER_PARAMETERS) plus
    experts, top-k, balance, world size, expert parallelism and the DeepSpeed config's file name; and the final metrics (valid loss at the selected epoch, test)."""
    from dataclasses import fields
    hparams = {}
    for section in (cfg.data, cfg.model, cfg.train):
        default = type(section)()
        for f in fields(section):
            if f.name in NOT_HYPER_PARAMETERS:
                continue
            value = getattr(section, f.name)
            if value != getattr(default, f.name):
                hparams[f.name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    hparams["ds_config"] = os.path.basename(cfg.train.ds_config or "")   # precision, clipping, ZeRO stage: by name
    hparams.update(num_experts=cfg.model.num_experts, top_k=cfg.model.top_k, balance=cfg.model.balance,
                   world_size=results["world_size"], ep_size=results["ep_size"])
    best = results["history"][results["best_epoch"] - 1] if results.get("best_epoch") else {}
    test = results["test"]
    metrics = {f"{FINAL}/valid_loss": best.get("valid_loss"),
               **{f"{FINAL}/test_{k}": test.get("sentiment", {}).get(k) for k in ("mae", "corr", "has0_acc2")},
               f"{FINAL}/test_emotion_micro_f1": test.get("emotion", {}).get("micro_f1")}
    return hparams, {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def epoch_overhead(epoch_seconds: list) -> float | None:
    """Validation and checkpoint seconds as a fraction of the epochs' wall time, over the epochs with all three
    recorded (TrainState.epoch_seconds: each epoch's training loop, mid-epoch checkpoints included, since the
    epoch's start or a resume; its validation; its save)."""
    timed = [s for s in epoch_seconds if "checkpoint" in s]
    total = sum(s["train"] + s["validate"] + s["checkpoint"] for s in timed)
    return sum(s["validate"] + s["checkpoint"] for s in timed) / total if total else None


def stops_early(state, t) -> bool:
    """--patience epochs without a lower validation loss, before the last epoch."""
    return bool(t.patience) and state.epoch < t.epochs and state.epoch - state.best_epoch >= t.patience


def epoch_line(state, valid, t) -> str:
    """The log line of a validated epoch (`t`: the TrainConfig); says when --patience ends training early."""
    v, emotion = valid.metrics["sentiment"], valid.metrics.get("emotion")
    line = (f"epoch {state.epoch}: valid loss {valid.loss:.4f} | MAE {v['mae']:.4f} | Non0 Acc-2 {v['non0_acc2']:.4f}"
            + (f" | emotion micro-F1 {emotion['micro_f1']:.4f}" if emotion else "")
            + (" (best)" if state.best_epoch == state.epoch else ""))
    seconds = state.epoch_seconds[-1] if state.epoch_seconds else {}
    if seconds.get("epoch") == state.epoch and "checkpoint" in seconds:
        line += (f" | {seconds['train']:.1f} s training, {seconds['validate']:.2f} s validation, "
                 f"{seconds['checkpoint']:.2f} s checkpoint")
    if stops_early(state, t):
        line += (f"\nearly stop: no lower validation loss in the {t.patience} epoch(s) since epoch {state.best_epoch} "
                 f"(--patience {t.patience})")
    return line


def write_results(run_dir: str, results: dict, test_predictions: dict, thresholds: dict | None) -> None:
    """predictions_test.csv and results.json, then the test table on stdout."""
    write_predictions(os.path.join(run_dir, "predictions_test.csv"), test_predictions, thresholds)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(format_table(results), flush=True)
    print(f"\nwrote {run_dir}/results.json, predictions_test.csv, tensorboard/, checkpoints/", flush=True)


def write_predictions(path: str, preds: dict, thresholds: dict | None = None) -> None:
    """One row per sample, sorted by id; with `thresholds` (emotion -> threshold chosen on valid) also each
    emotion's decision `<emotion>_pred` (0/1)."""
    order = np.argsort(np.asarray(preds["ids"]), kind="stable")
    cut = np.array([thresholds[e] for e in EMOTIONS]) if thresholds else None
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "sentiment_true", "sentiment_pred", "has_emotion",
                    *[f"{e}_true" for e in EMOTIONS], *[f"{e}_prob" for e in EMOTIONS],
                    *([f"{e}_pred" for e in EMOTIONS] if cut is not None else [])])
        for i in order:
            prob = preds["emotion_prob"][i]
            w.writerow([preds["ids"][i], f"{preds['sentiment_true'][i]:.6g}", f"{preds['sentiment_pred'][i]:.6g}",
                        int(preds["has_emotion"][i]), *[f"{v:.6g}" for v in preds["emotion_true"][i]],
                        *[f"{v:.6g}" for v in prob], *([int(v) for v in prob > cut] if cut is not None else [])])


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
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
        lines += _emotion_table(test, base, results.get("emotion_decisions"))
    for name, part in test.get("per_dataset", {}).items():
        s = part["sentiment"]
        lines += ["", f"{name} ({part['samples']} test samples): MAE {s['mae']:.4f} | Corr {s['corr']:.4f} | "
                      f"Non0 Acc-2 {s['non0_acc2']:.4f} | Acc-7 {s['acc7']:.4f}"
                  + (f" | emotion micro-F1 {part['emotion']['micro_f1']:.4f}" if "emotion" in part else "")]
    if results["synthetic"]:
        lines += ["", SYNTHETIC_NOTICE]
    return "\n".join(lines)


def _emotion_table(test: dict, base: dict, decisions: dict | None) -> list[str]:
    def row(name, e):
        return f"| {name} | {e['micro_f1']:.4f} | {e['jaccard_acc']:.4f} | {e['mean_wacc']:.4f} | {e['mean_wf1']:.4f} |"
    lines = ["", "| emotions | micro-F1 | Jaccard acc | mean WA | mean wF1 |", "|---|---|---|---|---|",
             row("MMoLRE", test["emotion"])]
    if decisions:   # the decision rules chosen on valid, and the strongest trivial predictor
        lines += [row("MMoLRE, one threshold (valid)", decisions["test_single_threshold"]),
                  row("MMoLRE, per-emotion thresholds (valid)", decisions["test_per_emotion_thresholds"]),
                  row("best constant (valid)", decisions["baselines"]["best_constant"])]
    elif "majority_emotion_micro_f1" in base:
        lines.append(f"| majority | {base['majority_emotion_micro_f1']:.4f} | "
                     f"{base['majority_emotion_jaccard_acc']:.4f} | | |")
    return lines
