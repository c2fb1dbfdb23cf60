"""Real audio and video for the first time: MMoLRE on the bc-LSTM unimodal MOSI features (poria's split).

1. `mmolre bclstm` turns shared/data/real/mosi/mosi_bclstm_unimodal_50d.npz into a trimodal MMSA-schema file:
   50-d learned utterance features of text, audio and video, one step per modality, on poria's split only
   (the features were learned on it; the standard split would leak test labels), a validation split carved
   by video from poria's train, the label table's real-valued sentiment.
2. Trains, once per seed (2 processes, expert parallelism 2, default hyper-parameters, the checkpoint chosen
   on valid): MMoLRE on text only, on audio+video, on all three, and `--model hard_sharing` on all three.
3. Fits ridge regression (sentiment) and logistic regression (the sign, Acc-2) on the same features,
   concatenated, with the regularisation chosen on valid.
4. Reports the test split beside the published anchor on this split, bc-LSTM (which also uses the video's
   context): 80.3% binary accuracy; and, for the trimodal MMoLRE runs, the routing specialisation per
   modality (the MoE layers are per modality) on the test split.

    python bench/bclstm_trimodal.py --seeds 1,2,3 --out bench/results/bclstm_trimodal
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.commands import command_line, passthrough_parser, refuse_owned_flags  # noqa: E402
from bench.real_labels import ALPHAS, REAL, ridge_fit, summarise, train_mmolre  # noqa: E402
from mmolre.metrics import sentiment_metrics  # noqa: E402
from mmolre.report import load_runs, metric  # noqa: E402

SETTINGS = {  # name -> launch flags
    "MMoLRE, text": ["--modalities", "text"],
    "MMoLRE, audio+video": ["--modalities", "audio,vision"],
    "MMoLRE, text+audio+video": ["--modalities", "text,audio,vision"],
    "hard sharing, text+audio+video": ["--modalities", "text,audio,vision", "--model", "hard_sharing"],
}
BCLSTM_ACC2 = 0.803   # Poria et al. 2017, bc-LSTM on this split (binary accuracy)
COLUMNS = ("mae", "corr", "has0_acc2", "non0_acc2", "has0_f1")
MODALITY_KEYS = ("text", "audio", "vision")
C_GRID = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0)   # logistic regression's inverse regularisation


def convert(work: str, real_dir: str) -> str:
    out = os.path.join(work, "mosi_bclstm.pkl")
    if not os.path.isfile(out):
        mosi = os.path.join(real_dir, "mosi")
        subprocess.run([sys.executable, "-m", "mmolre.cli", "bclstm", os.path.join(mosi, "mosi_bclstm_unimodal_50d.npz"),
                        os.path.join(mosi, "mosi_labels.csv"), out], cwd=ROOT, check=True)
    return out


def features(split: dict, modalities=MODALITY_KEYS) -> np.ndarray:
    return np.concatenate([split[m][:, 0, :] for m in modalities], 1).astype(np.float64)


def logistic_fit(x: np.ndarray, y: np.ndarray, c: float, steps: int = 300):
    """L2-regularised logistic regression by Newton's method (standardised inputs, intercept unpenalised)."""
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = np.zeros(z.shape[1])
    reg = np.eye(z.shape[1]) / c
    reg[-1, -1] = 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(z @ w, -30, 30)))
        grad = z.T @ (p - y) + reg @ w
        hess = (z * (p * (1 - p))[:, None]).T @ z + reg
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return lambda q: 1 / (1 + np.exp(-np.clip(np.c_[(q - mu) / sd, np.ones(len(q))] @ w, -30, 30)))


def baselines(path: str) -> dict:
    """Ridge (sentiment) and logistic regression (sign, y >= 0) on the concatenated features, each
    regularisation chosen on valid; test metrics by mmolre.metrics (logistic: Acc-2 and F1 only)."""
    with open(path, "rb") as f:
        data = pickle.load(f)
    out = {}
    for name, mods in (("text", ("text",)), ("audio+video", ("audio", "vision")), ("text+audio+video", MODALITY_KEYS)):
        x = {s: features(data[s], mods) for s in ("train", "valid", "test")}
        y = {s: data[s]["regression_labels"].astype(np.float64) for s in x}
        alpha = min(ALPHAS, key=lambda a: np.abs(ridge_fit(x["train"], y["train"], a)(x["valid"]) - y["valid"]).mean())
        ridge = sentiment_metrics(np.clip(ridge_fit(x["train"], y["train"], alpha)(x["test"]), -3, 3), y["test"])
        sign = {s: (y[s] >= 0).astype(np.float64) for s in y}
        c = max(C_GRID, key=lambda c: ((logistic_fit(x["train"], sign["train"], c)(x["valid"]) > 0.5)
                                       == (sign["valid"] > 0)).mean())
        # as a sentiment score for mmolre.metrics' Acc-2/F1: +1 for "non-negative", -1 for "negative"
        score = np.where(logistic_fit(x["train"], sign["train"], c)(x["test"]) > 0.5, 1.0, -1.0)
        logistic = sentiment_metrics(score, y["test"])
        out[name] = {"ridge_alpha": alpha, "ridge": ridge, "logistic_c": c,
                     "logistic": {k: logistic[k] for k in ("has0_acc2", "has0_f1")}}
    return out


