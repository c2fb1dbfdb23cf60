"""The grouped fast path computes exactly what DeepSpeed's per-expert loop computes."""
import pytest
import torch

from mmolre.model.routing import RowRouting
from mmolre.model.unitse import UniTSEBlock

D, T, R = 8, 5, 3


def _pair(num_experts, top_k, capacity_factor=0.0):
    blocks = []
    for grouped in (False, True):
        torch.manual_seed(0)
        blocks.append(UniTSEBlock(d_model=D, seq_len=T, num_experts=num_experts, top_k=top_k, expert_rank=R,
                                  task_rank=R, num_tasks=2, ep_size=1, dropout=0.0,
                                  capacity_factor=capacity_factor, router_noise=False, grouped_experts=grouped))
    stock, grouped = blocks
    for i in range(num_experts):   # distinct experts, so a mix-up would show
        stock.reset_shared_expert(i, torch.Generator().manual_seed(i))
    grouped.load_state_dict(stock.state_dict())   # stacked experts read DeepSpeed's per-expert keys
    return stock, grouped


def _run(block, seqs, tasks, mask):
    torch.manual_seed(7)   # with a capacity limit, the rows' random priority must be the same for both paths
    rows = seqs.reshape(len(seqs), -1).requires_grad_()
    out, aux, load = block.moe(rows, RowRouting(tasks, mask))
    (out * torch.linspace(-1, 1, out.shape[1])).sum().add(aux.sum()).backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    return out.detach(), rows.grad, grads


@pytest.mark.parametrize("num_experts, top_k, capacity_factor", [(4, 1, 0.0), (8, 2, 0.0), (16, 3, 0.0),
                                                                  (4, 2, 0.5)])
def test_grouped_experts_match_deepspeeds_per_expert_loop(num_experts, top_k, capacity_factor):
    stock, grouped = _pair(num_experts, top_k, capacity_factor)
    g = torch.Generator().manual_seed(1)
    seqs = torch.randn(12, T, D, generator=g)
    tasks = torch.arange(2).repeat_interleave(6)
    mask = torch.arange(T)[None, :] < torch.randint(1, T + 1, (12, 1), generator=g)
    out_s, dx_s, grads_s = _run(stock, seqs * mask[..., None], tasks, mask)
    out_g, dx_g, grads_g = _run(grouped, seqs * mask[..., None], tasks, mask)
    torch.testing.assert_close(out_g, out_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_g, dx_s, rtol=1e-5, atol=1e-6)
    dense = [n for n in grads_s if "deepspeed_experts" not in n]
    assert dense and set(dense) <= set(grads_g)
    for name in dense:
        torch.testing.assert_close(grads_g[name], grads_s[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for i in range(num_experts):   # every expert gets its gradient (exactly zero if no row chose it)
        for name, g in stock.shared_expert_grads(i).items():
            torch.testing.assert_close(grouped.shared_expert_grads(i)[name], g, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for i in range(num_experts) for g in grouped.shared_expert_grads(i).values())


def test_grouped_experts_in_deepspeeds_slab_layout_match_the_stock_experts():
    """StackedLowRankExperts is also a drop-in for DeepSpeed's Experts.forward([ep, E, C, M])."""
    stock, grouped = _pair(4, 2)
    slabs = torch.randn(2, 4, 3, T * D)
    torch.testing.assert_close(grouped.moe.deepspeed_moe.experts(slabs), stock.moe.deepspeed_moe.experts(slabs),
                               rtol=1e-5, atol=1e-6)


def test_the_fast_path_is_deepspeeds_moe_layer_with_its_experts_in_a_bank():
    """DeepSpeed's MOELayer (gate, dispatch, all-to-all) holds the experts; their weights are four fp32 tensors
    of one row per expert, outside the module's parameters, and a backward returns gradients for the rows of
    the experts that received rows only (sparse)."""
    from deepspeed.moe.experts import Experts
    from deepspeed.moe.sharded_moe import MOELayer, TopKGate
    _, grouped = _pair(8, 1)
    layer = grouped.moe.deepspeed_moe
    assert isinstance(layer, MOELayer) and isinstance(layer.gate, TopKGate) and isinstance(layer.experts, Experts)
    assert not list(layer.experts.parameters())                       # nothing for DeepSpeed's engine to step
    bank = grouped.expert_bank
    assert [t.shape[0] for t in bank.tensors.values()] == [8] * 4
    assert all(t.dtype == torch.float32 and t.requires_grad for t in bank.tensors.values())
    seqs = torch.randn(2, T, D)
    _run(grouped, seqs, torch.tensor([0, 1]), torch.ones(2, T, dtype=torch.bool))
    grad = bank.tensors["down.weight"].grad
    assert grad.is_sparse and 1 <= len(grad.coalesce().indices()[0]) <= 2      # 2 rows, top-1: 1 or 2 experts


def test_the_fast_paths_state_dict_leaves_the_experts_to_the_bank_and_reads_deepspeeds_keys():
    """Its state dict holds no expert (DeepSpeed's engine saves a model's state dict as it is, and the experts
    have files of their own), and it reads DeepSpeed's per-expert keys (exports, earlier checkpoints)."""
    stock, grouped = _pair(4, 2)
    expert_keys = [k for k in stock.state_dict() if "deepspeed_experts" in k]
    assert len(expert_keys) == 4 * 4 and not [k for k in grouped.state_dict() if "experts" in k.split("gate")[0]]
    assert set(grouped.state_dict()) == set(stock.state_dict()) - set(expert_keys)
    for i in range(4):   # _pair loaded the stock block's per-expert keys into the bank
        for name, value in stock.shared_expert(i).items():
            torch.testing.assert_close(grouped.shared_expert(i)[name], value)


def test_expert_weight_decay_skips_the_biases_like_every_bias():
    """With zero gradients, one dense AdamW step of the experts only decays: weights by (1 - lr * wd), biases
    not at all (as optimizer_groups treats every bias of the model)."""
    from mmolre.distributed import DistInfo
    from mmolre.expert_optimizer import ExpertOptimizer
    from mmolre.model import MMoLRE
    from tests import dist_helpers as h
    model = h.build(ep_size=1, ep_rank=0)
    experts = ExpertOptimizer(model, "dense", 0.5, DistInfo(0, 0, 1, 1), 1)
    before = {layer: {n: t.detach().clone() for n, t in bank.tensors.items()} for layer, bank in experts.banks}
    experts.apply_update(lr=0.1, clip_divisor=1.0)
    for layer, bank in experts.banks:
        for name, t in bank.tensors.items():
            factor = 1.0 if name.endswith("bias") else 1 - 0.1 * 0.5
            torch.testing.assert_close(t.detach(), before[layer][name] * factor, rtol=0, atol=1e-7)
    assert isinstance(model, MMoLRE)


def test_both_expert_paths_train_the_same_model_with_weight_decay():
    """The parity tests above compare gradients; this one compares the weights after clipped AdamW steps
    with weight decay on: DeepSpeed's per-expert loop stepped by torch's AdamW against the fast path's experts
    stepped by the expert optimizer (the 2-process version is in test_distributed.py)."""
    from tests import dist_helpers as h
    stock, grouped = h.reference_training(1, grouped=False), h.reference_training(1, grouped=True)
    assert stock["params"].keys() == grouped["params"].keys()
    for key, value in stock["params"].items():
        torch.testing.assert_close(grouped["params"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
