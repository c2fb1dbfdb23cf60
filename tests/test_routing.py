import pytest
import torch

from mmolre.model.routing import RowRouting, TaskRoutedGate, load_balancing_loss

D, T, N = 8, 5, 4


def _gate(k=2):
    torch.manual_seed(0)
    return TaskRoutedGate(D, T, N, num_tasks=2, k=k)


def _rows(s=12):
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(s, T * D, generator=g)
    tasks = torch.arange(2).repeat_interleave(s // 2)
    return rows, RowRouting(tasks, torch.ones(s, T, dtype=torch.bool))


def test_each_row_is_scored_by_its_own_task_router():
    gate = _gate()
    rows, routing = _rows()
    before = gate.route_logits(rows, routing)
    with torch.no_grad():
        gate.routers[1].net[2].weight.add_(torch.randn_like(gate.routers[1].net[2].weight))
    after = gate.route_logits(rows, routing)
    sentiment, emotion = routing.task_ids == 0, routing.task_ids == 1
    torch.testing.assert_close(before[sentiment], after[sentiment])
    assert not torch.allclose(before[emotion], after[emotion])


def test_router_sees_only_the_unmasked_time_steps():
    gate = _gate()
    rows, routing = _rows()
    mask = routing.time_mask.clone()
    mask[:, 3:] = False
    changed = rows.view(-1, T, D).clone()
    changed[:, 3:] += 100.0
    a = gate.route_logits(rows, RowRouting(routing.task_ids, mask))
    b = gate.route_logits(changed.view(rows.shape), RowRouting(routing.task_ids, mask))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_gate_returns_per_task_aux_and_loads_and_keeps_deepspeed_dispatch(k):
    gate = _gate(k)
    rows, routing = _rows()
    aux, capacity, num_experts, indices, locations, gates, load = gate(rows, routing, True)
    assert aux.shape == (2,) and load.shape == (2, N)
    assert num_experts == N and indices.shape == (k, rows.shape[0])
    assert load.sum(1).tolist() == [6 * k, 6 * k]        # every row of each task routed to k experts
    assert (indices >= 0).all()                           # no capacity set: nothing dropped
    # the chosen experts are the top-k of the task router's logits
    top = gate.route_logits(rows, routing).topk(k, dim=1).indices.sort(1).values
    assert torch.equal(indices.t().long().sort(1).values, top)


def test_aux_loss_is_one_at_perfect_balance_and_larger_otherwise():
    probs = torch.full((4, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3], [0, 2], [1, 3]])
    assert load_balancing_loss(probs, balanced, 2).item() == pytest.approx(1.0)
    assert load_balancing_loss(probs, torch.tensor([[0], [1], [2], [3]]), 1).item() == pytest.approx(1.0)
    skewed_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]] * 4)
    assert load_balancing_loss(skewed_probs, torch.zeros(4, 1, dtype=torch.long), 1).item() == pytest.approx(2.8)


def test_aux_loss_of_one_task_ignores_the_other_tasks_rows():
    gate = _gate(1)
    rows, routing = _rows()
    aux, *_ = gate(rows, routing, True)
    rows2 = rows.clone()
    rows2[routing.task_ids == 1] = torch.randn_like(rows2[routing.task_ids == 1]) * 5
    aux2, *_ = gate(rows2, routing, True)
    assert aux[0].item() == pytest.approx(aux2[0].item())
    assert aux[1].item() != pytest.approx(aux2[1].item())
    aux.sum().backward()   # the aux loss trains the routers
    assert gate.routers[0].net[0].weight.grad.abs().sum() > 0
