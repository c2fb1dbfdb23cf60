"""What a run writes and prints: predictions CSV, the results table, provenance."""
from __future__ import annotations

import csv
import os
import platform
import subprocess

import numpy as np
import torch

from . import __version__
from .config import EMOTIONS

SYNTHETIC_NOTICE = "SYNTHETIC DATA: these numbers say nothing about accuracy on real MOSI/MOSEI."


def write_predictions(path: str, preds: dict) -> None:
    order = np.argsort(np.asarray(preds["ids"]), kind="stable")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "sentiment_true", "sentiment_pred", "has_emotion",
                    *[f"{e}_true" for e in EMOTIONS], *[f"{e}_prob" for e in EMOTIONS]])
        for i in order:
            w.writerow([preds["ids"][i], f"{preds['sentiment_true'][i]:.6g}", f"{preds['sentiment_pred'][i]:.6g}",
                        int(preds["has_emotion"][i]), *[f"{v:.6g}" for v in preds["emotion_true"][i]],
                        *[f"{v:.6g}" for v in preds["emotion_prob"][i]]])


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


def flatten(prefix: str, d: dict) -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(f"{prefix}/{k}", v))
        elif isinstance(v, (int, float)):
            out[f"{prefix}/{k}"] = v
    return out
