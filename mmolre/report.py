"""What a run writes and prints: predictions CSV, the results table, provenance."""
from __future__ import annotations

import csv
import json
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
    for name, part in test.get("per_dataset", {}).items():
        s = part["sentiment"]
        lines += ["", f"{name} ({part['samples']} test samples): MAE {s['mae']:.4f} | Corr {s['corr']:.4f} | "
                      f"Non0 Acc-2 {s['non0_acc2']:.4f} | Acc-7 {s['acc7']:.4f}"
                  + (f" | emotion micro-F1 {part['emotion']['micro_f1']:.4f}" if "emotion" in part else "")]
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


# ---- many runs: `mmolre report` --------------------------------------------------------------------

REPORT_METRICS = (("test", "sentiment", "mae"), ("test", "sentiment", "non0_acc2"), ("test", "sentiment", "has0_acc2"),
                  ("test", "sentiment", "acc7"), ("test", "sentiment", "corr"), ("test", "emotion", "micro_f1"),
                  ("test", "emotion", "mean_wacc"))
# config fields that tell runs apart besides the seed (and bookkeeping that never does)
_IGNORED = {"seed", "run_name", "output_dir", "resume", "cache_dir", "log_every", "save_every", "keep_checkpoints",
            "dist_timeout", "ds_config", "data_path"}


def metric(results: dict, path: tuple[str, ...]):
    node = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def load_runs(run_dirs: list[str]) -> list[dict]:
    runs = []
    for d in run_dirs:
        path = os.path.join(d, "results.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist (unfinished run?)")
        with open(path) as f:
            runs.append({"dir": d, **json.load(f)})
    return runs


def group_runs(runs: list[dict]) -> tuple[list[str], dict[tuple, list[dict]]]:
    """Group by every config field that differs between runs (except seeds and bookkeeping)."""
    flat = [{f"{s}.{k}": v for s, sec in r["config"].items() for k, v in sec.items() if k not in _IGNORED}
            for r in runs]
    keys = sorted(k for k in set().union(*flat) if len({json.dumps(f.get(k)) for f in flat}) > 1)
    keys = keys or ["model.num_experts"]
    groups: dict[tuple, list[dict]] = {}
    for r, f in zip(runs, flat):
        groups.setdefault(tuple(f.get(k) for k in keys), []).append(r)
    def order(key):  # numbers numerically, anything else by its text
        return [(0, x, "") if isinstance(x, (int, float)) and not isinstance(x, bool) else (1, 0, str(x)) for x in key]
    return keys, dict(sorted(groups.items(), key=lambda kv: order(kv[0])))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single run)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def markdown_report(runs: list[dict], metrics=REPORT_METRICS) -> str:
    keys, groups = group_runs(runs)
    head = [k.split(".", 1)[1] for k in keys] + ["runs", "params", "active/utt."] + [".".join(m[1:]) for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, members in groups.items():
        cells = [str(v) for v in key] + [str(len(members)), f"{members[0]['params']['total']:,}",
                                         f"{members[0]['params']['active_per_utterance']:,}"]
        for m in metrics:
            values = [v for v in (metric(r, m) for r in members) if v is not None]
            if not values:
                cells.append("—")
                continue
            mu, sd = mean_std(values)
            cells.append(f"{mu:.4f} ± {sd:.4f}" + (f" [{min(values):.4f}, {max(values):.4f}]" if len(values) > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    synthetic = any(r.get("synthetic") for r in runs)
    note = f"\n{len(runs)} runs; mean ± sample std over seeds, [min, max] where several."
    return "\n".join(lines) + note + ("\n" + SYNTHETIC_NOTICE if synthetic else "")


def plot_sweep(runs: list[dict], prefix: str, path=("test", "sentiment", "mae")) -> list[str]:
    """metric vs expert count (one line per top-k), and an experts x top-k heatmap (the paper's Figure 2)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells: dict[tuple[int, int], list[float]] = {}
    for r in runs:
        v = metric(r, path)
        if v is not None:
            cells.setdefault((r["num_experts"], r["top_k"]), []).append(v)
    experts = sorted({e for e, _ in cells})
    top_ks = sorted({k for _, k in cells})
    name = ".".join(path)
    written = []
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k in top_ks:
        pts = [(e, *mean_std(cells[(e, k)])) for e in experts if (e, k) in cells]
        xs, mus, sds = zip(*pts)
        ax.errorbar(xs, mus, yerr=sds, marker="o", capsize=3, label=f"top-{k}")
    ax.set(xscale="log", xlabel="shared experts", ylabel=name, title=f"{name} vs expert count")
    ax.set_xticks(experts, [str(e) for e in experts])
    ax.legend()
    fig.tight_layout()
    written.append(f"{prefix}_vs_experts.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    grid = np.full((len(top_ks), len(experts)), np.nan)
    for (e, k), vals in cells.items():
        grid[top_ks.index(k), experts.index(e)] = np.mean(vals)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(experts), 1.2 + 0.6 * len(top_ks)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i in range(len(top_ks)):
        for j in range(len(experts)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(len(experts)), [str(e) for e in experts])
    ax.set_yticks(range(len(top_ks)), [str(k) for k in top_ks])
    ax.set(xlabel="shared experts", ylabel="top-k", title=name)
    fig.colorbar(im)
    fig.tight_layout()
    written.append(f"{prefix}_heatmap.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written
