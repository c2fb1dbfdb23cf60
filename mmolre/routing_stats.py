"""Does routing specialise? Statistics of the routes the gates chose on a split, per MoE layer and task.

Inputs are the arrays evaluation gathers (`evaluate.predict_batches`): for every utterance, per layer and
task, the k experts its row was assigned (`routes`, [n, layers, tasks, k]; a route a capacity limit dropped
still names the expert it was assigned) and their combine weights (`combine`, same shape; 0 if dropped). With
--route_per step an utterance has a row per step: its T*k routes in step order, -1 (weight 0) where a step
was not routed (padding), and each statistic below reads them as the utterance's routes.
Natural logarithms throughout (nats); None where a statistic is undefined (no rows, no labels).

* `task_divergence`: Jensen-Shannon divergence between the two tasks' expert-use distributions
  (0: both tasks use the experts alike; ln 2: disjoint experts).
* `label_mi`: mutual information between the expert a route goes to and the row's label: for sentiment the
  sign (negative vs non-negative, the Has0 convention), for emotions each emotion's presence (averaged over
  the six). Each of a row's k routes counts 1/k. ln 2 is the most a balanced binary label allows.
* Both are plug-in estimates, biased upwards when the experts are many for the rows (about (N-1)/(2n) nats
  for MI with a binary label): each comes with a `*_chance` value, the same statistic with the labels
  shuffled (MI) or the rows' tasks shuffled (divergence), the mean over CHANCE_DRAWS shuffles, with
  `*_chance_std` their standard deviation (so that an excess within it reads as permutation noise), and
  `*_excess`, the value minus the chance level: what routing shows beyond what N experts and n rows give by
  chance.
* `stability`: the fraction of rows (utterances, or routed steps) whose top-k set is the same as at the
  previous evaluation.
* `max_combine_weight`: the mean over routed rows (utterances, or steps) of the row's largest combine weight
  (top-k, k >= 2: 1/k = flat, 1 = one expert decides; top-1: the chosen expert's probability, 1/N = flat).
* `dead_experts`: experts that received no row of either task over a window of training steps.
"""
from __future__ import annotations

import numpy as np

from .config import TASKS

CHANCE_DRAWS = 20   # shuffles averaged for a chance level


def expert_distribution(routes: np.ndarray, num_experts: int) -> np.ndarray:
    """routes [n, k] -> the fraction of routes that went to each expert [N] (zeros when there are none)."""
    kept = routes[routes >= 0]
    counts = np.bincount(kept, minlength=num_experts).astype(np.float64)
    return counts / counts.sum() if counts.sum() else counts


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    m = 0.5 * (p + q)

    def kl(a):
        nz = a > 0
        return float((a[nz] * np.log(a[nz] / m[nz])).sum())
    return 0.5 * kl(p) + 0.5 * kl(q)


def mutual_information(routes: np.ndarray, labels: np.ndarray, num_experts: int) -> float:
    """I(expert; label) with each row's kept routes weighted 1/(its kept routes); labels [n] small ints."""
    kept = routes >= 0
    per_row = kept.sum(1)
    rows = per_row > 0
    if not rows.any():
        return None
    routes, kept, labels = routes[rows], kept[rows], labels[rows]
    weight = (kept / per_row[rows, None]).ravel()
    classes = np.unique(labels, return_inverse=True)[1]
    num_classes = classes.max() + 1   # one weighted count over (expert, class) cells: fast at n x T*k routes
    cells = routes.ravel().clip(0) * num_classes + np.repeat(classes, routes.shape[1])
    joint = np.bincount(cells, weights=weight, minlength=num_experts * num_classes).reshape(num_experts, num_classes)
    joint /= joint.sum()
    pe, py = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pe @ py)[nz])).sum())


def max_combine_weight(routes: np.ndarray, combine: np.ndarray, k: int) -> float | None:
    """The mean over routed rows of a row's largest combine weight; [n, k'] per utterance, k' = k (one row) or
    T*k (a row per step, -1 where a step was not routed)."""
    if not len(combine):
        return None
    weights = combine.reshape(len(combine), -1, k)
    routed = (routes.reshape(len(routes), -1, k) >= 0).any(-1)
    return float(weights.max(-1)[routed].mean()) if routed.any() else None


def stability(routes: np.ndarray, previous: np.ndarray, k: int | None = None) -> float:
    """Fraction of rows whose set of experts equals the previous one's ([n, k'] each, same utterance order; with
    k' = T*k, each step's k routes are a row, and the steps routed in neither evaluation do not count)."""
    k = k or routes.shape[1]
    now, before = routes.reshape(len(routes), -1, k), previous.reshape(len(previous), -1, k)
    routed = (now >= 0).any(-1) | (before >= 0).any(-1)
    same = (np.sort(now, -1) == np.sort(before, -1)).all(-1)
    return float(same[routed].mean()) if routed.any() else None


def _shuffled_mi(routes: np.ndarray, labels: list[np.ndarray], num_experts: int, rng) -> list[float]:
    """Chance level of the mean MI over `labels` (one label or the six emotions): one value per shuffle."""
    draws = []
    for _ in range(CHANCE_DRAWS):
        values = [v for y in labels if (v := mutual_information(routes, rng.permutation(y), num_experts)) is not None]
        if values:
            draws.append(float(np.mean(values)))
    return draws


