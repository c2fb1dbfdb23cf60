"""Routing specialisation statistics on constructed routings whose answers are known."""
import math

import numpy as np
import pytest

from mmolre.routing_stats import (CHANCE_DRAWS, dead_experts, expert_distribution, headline, js_divergence,
                                  max_combine_weight, mutual_information, specialisation_statistics,
                                  stability)

N = 4


def test_identical_tasks_have_zero_divergence_and_disjoint_ones_ln2():
    routes = np.array([[0, 1], [2, 3], [0, 2]])
    p = expert_distribution(routes, N)
    assert js_divergence(p, p) == 0.0
    a = expert_distribution(np.array([[0, 1]] * 5), N)
    b = expert_distribution(np.array([[2, 3]] * 5), N)
    assert js_divergence(a, b) == pytest.approx(math.log(2))


def test_a_router_that_sends_each_sentiment_sign_to_its_own_expert_has_mi_ln2():
    labels = np.array([0, 1] * 50)
    one_expert_per_sign = np.where(labels == 0, 0, 3)[:, None]
    assert mutual_information(one_expert_per_sign, labels, N) == pytest.approx(math.log(2))
    # top-2, each sign to its own pair of experts: still ln 2
    pairs = np.where(labels[:, None] == 0, [[0, 1]], [[2, 3]])
    assert mutual_information(pairs, labels, N) == pytest.approx(math.log(2))
    # a routing that ignores the label carries no information about it
    ignores = np.array([[0, 1] if i % 4 < 2 else [2, 3] for i in range(100)])
    assert mutual_information(ignores, labels, N) == pytest.approx(0.0, abs=1e-12)


def test_dropped_routes_do_not_count_and_stability_compares_sets():
    labels = np.array([0, 1, 0, 1])
    routes = np.array([[0, -1], [3, -1], [0, -1], [3, -1]])
    assert mutual_information(routes, labels, N) == pytest.approx(math.log(2))
    assert stability(np.array([[0, 1], [2, 3]]), np.array([[1, 0], [2, 1]])) == 0.5


