"""A reference for expert balance: what content-blind uniform random routing of a run's routes would give.

Per epoch, each task routes R routes in each MoE layer (one per trained utterance, or one per valid step with
--route_per step, times top-k). Drawn uniformly at random over N experts, the busiest expert's count over the mean
(the worst of the layers and tasks, as the trainer's `train_load_max_over_mean`) and the experts that no task
reached (summed over the layers, as `dead_experts`) follow from R and N alone. A balancing rule can beat this (a
bias that tracks each expert's deficit approaches a round-robin), so it is a yardstick, not a bound: it says
how much of an imbalance the number of routes per expert explains by itself.
"""
from __future__ import annotations

import functools
import pickle

import numpy as np


@functools.lru_cache(maxsize=None)
def train_lengths(path: str) -> np.ndarray:
    with open(path, "rb") as f:   # the study's own featurized file (`mmolre featurize`), not a shared one
        return np.asarray(pickle.load(f)["train"]["text_lengths"])


def routes_per_epoch(path: str, results: dict) -> int:
    """One task's routes in one layer over an epoch of `results`' run: its trained utterances (whole batches:
    results.train.samples / epochs), each one route, or with --route_per step its valid text steps (the training
    split's mean valid steps times the trained utterances), times top-k."""
    lengths = train_lengths(path)
    trained = results["train"]["samples"] / results["train"]["epochs"]
    steps = results["data"]["mosei"]["shapes"]["text"][0]
    per_utterance = float(np.minimum(lengths, steps).mean()) if results["config"]["model"].get("route_per") == "step" \
        else 1.0
    return int(round(trained * per_utterance)) * results["top_k"]


def uniform_reference(routes: int, experts: int, layers: int = 2, tasks: int = 2, draws: int = 20) -> tuple[float, float]:
    """(busiest expert over the mean, worst of layers and tasks; experts no task reached, summed over layers), means
    over `draws` draws of `routes` uniform routes per task and layer (top-k's k distinct experts per row make
    little difference when k << experts)."""
    rng = np.random.default_rng(0)
    ratios, dead = [], []
    for _ in range(draws):
        loads = rng.multinomial(routes, np.full(experts, 1.0 / experts), size=(layers, tasks))   # [L, tasks, N]
        ratios.append(float((loads.max(-1) / (routes / experts)).max()))
        dead.append(int((loads.sum(1) == 0).sum()))
    return float(np.mean(ratios)), float(np.mean(dead))


def reference_for(path: str, results: dict) -> dict:
    """The uniform reference for one run's results.json."""
    layers = len(results["history"][0]["dead_experts"])
    load, dead = uniform_reference(routes_per_epoch(path, results), results["num_experts"], layers)
    return {"uniform_load": load, "uniform_dead": dead}
