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


def test_a_bf16_gate_routes_exactly_as_an_fp32_gate_on_the_same_inputs():
    """A bf16 engine casts the routers to bf16; their computation must stay fp32 (as DeepSpeed's own gate
    does), so the same inputs and the same (bf16-stored) weights give the same logits and top-k choices."""
    import copy
    gate16 = copy.deepcopy(_gate(2)).bfloat16()
    gate32 = copy.deepcopy(gate16).float()            # the same weights, stored in fp32
    rows, routing = _rows(64)
    rows16 = rows.bfloat16()                          # what a bf16 encoder hands the MoE layer
    torch.testing.assert_close(gate16.route_logits(rows16, routing), gate32.route_logits(rows16.float(), routing),
                               rtol=0, atol=0)
    assert torch.equal(gate16(rows16, routing)[3], gate32(rows16.float(), routing)[3])


def _tight(k, rows=400, factor=0.5):
    gate = TaskRoutedGate(D, T, N, num_tasks=2, k=k, capacity_factor=factor)
    return gate, _rows(rows)


@pytest.mark.parametrize("k", [1, 2])
def test_a_tight_capacity_drops_both_tasks_alike(k):
    """DeepSpeed gives an expert's slots in row order and rows are stacked task-major (sentiment first);
    the gate's random row priority keeps the emotion task from losing its rows first. Both tasks route alike
    here (one router's weights in both), so any difference comes from the order of the rows alone."""
    torch.manual_seed(3)
    gate, (rows, routing) = _tight(k)
    gate.routers[1].load_state_dict(gate.routers[0].state_dict())
    half = rows.shape[0] // 2
    rows = torch.cat([rows[:half], rows[:half]])      # the same utterances for both tasks
    gate(rows, routing, True)
    sentiment, emotion = gate.last_stats["dropped_fraction"].tolist()
    assert sentiment > 0.2 and emotion > 0.2, (sentiment, emotion)
    assert abs(sentiment - emotion) < 0.1, (sentiment, emotion)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_loads_count_dispatched_routes_and_the_aux_loss_the_assigned_ones(k):
    torch.manual_seed(4)
    gate, (rows, routing) = _tight(k, rows=64)
    aux, capacity, _, indices, _, _, load = gate(rows, routing, True)
    logits = gate.route_logits(rows, routing)
    for task in (0, 1):
        mine = routing.task_ids == task
        routes = indices[:, mine].t().long()          # [rows of the task, k]
        kept = routes >= 0
        assert not kept.all()                         # the capacity dropped some of this task's routes
        assert torch.equal(load[task], torch.bincount(routes[kept], minlength=N).float())
        assert (load[task] <= int(capacity)).all()
        assert gate.last_stats["dropped_fraction"][task].item() == pytest.approx(1 - kept.float().mean().item())
        # the aux loss: the router's top-k assignment before the capacity limit (what was dispatched of it
        # is exactly that assignment)
        probs = torch.softmax(logits[mine], 1)
        assigned = probs.topk(k, dim=1).indices
        assert torch.equal(torch.where(kept, routes, assigned), assigned)
        f = torch.zeros(len(assigned), N).scatter_add_(1, assigned, torch.ones(assigned.shape)).mean(0)
        assert aux[task].item() == pytest.approx((f * probs.mean(0)).sum().item() * N / k, rel=1e-6)


def test_the_loads_are_the_rows_the_experts_computed_under_a_capacity():
    """Counted inside the stacked experts: the gate's per-task loads, summed over tasks, are the rows each
    expert computed, also when the capacity limit drops some."""
    from mmolre.model.unitse import UniTSEBlock
    torch.manual_seed(5)
    block = UniTSEBlock(d_model=D, seq_len=T, num_experts=N, top_k=2, expert_rank=3, task_rank=3, num_tasks=2,
                        ep_size=1, dropout=0.0, capacity_factor=0.5, router_noise=False)
    experts = block.shared_experts
    computed = torch.zeros(N)
    original = experts.forward_rows

    def counting(rows, local_ids):
        computed.add_(torch.bincount(local_ids[local_ids >= 0], minlength=N).float())
        return original(rows, local_ids)
    experts.forward_rows = counting
    rows, routing = _rows(40)
    _, _, load = block.moe(rows, routing)
    assert block.moe.deepspeed_moe.gate.last_stats["dropped_fraction"].min() > 0
    assert torch.equal(load.sum(0), computed)