def modality_routing(run: dict) -> dict[str, dict]:
    """The test split's routing statistics per modality: each MoE layer is one modality's block."""
    summary = run["routing"]["test"] or {}
    out = {}
    for m in MODALITY_KEYS:
        layers = [v for k, v in summary.items() if k.split(".")[0] == m]
        if not layers:
            continue
        tasks = [t for layer in layers for t in (layer.get("sentiment"), layer.get("emotion")) if t]
        out[m] = {"sentiment_label_mi_excess": float(np.mean([layer["sentiment"]["label_mi_excess"]
                                                              for layer in layers])),
                  "label_mi_chance_std": float(np.mean([layer["sentiment"]["label_mi_chance_std"]
                                                        for layer in layers])),
                  "task_divergence_excess": float(np.mean([layer["task_divergence_excess"] for layer in layers])),
                  "load_max_over_mean": float(np.mean([t["load_max_over_mean"] for t in tasks]))}
    return out


def main(argv=None) -> dict:
    p = passthrough_parser(__doc__)
    p.add_argument("--real_dir", default=REAL, help="shared/data/real")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "bclstm_trimodal"))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "bclstm_trimodal"))
    args, extra = p.parse_known_args(argv)
    refuse_owned_flags(p, extra, {"--seed", "--modalities", "--model", "--dataset", "--data_path"},
                       "set per run by this script")
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.work, exist_ok=True)
    path = convert(args.work, args.real_dir)
    report = {"command": command_line(__file__, argv), "launch_extra": extra, "seeds": seeds,
              "bclstm_published_acc2": BCLSTM_ACC2, "baselines": baselines(path), "settings": {}}
    lines = [f"`{report['command']}`", "",
             "Real MOSI, poria's split (test: its 31 videos, 752 utterances; valid: 12 of its 62 train videos); "
             "bc-LSTM's released 50-d unimodal utterance features; 2 processes, expert parallelism 2; test split, "
             f"mean ± std over seeds {args.seeds} (baselines: one fit).", "",
             "| model | " + " | ".join(COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
    routing_lines = ["", "Routing on the test split, trimodal MMoLRE (mean over seeds; per modality, its MoE layers): "
                     "excess over the chance level, and the chance level's spread over shuffles.", "",
                     "| modality | sentiment-sign MI excess (nats) | its chance std | task divergence excess | "
                     "load max / mean |", "|---|---|---|---|---|"]
    for name, flags in SETTINGS.items():
        tag = name.split(",")[0].replace(" ", "_") + "_" + flags[1].replace(",", "+")
        dirs = [train_mmolre("mosi", path, os.path.join(args.work, "runs"), f"{tag}_s{s}",
                             [*flags, "--seed", str(s), *extra], args.processes) for s in seeds]
        runs = load_runs(dirs)
        cell = {c: [metric(r, ("test", "sentiment", c)) for r in runs] for c in COLUMNS}
        report["settings"][name] = {"test": cell, "run_dirs": [os.path.basename(d) for d in dirs]}
        lines.append(f"| {name} | " + " | ".join(summarise(cell[c]) for c in COLUMNS) + " |")
        print(lines[-1], flush=True)
        if name == "MMoLRE, text+audio+video":
            per_seed = [modality_routing(r) for r in runs]
            report["settings"][name]["routing_by_modality"] = per_seed
            for m in MODALITY_KEYS:
                values = {k: np.mean([s[m][k] for s in per_seed]) for k in per_seed[0][m]}
                routing_lines.append(f"| {m} | {values['sentiment_label_mi_excess']:.3f} | "
                                     f"{values['label_mi_chance_std']:.3f} | {values['task_divergence_excess']:.3f} | "
                                     f"{values['load_max_over_mean']:.2f} |")
    for name, b in report["baselines"].items():
        lines.append(f"| ridge, {name} (alpha {b['ridge_alpha']:g} on valid) | " + " | ".join(
            f"{b['ridge'][c]:.4f}" for c in COLUMNS) + " |")
        lines.append(f"| logistic regression on the sign, {name} (C {b['logistic_c']:g} on valid) | | | "
                     f"{b['logistic']['has0_acc2']:.4f} | | {b['logistic']['has0_f1']:.4f} |")
    lines.append(f"| bc-LSTM (published, with context; Poria et al. 2017) | | | {BCLSTM_ACC2:.3f} | | |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines + routing_lines) + "\n")
    return report


if __name__ == "__main__":
    main()