def test_summary_per_layer_and_task_on_a_constructed_routing():
    n = 8
    sentiment = np.array([-1.0, 1.0] * (n // 2))
    emotions = np.zeros((n, 6))
    emotions[:, 0] = (np.arange(n) % 2) * 1.0     # happy present on odd rows
    has = np.ones(n)
    routes = np.zeros((n, 1, 2, 1), np.int64)
    routes[:, 0, 0, 0] = np.where(sentiment < 0, 0, 1)   # sentiment: by sign to experts 0 / 1
    routes[:, 0, 1, 0] = 2 + (np.arange(n) % 2)          # emotion: by happy presence to experts 2 / 3
    combine = np.ones_like(routes, dtype=np.float64)
    s = specialisation_statistics(routes, combine, ["text.0"], N, sentiment, emotions, has, previous=routes)
    layer = s["text.0"]
    assert layer["task_divergence"] == pytest.approx(math.log(2))    # the tasks use disjoint experts
    assert layer["sentiment"]["label_mi"] == pytest.approx(math.log(2))
    # happy carries ln 2, the five absent emotions nothing: the mean over the six
    assert layer["emotion"]["label_mi"] == pytest.approx(math.log(2) / 6)
    assert layer["sentiment"]["stability"] == 1.0 and layer["sentiment"]["max_combine_weight"] == 1.0
    assert layer["sentiment"]["experts_used"] == 2 and layer["sentiment"]["load_max_over_mean"] == 2.0
    h = headline(s, {"text.0": 2})
    assert h["dead_experts"] == 2 and h["sentiment_label_mi"] == pytest.approx(math.log(2))


def test_dead_experts_are_those_no_task_used_over_the_window():
    load = np.zeros((2, 2, N))
    load[0, 0, 0] = 3
    load[0, 1, 1] = 1      # layer 0: experts 2, 3 dead
    load[1, :, :] = 1      # layer 1: none
    assert dead_experts(load).tolist() == [2, 0]


def label_blind(seed: int, n: int = 400, experts: int = 64):
    """Routes drawn without regard to the labels (one layer, two tasks, top-1) and their statistics."""
    rng = np.random.default_rng(seed)
    sentiment = rng.choice([-1.0, 1.0], n)
    blind = rng.integers(0, experts, (n, 1, 2, 1))
    stats = specialisation_statistics(blind, np.ones(blind.shape), ["text.0"], experts, sentiment,
                                      np.zeros((n, 6)), np.zeros(n))["text.0"]
    return rng, n, experts, sentiment, blind, stats


def test_chance_levels_separate_specialisation_from_many_experts_and_few_rows():
    """With 64 experts and 400 rows a label-blind routing still shows a plug-in MI of about 0.1 nats; its
    shuffled chance level is as large, so the excess is about 0, while a sign-specialised routing keeps an
    excess near ln 2."""
    rng, n, experts, sentiment, blind, s = label_blind(seed=1)
    assert s["sentiment"]["label_mi"] > 0.08 and abs(s["sentiment"]["label_mi_excess"]) < 0.05
    assert s["task_divergence"] > 0.02 and abs(s["task_divergence_excess"]) < 0.02
    assert s["emotion"]["label_mi"] is None            # no emotion labels: undefined, not 0
    by_sign = blind.copy()
    by_sign[:, 0, 0, 0] = np.where(sentiment < 0, rng.integers(0, 32, n), rng.integers(32, 64, n))
    t = specialisation_statistics(by_sign, np.ones(blind.shape), ["text.0"], experts, sentiment, np.zeros((n, 6)),
                        np.zeros(n))["text.0"]["sentiment"]
    assert t["label_mi"] == pytest.approx(math.log(2), abs=1e-3) and t["label_mi_excess"] > 0.6


def test_a_chance_level_is_the_mean_of_many_shuffles_with_its_spread():
    """One shuffle's chance level is itself noisy; the mean of CHANCE_DRAWS shuffles comes with their standard
    deviation, close to that of many more shuffles; for label-blind routing the excess is within the spread (issue 23)."""
    _, n, experts, sentiment, blind, s = label_blind(seed=2)
    mi = s["sentiment"]
    assert 0.005 < mi["label_mi_chance_std"] < 0.05 and 0.0 < s["task_divergence_chance_std"] < 0.05
    sign = (sentiment >= 0).astype(np.int64)
    many = [mutual_information(blind[:, 0, 0], np.random.default_rng(k).permutation(sign), experts)
            for k in range(300)]   # the chance level, closely: 300 shuffles of another generator
    assert abs(mi["label_mi_chance"] - np.mean(many)) < 3 * np.std(many) / CHANCE_DRAWS ** 0.5
    assert mi["label_mi_chance_std"] == pytest.approx(np.std(many), rel=0.5)
    assert abs(mi["label_mi_excess"]) < 3 * mi["label_mi_chance_std"]   # blind routing: within the noise
    h = headline({"text.0": s})
    assert h["sentiment_label_mi_chance_std"] == mi["label_mi_chance_std"]


def test_step_routes_are_compared_step_by_step_and_unrouted_steps_do_not_count():
    """--route_per step: an utterance's routes are its steps' (k each, -1 where a step is padding)."""
    now = np.array([[0, 1, 2, 3, -1, -1]])       # 3 steps, top-2, the last one padding
    before = np.array([[1, 0, 2, 4, -1, -1]])
    assert stability(now, before, 2) == 0.5      # step 1 kept its set, step 2 did not
    assert stability(now, before) == 0.0         # read as one row, the utterance's set changed
    assert max_combine_weight(now, np.array([[0.6, 0.4, 0.9, 0.1, 0.0, 0.0]]), 2) == pytest.approx(0.75)
