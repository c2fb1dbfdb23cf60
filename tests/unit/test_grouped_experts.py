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


def test_grouped_experts_keep_deepspeeds_expert_parameter_marks():
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.sharded_moe import MOELayer, TopKGate
    from deepspeed.moe.utils import is_moe_param
    _, grouped = _pair(4, 2)
    assert isinstance(grouped.moe, MoE) and isinstance(grouped.moe.deepspeed_moe, MOELayer)
    assert isinstance(grouped.moe.deepspeed_moe.gate, TopKGate)
    params = list(grouped.moe.deepspeed_moe.experts.parameters())
    assert len(params) == 4 and all(is_moe_param(p) for p in params)     # 4 stacked, whatever the count
    assert all(p.group_name == "ep_size_1" and p.shape[0] == 4 for p in params)


def test_stacked_experts_show_deepspeeds_per_expert_state_dict_keys():
    stock, grouped = _pair(4, 2)
    assert grouped.state_dict().keys() == stock.state_dict().keys()
    assert "moe.deepspeed_moe.experts.deepspeed_experts.3.down.weight" in grouped.state_dict()
    for key, value in stock.state_dict().items():
        torch.testing.assert_close(grouped.state_dict()[key], value)
    stock.load_state_dict(grouped.state_dict())   # and back


def test_stacked_biases_are_not_decayed_like_each_experts_own_bias():
    from mmolre.engine import optimizer_groups
    block = _pair(4, 2)[1]
    decay = {id(p) for g in optimizer_groups(block, 0.1) if g["weight_decay"] > 0 for p in g["params"]}
    stacked = block.moe.deepspeed_moe.experts
    assert id(stacked.down_weight) in decay and id(stacked.up_weight) in decay
    assert id(stacked.down_bias) not in decay and id(stacked.up_bias) not in decay   # 2-D, still biases


def test_both_expert_paths_train_the_same_model_with_weight_decay():
    """The parity tests above compare gradients; this one compares the weights after clipped AdamW steps
    with weight decay on (the 2-process version is in test_distributed.py)."""
    from tests import dist_helpers as h
    stock, grouped = h.reference_training(1, grouped=False), h.reference_training(1, grouped=True)
    assert stock["params"].keys() == grouped["params"].keys()
    for key, value in stock["params"].items():
        torch.testing.assert_close(grouped["params"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