def _shuffled_divergence(a: np.ndarray, b: np.ndarray, num_experts: int, rng) -> list[float]:
    """The divergence of two groups of a's and b's sizes drawn from their pooled rows, one value per shuffle."""
    draws = []
    for _ in range(CHANCE_DRAWS):
        pooled = rng.permutation(np.concatenate([a, b]))
        draws.append(js_divergence(expert_distribution(pooled[:len(a)], num_experts),
                                   expert_distribution(pooled[len(a):], num_experts)))
    return draws


def _with_chance(stats: dict, name: str, value, draws: list[float] | None) -> None:
    chance = float(np.mean(draws)) if draws else None
    stats[name], stats[f"{name}_chance"] = value, chance
    stats[f"{name}_chance_std"] = float(np.std(draws, ddof=1)) if draws and len(draws) > 1 else None
    stats[f"{name}_excess"] = None if value is None or chance is None else value - chance


def specialisation_statistics(routes: np.ndarray, combine: np.ndarray, layer_names: list[str], num_experts: int,
                    sentiment: np.ndarray, emotions: np.ndarray, has_emotion: np.ndarray,
                    previous: np.ndarray | None = None, routes_per_row: int | None = None) -> dict:
    """{layer: {"task_divergence": x, ..., task: {label_mi, max_combine_weight, stability, ...}}} from
    evaluation arrays (module docstring). `previous`: the routes of the same rows at the last evaluation.
    `routes_per_row`: k (default: all of an utterance's routes are one row's). Chance levels use a fixed seed,
    so the summary is a function of its inputs."""
    rng = np.random.default_rng(0)
    summary: dict = {}
    streams = TASKS if routes.shape[2] == len(TASKS) else ("shared",)
    for li, layer in enumerate(layer_names):
        entry: dict = {}
        use = [expert_distribution(routes[:, li, ti], num_experts) for ti in range(len(streams))]
        if len(streams) == len(TASKS):
            _with_chance(entry, "task_divergence", js_divergence(use[0], use[1]),
                         _shuffled_divergence(routes[:, li, 0], routes[:, li, 1], num_experts, rng))
        for ti, task in enumerate(streams):
            r, w = routes[:, li, ti], combine[:, li, ti]
            stats = {"max_combine_weight": max_combine_weight(r, w, routes_per_row or r.shape[-1]),
                     "experts_used": int((use[ti] > 0).sum()),
                     "load_max_over_mean": float(use[ti].max() * num_experts) if use[ti].sum() else None}
            if task in ("sentiment", "shared"):
                sign = (sentiment >= 0).astype(np.int64)
                _with_chance(stats, "label_mi", mutual_information(r, sign, num_experts),
                             _shuffled_mi(r, [sign], num_experts, rng))
            else:
                rows = has_emotion.astype(bool)
                present = [(emotions[rows, j] > 0).astype(np.int64) for j in range(emotions.shape[1])]
                mi = [mutual_information(r[rows], y, num_experts) for y in present] if rows.any() else []
                _with_chance(stats, "label_mi", float(np.mean(mi)) if mi else None,
                             _shuffled_mi(r[rows], present, num_experts, rng) if rows.any() else None)
            if previous is not None:
                stats["stability"] = stability(r, previous[:, li, ti], routes_per_row)
            entry[task] = stats
        summary[layer] = entry
    return summary


def headline(summary: dict, dead: dict | None = None, train_load: dict | None = None) -> dict:
    """One number per statistic for tables: the mean over layers (and tasks, where per task), the label
    MI per task (with its chance level and excess), the dead experts summed over layers and, of the epoch's
    training routes, the worst layer's load max/mean."""
    def mean(values):
        values = [v for v in values if v is not None]   # undefined entries (None) do not count
        return float(np.mean(values)) if values else None
    per_task = [v for layer in summary.values() for v in layer.values() if isinstance(v, dict)]
    out = {name: mean([layer.get(name) for layer in summary.values()])
           for name in ("task_divergence", "task_divergence_chance", "task_divergence_chance_std",
                        "task_divergence_excess")}
    out |= {"max_combine_weight": mean([t["max_combine_weight"] for t in per_task]),
            "load_max_over_mean": mean([t["load_max_over_mean"] for t in per_task]),
            "stability": mean([t.get("stability") for t in per_task])}
    for task in (*TASKS, "shared"):
        for name in ("label_mi", "label_mi_chance", "label_mi_chance_std", "label_mi_excess"):
            values = [layer[task].get(name) for layer in summary.values() if task in layer]
            if values:
                out[f"{task}_{name}"] = mean(values)
    if dead is not None:
        out["dead_experts"] = int(sum(dead.values()))
    if train_load:
        out["train_load_max_over_mean"] = float(max(train_load.values()))
    return out


def dead_experts(load: np.ndarray) -> np.ndarray:
    """load [layers, tasks, N] rows each expert received over a window -> dead experts per layer [layers]."""
    return (load.sum(1) == 0).sum(-1) if load.shape[-1] else np.zeros(load.shape[0], np.int64)
