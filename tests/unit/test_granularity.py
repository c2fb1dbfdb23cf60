"""--route_per step: every valid time step is a row of its own, and where the two granularities coincide (one
shared expert) they compute the same model."""
import numpy as np
import pytest
import torch

from mmolre.model.granularity import WINDOW, StepRows
from mmolre.model.unitse import UniTSEBlock
from mmolre.routing_stats import specialisation_statistics
from tests import dist_helpers as h

D, T, R = 8, 5, 3


def _block(route_per, num_experts=4, top_k=2, grouped=True, capacity_factor=0.0, seed=0, **kw):
    torch.manual_seed(seed)
    block = UniTSEBlock(d_model=D, seq_len=T, num_experts=num_experts, top_k=top_k, expert_rank=R, task_rank=R,
                        num_tasks=2, ep_size=1, dropout=0.0, capacity_factor=capacity_factor, router_noise=False,
                        grouped_experts=grouped, route_per=route_per, **kw)
    for i in range(num_experts):   # distinct experts, so a mix-up would show
        block.reset_shared_expert(i, torch.Generator().manual_seed(i))
    return block


def _inputs(batch=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, T, D, generator=g)
    lengths = torch.tensor([T, 1, 3, T, 2, 4][:batch])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return [x, x.flip(0)], mask


def _run(block, streams, mask, real=None):
    streams = [s.clone().requires_grad_() for s in streams]
    out, stats = block(streams, mask, real)
    # valid steps only: the utterance path's experts also write to padded steps, which nothing downstream reads
    keep = mask[..., None]
    (sum((o * keep * torch.linspace(-1, 1, D)).sum() for o in out) + stats.aux_loss.sum()).backward()
    return out, stats, [s.grad for s in streams]


def test_a_step_row_is_the_step_and_its_neighbours_with_zeros_past_the_ends_and_at_padding():
    streams, mask = _inputs()
    layout = StepRows(T, D, num_tasks=2)
    rows, routing, placement = layout.rows(streams, mask, None)
    assert rows.shape == (2 * int(mask.sum()), WINDOW * D)
    masked = [s * mask[..., None] for s in streams]
    for row, flat, task in zip(rows, placement.index.tolist(), routing.task_ids.tolist()):
        t, (b, step) = flat // (6 * T), divmod(flat % (6 * T), T)
        assert task == t and bool(mask[b, step])
        want = [masked[t][b, s] if 0 <= s < T else torch.zeros(D) for s in (step - 1, step, step + 1)]
        assert torch.equal(row, torch.cat(want))
    assert routing.time_mask.tolist() == [[False, True, False]] * len(rows)   # the router reads the step itself


@pytest.mark.parametrize("grouped", [True, False], ids=["expert-bank", "deepspeed-expert-loop"])
def test_with_one_shared_expert_step_routing_computes_the_utterance_model(grouped):
    """One expert, top-1: every row's combine weight is 1, so both granularities compute x + E(x) + E_task(x); the
    outputs, the input gradients and every parameter's gradient agree (the shared expert's included)."""
    streams, mask = _inputs()
    results = {}
    for route_per in ("utterance", "step"):
        block = _block(route_per, num_experts=1, top_k=1, grouped=grouped)
        out, _, grads = _run(block, streams, mask)
        results[route_per] = (out, grads, block)
    (out_u, dx_u, per_u), (out_s, dx_s, per_s) = results["utterance"], results["step"]
    for a, b in zip(out_u, out_s):
        torch.testing.assert_close(b[mask], a[mask], rtol=1e-5, atol=1e-6)
    for a, b in zip(dx_u, dx_s):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for name, g in per_u.shared_expert_grads(0).items():
        torch.testing.assert_close(per_s.shared_expert_grads(0)[name], g, rtol=1e-5, atol=1e-6)
    task_grads = {n: p.grad for n, p in per_u.named_parameters() if "task_specific" in n}
    assert task_grads and all(torch.allclose(dict(per_s.named_parameters())[n].grad, g, rtol=1e-5, atol=1e-6)
                              for n, g in task_grads.items())


@pytest.mark.parametrize("num_experts, top_k, capacity_factor", [(4, 1, 0.0), (8, 2, 0.0), (8, 3, 0.0),
                                                                  (4, 2, 0.5)])