def test_evaluation_has_its_own_capacity_and_drops_nothing_by_default():
    gate, (rows, routing) = _tight(2)
    gate.eval()
    indices = gate(rows, routing, True)[3]
    assert (indices >= 0).all() and gate.last_stats["dropped_fraction"].sum() == 0
    strict = TaskRoutedGate(D, T, N, num_tasks=2, k=2, capacity_factor=0.5, eval_capacity_factor=0.5)
    strict.load_state_dict(gate.state_dict())
    strict.eval()
    first = strict(rows, routing, True)[3]
    assert (first < 0).any()                          # an evaluation capacity, when asked for, applies
    assert torch.equal(strict(rows, routing, True)[3], first)   # with a fixed row priority: repeatable


def test_rows_in_any_task_order_get_the_same_routes_and_statistics():
    """Task-major rows take the slice path (views); interleaved rows the mask path: same logits, routes,
    per-task aux losses, loads and entropies."""
    gate = _gate()
    rows, routing = _rows()
    order = torch.tensor([0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11])   # tasks interleaved
    mixed = RowRouting(routing.task_ids[order], routing.time_mask[order])
    aux_a, _, _, idx_a, _, gates_a, counts_a = gate(rows, routing)
    stats_a = dict(gate.last_stats)
    aux_b, _, _, idx_b, _, gates_b, counts_b = gate(rows[order], mixed)
    stats_b = gate.last_stats
    torch.testing.assert_close(gate.route_logits(rows[order], mixed), gate.route_logits(rows, routing)[order])
    assert torch.equal(idx_b, idx_a[:, order]) and torch.equal(counts_a, counts_b)
    torch.testing.assert_close(gates_b, gates_a[:, order])
    torch.testing.assert_close(aux_a, aux_b)
    torch.testing.assert_close(stats_a["entropy"], stats_b["entropy"])
    probs = torch.softmax(gate.route_logits(rows, routing), 1)
    expected = torch.stack([-(p * p.log()).sum(1).mean() for p in probs.split(6)])
    torch.testing.assert_close(stats_a["entropy"], expected)


@pytest.mark.parametrize("k", [1, 2])   # DeepSpeed's own top-1 with a capacity; the route-based top-2
def test_evaluation_padding_takes_no_slot_and_changes_no_real_rows_prediction(k):
    """Under --eval_capacity_factor the padding rows evaluation adds (zero features, empty masks) are not
    routed: the real rows are predicted as in a batch of their own, whatever the padding (issue 23: they took
    slots and raised the capacity, so predictions changed with world size and micro batch)."""
    from mmolre.config import ModelConfig
    from mmolre.model import MMoLRE
    torch.manual_seed(0)
    model = MMoLRE(ModelConfig(d_model=8, blocks=1, num_experts=4, expert_rank=2, top_k=k, dropout=0.0,
                               eval_capacity_factor=0.5), {"text": (5, 6)}).eval()
    x = torch.randn(6, 5, 6, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(6, 5, dtype=torch.bool)
    alone = model({"text": x}, {"text": mask})
    assert alone.dropped_fraction.sum() > 0                      # the capacity binds
    for pad in (1, 2, 5):
        padded_x, padded_mask = torch.cat([x, torch.zeros(pad, 5, 6)]), torch.cat([mask, torch.zeros(pad, 5).bool()])
        real = torch.arange(6 + pad) < 6
        padded = model({"text": padded_x}, {"text": padded_mask}, real)
        assert torch.equal(padded.sentiment[:6], alone.sentiment), pad
        assert torch.equal(padded.emotion_logits[:6], alone.emotion_logits), pad
        assert torch.equal(padded.dropped_fraction, alone.dropped_fraction), pad
    unmarked = model({"text": padded_x}, {"text": padded_mask})  # the padding routed: real rows' slots change
    assert not torch.equal(unmarked.sentiment[:6], alone.sentiment)
