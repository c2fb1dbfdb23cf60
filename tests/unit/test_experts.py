import torch

import pytest

from mmolre.config import ModelConfig
from mmolre.model import MMoLRE, count_parameters
from mmolre.model.experts import LowRankExpert, expert_parameter_count

SHAPES = {"text": (6, 8), "audio": (5, 4)}


def test_expert_shapes_and_parameter_count():
    d, r, t = 16, 4, 6
    expert = LowRankExpert(d, r, seq_len=t)
    assert sum(p.numel() for p in expert.parameters()) == expert_parameter_count(d, r) == 4 * d * r + r + d
    seqs = torch.randn(3, t, d)
    assert expert.forward_sequences(seqs).shape == (3, t, d)
    # DeepSpeed hands experts [ep, 1, capacity, T*d] slabs of flattened utterances.
    rows = seqs.reshape(1, 1, 3, t * d)
    out = expert(rows)
    assert out.shape == rows.shape
    torch.testing.assert_close(out.reshape(3, t, d), expert.forward_sequences(seqs))


def test_expert_convolves_along_time_only_locally():
    """Kernel 3 then 1: output step t depends on input steps t-1..t+1 only."""
    expert = LowRankExpert(8, 4, seq_len=10)
    x = torch.randn(1, 10, 8)
    y = x.clone()
    y[0, 9] += 1.0
    diff = (expert.forward_sequences(x) - expert.forward_sequences(y)).abs().sum(-1)[0]
    assert torch.all(diff[:8] == 0) and diff[8:].gt(0).all()


def test_each_shared_expert_starts_differently_and_depends_only_on_global_id():
    cfg = ModelConfig(d_model=16, num_experts=4, top_k=2, expert_rank=4, blocks=1)
    full = MMoLRE(cfg, SHAPES, ep_size=1)
    full.init_shared_experts(seed=3, ep_rank=0)
    block = next(full.moe_blocks())[1]
    w = [block.shared_expert(i)["down.weight"] for i in range(4)]
    assert not any(torch.equal(w[i], w[j]) for i in range(4) for j in range(i + 1, 4))
    # Rank 1 of an expert-parallel pair holds global experts 2 and 3, with the same weights, whether the
    # experts are stacked (the fast path) or DeepSpeed's own modules.
    for grouped in (True, False):
        half = MMoLRE(ModelConfig(**{**cfg.__dict__, "grouped_experts": grouped}), SHAPES, ep_size=2)
        half.init_shared_experts(seed=3, ep_rank=1)
        local = next(half.moe_blocks())[1]
        assert local.moe.num_local_experts == 2
        torch.testing.assert_close(local.shared_expert(0)["down.weight"], w[2])
        torch.testing.assert_close(local.shared_expert(1)["up.bias"], block.shared_expert(3)["up.bias"])


def test_parameter_accounting_is_global_and_counts_active_experts():
    cfg = ModelConfig(d_model=16, num_experts=4, top_k=1, expert_rank=4, blocks=2)
    one = count_parameters(MMoLRE(cfg, SHAPES, ep_size=1))
    two = count_parameters(MMoLRE(cfg, SHAPES, ep_size=2))
    assert one == two
    per = expert_parameter_count(16, 4)
    layers = 2 * len(SHAPES)
    assert one["expert"] == layers * 4 * per
    assert one["total"] == one["dense"] + one["expert"]
    # each of the 2 tasks visits top_k=1 expert per layer
    assert one["active_per_utterance"] == one["dense"] + layers * 2 * per
    assert one["full_rank_expert_equivalent"] == layers * 4 * expert_parameter_count(16, 16)


@pytest.mark.parametrize("grouped", [True, False])
def test_model_has_one_deepspeed_moe_layer_per_block_and_no_expert_in_module_paths(grouped):
    """Each block's shared experts sit in one DeepSpeed MOELayer: inside DeepSpeed's `MoE` wrapper on the stock
    path, inside ExpertParallelMoE (the same layer and groups, experts in a bank) on the fast path."""
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.sharded_moe import MOELayer
    cfg = ModelConfig(d_model=16, num_experts=4, expert_rank=4, blocks=2, grouped_experts=grouped)
    model = MMoLRE(cfg, SHAPES)
    layers = [n for n, m in model.named_modules() if isinstance(m, MOELayer)]
    assert layers == ["unitse.text.blocks.0.moe.deepspeed_moe", "unitse.text.blocks.1.moe.deepspeed_moe",
                      "unitse.audio.blocks.0.moe.deepspeed_moe", "unitse.audio.blocks.1.moe.deepspeed_moe"]
    wrapped = [n for n, m in model.named_modules() if isinstance(m, MoE)]
    assert wrapped == ([] if grouped else [n.rsplit(".", 1)[0] for n in layers])
    if grouped:   # the experts' weights are in the banks, not among the module's parameters
        assert len(list(model.expert_banks())) == 4
        assert not [n for n, _ in model.named_parameters() if "deepspeed_experts" in n or "down_weight" in n]
    # DeepSpeed's checkpointing treats any key with "expert" under an MoE module as an expert weight.
    for name, _ in model.named_parameters():
        prefix = name.split(".deepspeed_moe.")[0]
        assert "expert" not in prefix, name