def test_the_fast_path_computes_deepspeeds_expert_loop_per_step(num_experts, top_k, capacity_factor):
    """The bank computes the window's centre step only; DeepSpeed's loop computes the whole window and the block
    keeps its middle: the same outputs and gradients."""
    streams, mask = _inputs()
    runs = []
    for grouped in (False, True):
        block = _block("step", num_experts, top_k, grouped, capacity_factor)
        if grouped:
            block.load_state_dict(runs[0][3].state_dict())
        torch.manual_seed(7)   # with a capacity limit, the rows' random order must be the same on both paths
        runs.append((*_run(block, streams, mask), block))
    (out_s, stats_s, dx_s, stock), (out_g, stats_g, dx_g, grouped) = runs
    for a, b in zip(out_s + dx_s, out_g + dx_g):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats_s.routes, stats_g.routes)
    for i in range(num_experts):
        for name, g in stock.shared_expert_grads(i).items():
            torch.testing.assert_close(grouped.shared_expert_grads(i)[name], g, rtol=1e-5, atol=1e-6)
    if capacity_factor:
        assert stats_g.dropped_fraction.sum() > 0   # the limit bit


def test_padded_steps_and_padded_utterances_get_no_route_no_load_and_no_gradient():
    streams, mask = _inputs()
    real = torch.tensor([True, True, True, True, False, False])   # evaluation's padding rows
    block = _block("step", num_experts=8, top_k=2, balance="aux_free")
    block.train()
    out, stats, grads = _run(block, streams, mask, real)
    routed = mask & real[:, None]                                 # [B, T]
    table = stats.routes.view(2, 6, T, 2)                         # [tasks, B, T, k]
    assert bool((table[:, routed] >= 0).all()) and bool((table[:, ~routed] == -1).all())
    assert bool((stats.combine.view(2, 6, T, 2)[:, ~routed] == 0).all())
    assert stats.expert_load.sum(1).tolist() == [2.0 * routed.sum()] * 2   # each task: its valid steps x top-2
    gate = block.moe.deepspeed_moe.gate
    assert gate.pending_counts.sum().item() == 2 * 2 * routed.sum()       # aux_free counts real steps only


def test_a_rank_with_no_valid_step_still_runs_the_layer():
    """Evaluation's last batch may be all padding on a rank: no row at all, and the layer still returns."""
    streams, mask = _inputs()
    block = _block("step", num_experts=4, top_k=2)
    block.eval()
    out, stats = block(streams, mask, torch.zeros(6, dtype=torch.bool))
    assert bool((stats.routes == -1).all()) and stats.expert_load.sum() == 0
    assert all(torch.isfinite(o).all() for o in out)


def test_a_model_routes_every_modality_per_step_and_pads_the_route_table():
    """MMoLRE with --route_per step: the routes per utterance are its steps' (T*k, the longest modality's
    width; shorter modalities' layers filled with -1), and the statistics read them."""
    model = h.build(ep_size=1, ep_rank=0, route_per="step")
    batch = h.fixed_batch()
    out = model(batch.features, batch.masks)
    steps = max(t for t, _ in h.SHAPES.values())
    assert out.routes.shape == (4, 2, h.BATCH, steps * 2)
    for layer, name in enumerate(out.layer_names):
        modality = name.split(".")[0]
        valid = batch.masks[modality]
        table = out.routes[layer].view(2, h.BATCH, steps, 2)[:, :, :valid.shape[1]]
        assert bool((table[:, valid] >= 0).all()) and bool((table[:, ~valid] == -1).all())
        assert bool((out.routes[layer].view(2, h.BATCH, steps, 2)[:, :, valid.shape[1]:] == -1).all())
    routes = out.routes.permute(2, 0, 1, 3).numpy()
    combine = out.combine.permute(2, 0, 1, 3).detach().numpy()
    stats = specialisation_statistics(routes, combine, out.layer_names, 4, batch.sentiment.numpy(),
                                      batch.emotions.numpy(), batch.has_emotion.numpy(), routes_per_row=2)
    mcw = stats["text.0"]["sentiment"]["max_combine_weight"]
    r, w = routes[:, 0, 0].reshape(h.BATCH, -1, 2), combine[:, 0, 0].reshape(h.BATCH, -1, 2)
    assert mcw == pytest.approx(float(w.max(-1)[(r >= 0).any(-1)].mean()))   # over routed steps, not padding
    assert 0.5 <= mcw <= 1.0
    assert stats["text.0"]["sentiment"]["experts_used"] >= 1
    assert np.isfinite(stats["text.0"]["sentiment"]["label_mi"])


