"""Balancing options of the task gate: aux_free selection biases, the router z-loss, the temperature and the
routers' learning-rate multiplier."""
import pytest
import torch
from torch.nn import functional as F

from mmolre.config import ConfigError, parse_args
from mmolre.engine import optimizer_groups
from mmolre.model.routing import RowRouting, TaskRoutedGate, combine_weights

D, T, N = 8, 5, 8


def _gate(k=2, **kw):
    torch.manual_seed(0)
    return TaskRoutedGate(D, T, N, num_tasks=2, k=k, **kw)


def _rows(s=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(s, T * D, generator=g)
    return rows, RowRouting(torch.arange(2).repeat_interleave(s // 2), torch.ones(s, T, dtype=torch.bool))


@pytest.mark.parametrize("capacity", [0.0, 0.5])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_combine_weights_are_deepspeeds_own(k, capacity):
    """aux_free recomputes the combine weights from the unbiased probabilities; with a zero bias they must be
    exactly what DeepSpeed's gating returned (also with routes dropped by a capacity limit)."""
    gate = _gate(k, capacity_factor=capacity)
    gate.train()
    rows, routing = _rows()
    torch.manual_seed(3)
    _, _, _, indices, _, gates, _ = gate(rows, routing)
    if capacity:
        assert (indices < 0).any()
    probs = F.softmax(gate.route_logits(rows, routing), dim=1)
    torch.testing.assert_close(combine_weights(probs, indices, k), gates)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_aux_free_biases_move_a_skewed_router_towards_balance_without_gradient(k):
    gate = _gate(k, balance="aux_free", bias_rate=0.05)
    with torch.no_grad():   # task 0's router prefers expert 0 by far, task 1's is left alone
        gate.routers[0].net[2].bias[0] += 3.0
    gate.train()
    rows, routing = _rows(256)
    sentiment = routing.task_ids == 0
    router_before = [p.detach().clone() for p in gate.parameters()]   # no optimizer runs: only the biases move

    def sentiment_load():
        _, _, _, indices, _, gates, counts = gate(rows, routing)
        return counts[0], indices, gates

    first, _, _ = sentiment_load()
    for _ in range(60):
        sentiment_load()
        gate.nudge_selection_bias(gate.pending_counts)
        gate.pending_counts = None
    last, indices, gates = sentiment_load()
    def imbalance(c):   # the fraction of routes that would have to move for a uniform load
        return ((c - c.mean()).abs().sum() / (2 * c.sum())).item()
    assert imbalance(first) > 0.2
    assert imbalance(last) < 0.5 * imbalance(first)
    assert gate.selection_bias[0, 0] < 0 < gate.selection_bias[0, 1:].max()   # the favourite was pushed down
    assert not gate.selection_bias.requires_grad and "selection_bias" in gate.state_dict()
    for before, p in zip(router_before, gate.parameters()):
        assert torch.equal(before, p)                                           # no router weight moved
    # the combine weights are the router's own (unbiased) probabilities of the chosen experts, normalised over
    # the k chosen as DeepSpeed does for k >= 2 (top-1: the probability itself), row by row
    probs = F.softmax(gate.route_logits(rows, routing), dim=1)
    for row in range(0, rows.shape[0], 17):
        chosen = probs[row, indices[:, row].long()]
        expected = chosen if k == 1 else chosen / chosen.sum()
        torch.testing.assert_close(gates[:, row], expected)
    biased = gate.route_logits(rows, routing) + gate.selection_bias[routing.task_ids]
    assert torch.equal(indices.t().long().sort(1).values, biased.topk(k, dim=1).indices.sort(1).values)
    assert not torch.equal(biased.topk(k, dim=1).indices, probs.topk(k, dim=1).indices)   # the bias did choose
    assert sentiment.any()


def test_aux_free_counts_are_kept_only_in_training_and_the_bias_stays_fp32_under_bf16():
    gate = _gate(2, balance="aux_free")
    rows, routing = _rows()
    gate.eval()
    gate(rows, routing)
    assert gate.pending_counts is None
    gate.train()
    gate(rows, routing)
    gate(rows, routing)
    assert gate.pending_counts.sum().item() == 2 * 2 * rows.shape[0]   # k routes per row, two forwards
    with torch.no_grad():
        gate.selection_bias += 0.123456789   # not representable in bf16
    before = gate.selection_bias.clone()
    gate.to(torch.bfloat16)
    assert gate.selection_bias.dtype == torch.float32 and gate.routers[0].net[0].weight.dtype == torch.bfloat16
    assert torch.equal(gate.selection_bias, before)   # not rounded through bf16 on the way
    gate.nudge_selection_bias(torch.arange(2 * N, dtype=torch.float32).view(2, N))
    assert gate.selection_bias[0, 0].item() == pytest.approx(0.123456789 + 1e-2)


def test_z_loss_is_the_mean_squared_logsumexp_of_each_tasks_logits():
    gate = _gate(2)
    rows, routing = _rows()
    gate(rows, routing)
    logits = gate.route_logits(rows, routing)
    for task in (0, 1):
        by_hand = torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in logits[routing.task_ids == task]])
        torch.testing.assert_close(gate.last_stats["z_loss"][task], by_hand.mean())
    assert gate.last_stats["z_loss"].requires_grad


def test_a_temperature_below_one_sharpens_the_combine_weights():
    rows, routing = _rows()
    flat = _gate(2)(rows, routing)[5]
    sharp = _gate(2, temperature=0.1)(rows, routing)[5]
    assert sharp.max(0).values.mean() > flat.max(0).values.mean()
    gate = _gate(2, temperature=0.1)
    _, _, _, indices, _, gates, _ = gate(rows, routing)
    torch.testing.assert_close(gates, combine_weights(F.softmax(gate.route_logits(rows, routing) / 0.1, 1),
                                                      indices, 2))


def test_the_routers_get_their_own_learning_rate():
    gate = _gate(2)
    groups = optimizer_groups(torch.nn.ModuleDict({"x": torch.nn.ModuleDict({"gate": gate})}), 0.01, lr=1e-3,
                              router_lr_scale=10.0)
    by_name = {g["name"]: g for g in groups}
    assert by_name["router_decay"]["lr"] == pytest.approx(1e-2) and "lr" not in by_name["decay"]
    routed = {id(p) for g in groups if g["name"].startswith("router_") for p in g["params"]}
    assert routed == {id(p) for p in gate.routers.parameters()}
    same = optimizer_groups(torch.nn.ModuleDict({"x": torch.nn.ModuleDict({"gate": gate})}), 0.01)
    assert [g["name"] for g in same] == ["decay", "no_decay"]   # the default layout checkpoints hold


@pytest.mark.parametrize("argv, message", [
    (["--balance", "sometimes"], "--balance must be one of"),
    (["--balance", "aux_free", "--routers", "false"], "needs routed experts"),
    (["--router_temperature", "0"], "must be > 0"),
    (["--balance", "aux_free", "--capacity_factor", "1.0", "--top_k", "3"], "one task would be favoured"),
    (["--balance", "aux_free", "--eval_capacity_factor", "1.0", "--top_k", "3"], "one task would be favoured"),
    (["--balance", "aux_free", "--balance_bias_update", "proportional"], "--balance_bias_update must be one of"),
    (["--patience", "-1"], "--patience must be >= 0"),
])
def test_balancing_flags_are_checked(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_the_relative_bias_update_charges_a_route_experts_over_routes_and_the_sign_rule_does_not():
    """With far fewer routes per step than experts, the sign rule moves a used expert by -rate and every unused
    one by +rate whatever the counts; the relative rule moves an expert by rate * (1 - c/mean), so one route
    costs rate * N/R and the bias tracks each expert's routes against its share, every route counted."""
    n, routes = 1024, 64
    counts = torch.zeros(2, n)
    counts[0, :routes] = 1              # task 0: 64 experts with one route each
    counts[0, 0] += 3                   # one with four
    rate = 0.01
    sign = TaskRoutedGate(D, T, n, num_tasks=2, k=1, balance="aux_free", bias_rate=rate, bias_update="sign")
    relative = TaskRoutedGate(D, T, n, num_tasks=2, k=1, balance="aux_free", bias_rate=rate, bias_update="relative")
    for gate in (sign, relative):
        gate.nudge_selection_bias(counts)
    mean = (routes + 3) / n
    torch.testing.assert_close(relative.selection_bias[0, 0], torch.tensor(rate * (1 - 4 / mean)))
    torch.testing.assert_close(relative.selection_bias[0, 1], torch.tensor(rate * (1 - 1 / mean)))
    torch.testing.assert_close(relative.selection_bias[0, -1], torch.tensor(rate))
    assert sign.selection_bias[0, 0] == sign.selection_bias[0, 1] == -rate      # 4 routes cost what 1 does
    # the relative nudges sum to zero per task (the bias only moves load between experts); a task that routed
    # nothing is left alone by both
    assert abs(relative.selection_bias[0].sum().item()) < 1e-4
    assert not relative.selection_bias[1].any() and not sign.selection_bias[1].any()
    with pytest.raises(ValueError, match="bias_update must be"):
        TaskRoutedGate(D, T, n, num_tasks=2, k=1, balance="aux_free", bias_update="proportional")


def test_the_relative_rule_spreads_a_top1_router_over_many_more_experts_than_rows_per_step():
    """1,024 experts, 32 routes per task and step, a router with sharp input-dependent preferences: over the
    second half of 128 steps (2,048 routes, 2 per expert; a uniformly random choice would leave e^-2 = 14 % of
    the experts without one) the relative rule uses nearly every expert and keeps the busiest near its share;
    the sign rule at the same rate leaves most experts without a route."""
    n, rows_per_task, steps = 1024, 32, 128
    results = {}
    for update in ("sign", "relative"):
        torch.manual_seed(0)
        gate = TaskRoutedGate(D, T, n, num_tasks=2, k=1, balance="aux_free", bias_rate=0.01, bias_update=update)
        with torch.no_grad():
            gate.routers[0].net[2].weight.mul_(5.0)
        gate.train()
        total = torch.zeros(n)
        for step in range(steps):
            rows, routing = _rows(2 * rows_per_task, seed=step)
            _, _, _, _, _, _, counts = gate(rows, routing)
            if step >= steps // 2:
                total += counts[0]
            gate.nudge_selection_bias(gate.pending_counts)
            gate.pending_counts = None
        results[update] = (int((total == 0).sum()), (total.max() / total.mean()).item())
    dead, ratio = results["relative"]
    assert dead <= 0.03 * n and ratio <= 3.0, results
    assert results["sign"][0] > 0.4 * n, results
