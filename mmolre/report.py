"""Many runs at once (`mmolre report`): group them by what differs, mean ± std over seeds, figures."""
from __future__ import annotations

import json
import os

import numpy as np

from .config import recorded_section
from .results import SYNTHETIC_NOTICE


REPORT_METRICS = (("test", "sentiment", "mae"), ("test", "sentiment", "non0_acc2"), ("test", "sentiment", "has0_acc2"),
                  ("test", "sentiment", "acc7"), ("test", "sentiment", "corr"), ("test", "emotion", "micro_f1"),
                  ("test", "emotion", "mean_wacc"))
# the routing study (`mmolre report --study`): the selection loss on valid (what a default may be chosen by),
# test accuracy, balance, specialisation (validation split of the selected epoch), speed
STUDY_METRICS = (("valid", "loss"), ("test", "sentiment", "mae"), ("test", "emotion", "micro_f1"), ("test", "emotion", "mean_wacc"),
                 ("routing", "summary", "load_max_over_mean"), ("routing", "summary", "train_load_max_over_mean"),
                 ("routing", "summary", "dead_experts"),
                 ("routing", "summary", "task_divergence"), ("routing", "summary", "task_divergence_excess"),
                 ("routing", "summary", "sentiment_label_mi"), ("routing", "summary", "sentiment_label_mi_excess"),
                 ("routing", "summary", "emotion_label_mi_excess"), ("routing", "summary", "max_combine_weight"),
                 ("routing", "summary", "stability"), ("train", "samples_per_s"))
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


def differing_keys(runs: list[dict]) -> list[str]:
    """Config fields ("section.field") whose values differ between runs, except seeds and bookkeeping."""
    flat = [_flat_config(r) for r in runs]
    return sorted(k for k in set().union(*flat) if len({json.dumps(f.get(k)) for f in flat}) > 1)


def _flat_config(run: dict) -> dict:
    """A run's recorded config, flat, with the flags added since it ran filled in as it behaved (and without the
    evaluation batch where no evaluation capacity makes predictions depend on it)."""
    flat = {f"{s}.{k}": v for s, sec in run["config"].items() if isinstance(sec, dict)
            for k, v in recorded_section(s, sec).items() if k not in _IGNORED}
    if not flat.get("model.eval_capacity_factor"):
        flat.pop("train.eval_batch_size", None)
    return flat


def _order(key):  # numbers numerically, anything else by its text
    return [(0, x, "") if isinstance(x, (int, float)) and not isinstance(x, bool) else (1, 0, str(x)) for x in key]


def group_runs(runs: list[dict], keys: list[str] | None = None) -> tuple[list[str], dict[tuple, list[dict]]]:
    """Group by `keys` (default: every config field that differs between runs, except seeds and bookkeeping)."""
    keys = differing_keys(runs) if keys is None else keys
    keys = keys or ["model.num_experts"]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        f = _flat_config(r)
        groups.setdefault(tuple(f.get(k) for k in keys), []).append(r)
    return keys, dict(sorted(groups.items(), key=lambda kv: _order(kv[0])))


def variants(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by what differs besides the expert count and top-k (the figures' axes): one entry per
    variant, named by its differing settings ("all runs" when nothing else differs)."""
    keys = [k for k in differing_keys(runs) if k not in ("model.num_experts", "model.top_k")]
    if not keys:
        return {"all runs": runs}
    _, groups = group_runs(runs, keys)
    return {", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in zip(keys, key)): members
            for key, members in groups.items()}


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
            cells.append(f"{mu:.4f} ± {sd:.4f} [{min(values):.4f}, {max(values):.4f}]" if len(values) > 1
                         else f"{mu:.4f} ± n/a")
        lines.append("| " + " | ".join(cells) + " |")
    synthetic = any(r.get("synthetic") for r in runs)
    note = f"\n{len(runs)} runs; mean ± sample std over seeds and [min, max]; n/a: a single run."
    return "\n".join(lines) + note + ("\n" + SYNTHETIC_NOTICE if synthetic else "")


def plot_sweep(runs: list[dict], prefix: str, path=("test", "sentiment", "mae")) -> list[str]:
    """metric vs expert count (one line per variant and top-k; error bars only where several seeds) and an
    experts x top-k heatmap per variant (the paper's Figure 2). Variants are the runs' other differing
    settings (`variants`), so different models are never pooled into one point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    name = ".".join(path)
    groups = variants(runs)
    cells = {}   # variant -> {(experts, top-k): values}
    for label, members in groups.items():
        for r in members:
            v = metric(r, path)
            if v is not None:
                cells.setdefault(label, {}).setdefault((r["num_experts"], r["top_k"]), []).append(v)
    experts = sorted({e for c in cells.values() for e, _ in c})
    written = []
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, c in cells.items():
        for k in sorted({k for _, k in c}):
            pts = [(e, *mean_std(c[(e, k)]), len(c[(e, k)])) for e in experts if (e, k) in c]
            xs, mus, sds, ns = zip(*pts)
            yerr = [sd if n > 1 else np.nan for sd, n in zip(sds, ns)]   # one run: no spread to draw
            name_k = f"top-{k}" if label == "all runs" else f"{label}, top-{k}"
            ax.errorbar(xs, mus, yerr=yerr, marker="o", capsize=3, label=name_k)
    ax.set(xscale="log", xlabel="shared experts", ylabel=name, title=f"{name} vs expert count")
    ax.set_xticks(experts, [str(e) for e in experts])
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(f"{prefix}_vs_experts.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    top_ks = sorted({k for c in cells.values() for _, k in c})
    fig, axes = plt.subplots(1, len(cells), squeeze=False,
                             figsize=(len(cells) * (1.2 + 0.8 * len(experts)), 1.4 + 0.6 * len(top_ks)))
    values = [v for c in cells.values() for vals in c.values() for v in vals]
    for ax, (label, c) in zip(axes[0], cells.items()):
        grid = np.full((len(top_ks), len(experts)), np.nan)
        for (e, k), vals in c.items():
            grid[top_ks.index(k), experts.index(e)] = np.mean(vals)
        im = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=min(values), vmax=max(values))
        for i in range(len(top_ks)):
            for j in range(len(experts)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_xticks(range(len(experts)), [str(e) for e in experts])
        ax.set_yticks(range(len(top_ks)), [str(k) for k in top_ks])
        ax.set(xlabel="shared experts", ylabel="top-k", title=name if label == "all runs" else f"{name}\n{label}")
    fig.colorbar(im, ax=axes[0].tolist())
    written.append(f"{prefix}_heatmap.png")
    fig.savefig(written[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return written