def test_an_utterance_touches_the_experts_of_all_its_steps():
    """count_parameters' active parameters: per layer at most tasks x top-k experts per routed row, one row per
    utterance or one per step (h.SHAPES: 6 text and 5 audio steps, 4 experts, top-2: every expert per step)."""
    from mmolre.model.mmolre import count_parameters
    utterance = count_parameters(h.build(ep_size=1, ep_rank=0))
    step = count_parameters(h.build(ep_size=1, ep_rank=0, route_per="step"))
    assert utterance["total"] == step["total"] and utterance["per_expert"] == step["per_expert"]
    layers = 4
    assert utterance["active_per_utterance"] == utterance["dense"] + layers * min(4, 2 * 2) * utterance["per_expert"]
    assert step["active_per_utterance"] == step["dense"] + layers * 4 * step["per_expert"]
    wide = count_parameters(h.build(ep_size=1, ep_rank=0, route_per="step", num_experts=64))
    assert wide["active_per_utterance"] == wide["dense"] + 2 * (2 * 2 * 6 + 2 * 2 * 5) * wide["per_expert"]


@pytest.mark.parametrize("loads", ["even", "one expert takes most rows", "one row each", "no row"])
def test_step_rows_grouped_by_expert_compute_each_windows_convolution_at_its_centre(loads):
    """The fast path groups step rows by expert (padded to the busiest expert, or in power-of-two batches where the
    loads are too unequal) instead of copying the weights per row: outputs and every gradient equal each row's
    own kernel-3 convolution at the window's centre, then its up-projection."""
    from torch.nn import functional as F
    from mmolre.model.grouped import StackedLowRankExperts
    g = torch.Generator().manual_seed(3)
    d, r, experts = 8, 4, 6
    which = {"even": torch.arange(36) % experts, "one expert takes most rows": torch.tensor([2] * 30 + [0, 1, 3, 4, 5]),
             "one row each": torch.arange(experts), "no row": torch.zeros(0, dtype=torch.long)}[loads]
    x = torch.randn(len(which), WINDOW, d, generator=g, requires_grad=True)
    w = {name: torch.randn(*shape, generator=g, requires_grad=True) for name, shape in
         (("down.weight", (experts, r, d, 3)), ("down.bias", (experts, r)), ("up.weight", (experts, d, r, 1)),
          ("up.bias", (experts, d)))}
    grouped = StackedLowRankExperts._windows_by_expert(x, which, w)
    rows = [F.conv1d(F.gelu(F.conv1d(x[i].T[None], w["down.weight"][e], w["down.bias"][e], padding=1)),
                     w["up.weight"][e], w["up.bias"][e])[0, :, WINDOW // 2] for i, e in enumerate(which.tolist())]
    expected = torch.stack(rows) if rows else torch.zeros(0, d)
    torch.testing.assert_close(grouped, expected, rtol=1e-5, atol=1e-5)
    if not rows:
        return
    upstream = torch.randn(grouped.shape, generator=g)
    mine = torch.autograd.grad(grouped, [x, *w.values()], upstream)
    theirs = torch.autograd.grad(expected, [x, *w.values()], upstream)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_an_expert_bank_that_receives_no_step_row_stays_on_the_backward_graph():
    """Under expert parallelism a rank whose experts receive no route still gets padding slots; its output must
    stay on the autograd graph, or that rank would skip the backward all-to-alls its peers run and the run
    would hang. Both granularities, as the layer's padding slots (-1) arrive."""
    from mmolre.model.experts import LowRankExpert
    from mmolre.model.grouped import StackedLowRankExperts
    for window, centre_only in ((WINDOW, True), (5, False)):
        experts = StackedLowRankExperts(LowRankExpert(8, 4, seq_len=window), 2, "ep_size_2", centre_only=centre_only)
        rows = torch.randn(3, window * 8, requires_grad=True)
        out = experts.forward_rows(rows, torch.full((3,), -1))
        assert out.requires_grad and out.shape == (3, 8 if centre_only else window * 8) and not out.any()
        out.sum().backward()
        assert torch.equal(rows.grad, torch.zeros_like(rows))
