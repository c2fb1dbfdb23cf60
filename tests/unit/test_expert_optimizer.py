"""The experts' own AdamW (`expert_optimizer.py`) against torch's, one process: dense is torch's AdamW exactly;
lazy is torch's AdamW applied to each expert as its own parameter, stepped only when it received rows."""
import pytest
import torch

from mmolre import expert_optimizer
from mmolre.distributed import DistInfo
from mmolre.expert_optimizer import ExpertOptimizer
from tests import dist_helpers as h

ONE = DistInfo(0, 0, 1, 1)
LR, WD = 3e-3, 0.1


def _steps(model, experts, steps=4, clip=0.05, on_grads=None):
    """Forward/backward a batch per step, reduce, clip by the experts' own norm (the dense model left out),
    update; on_grads(step) sees the reduced gradients before the update."""
    for step in range(steps):
        batch = h.step_batch(step)
        out = model(batch.features, batch.masks)
        out.sentiment.pow(2).mean().add(out.aux_loss.sum()).backward()
        experts.reduce_gradients()
        divisor = max(1.0, (float(experts.squared_norm()) ** 0.5 + 1e-6) / clip)
        if on_grads:
            on_grads(step, divisor)
        experts.apply_update(LR, divisor)
        experts.zero_grad()
        model.zero_grad()


def test_dense_is_torchs_adamw_bit_for_bit():
    model = h.build(ep_size=1, ep_rank=0, num_experts=8)
    experts = ExpertOptimizer(model, "dense", WD, ONE, 1)
    banks = dict(experts.banks)
    copies = {(layer, n): t.detach().clone().requires_grad_() for layer, bank in banks.items()
              for n, t in bank.tensors.items()}
    reference = torch.optim.AdamW([{"params": [p for (_, n), p in copies.items() if not n.endswith("bias")],
                                    "weight_decay": WD},
                                   {"params": [p for (_, n), p in copies.items() if n.endswith("bias")],
                                    "weight_decay": 0.0}], lr=LR)

    def mirror(step, divisor):
        for (layer, n), p in copies.items():
            g = banks[layer].tensors[n].grad
            p.grad = (g.to_dense() if g is not None else torch.zeros_like(p)) * (1.0 / divisor)
        reference.step()
    _steps(model, experts, on_grads=mirror)
    for (layer, n), p in copies.items():
        assert torch.equal(banks[layer].tensors[n].detach(), p.detach()), (layer, n)
    assert all(bool((experts.state[layer]["step"] == 4).all()) for layer in banks)


@pytest.mark.parametrize("block_values", [None, 1])   # 1: every row in a block of its own
def test_lazy_steps_each_expert_as_its_own_adamw_only_when_it_got_rows(block_values, monkeypatch):
    if block_values:
        monkeypatch.setattr(expert_optimizer, "BLOCK_VALUES", block_values)
    model = h.build(ep_size=1, ep_rank=0, num_experts=16, top_k=1)
    experts = ExpertOptimizer(model, "lazy", WD, ONE, 1)
    banks = dict(experts.banks)
    per_expert = {}   # (layer, expert) -> (its parameters, torch's AdamW over them)
    for layer, bank in banks.items():
        for i in range(bank.num_local):
            params = {n: t[i].detach().clone().requires_grad_() for n, t in bank.tensors.items()}
            opt = torch.optim.AdamW([{"params": [p for n, p in params.items() if not n.endswith("bias")],
                                      "weight_decay": WD},
                                     {"params": [p for n, p in params.items() if n.endswith("bias")],
                                      "weight_decay": 0.0}], lr=LR)
            per_expert[(layer, i)] = (params, opt)
    worked = set()

    def mirror(step, divisor):
        for layer, bank in banks.items():
            for i in experts.stepped[layer].tolist():
                params, opt = per_expert[(layer, i)]
                grads = bank.grad_of(i)
                for n, p in params.items():
                    p.grad = grads[n] * (1.0 / divisor)
                opt.step()
                worked.add((layer, i))
    _steps(model, experts, steps=5, on_grads=mirror)
    idle = set(per_expert) - worked
    assert worked and idle, "the test needs experts that worked and experts that never did"
    for (layer, i), (params, _) in per_expert.items():
        for n, p in params.items():
            torch.testing.assert_close(banks[layer].tensors[n][i].detach(), p.detach(), rtol=0, atol=0,
                                       msg=lambda m: f"{layer} expert {i} {n}: {m}")
    for layer, i in idle:   # untouched: weights (no decay either), moments, step count
        assert experts.state[layer]["step"][i] == 0
    counts = {layer: experts.state[layer]["step"] for layer in banks}
    assert any(len(set(c.tolist()) - {0}) > 1 for c in counts.values())   # experts at different step counts


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="dense or lazy"):
        ExpertOptimizer(h.build(ep_size=1, ep_rank=0), "sparse", WD, ONE, 1)


def test_a_non_finite_clipping_norm_steps_no_expert():
    """An overflow DeepSpeed's step did not skip (its norm is not finite): the experts keep their weights,
    moments and step counts instead of taking NaN gradients."""
    model = h.build(ep_size=1, ep_rank=0, num_experts=8)
    experts = ExpertOptimizer(model, "dense", WD, ONE, 1)
    batch = h.step_batch(0)
    model(batch.features, batch.masks).sentiment.pow(2).mean().backward()
    experts.reduce_gradients()
    before = {layer: {n: t.detach().clone() for n, t in bank.tensors.items()} for layer, bank in experts.banks}
    experts.apply_update(LR, float("inf"))
    for layer, bank in experts.banks:
        assert all(torch.equal(t, before[layer][n]) for n, t in bank.tensors.items())
        assert int(experts.state[layer]["step"].sum()) == 0 and not experts.state[layer]["exp_avg"]


@pytest.mark.parametrize("key", ["bf16", "bfloat16"])
def test_bf16_without_deepspeeds_overflow_check_is_refused_with_banks(key):
    """DeepSpeed would step the dense model through a non-finite norm that the experts skip."""
    from mmolre.config import ConfigError
    from mmolre.engine import build_engine
    model = h.build(ep_size=1, ep_rank=0, num_experts=8)
    with pytest.raises(ConfigError, match="check_grad_overflow false with the shared experts in banks"):
        build_engine(model, None, {key: {"enabled": True, "check_grad_overflow": False}}, ONE, 1)


def test_a_deepspeed_optimizer_wrapper_the_experts_norm_is_not_wired_into_is_refused():
    """Every accepted config clips by the whole model's norm; an unknown wrapper stops instead of clipping by
    the dense norm alone (a torch optimizer, ZeRO-0 fp32, needs nothing: clip_by_global_norm counts them)."""
    from mmolre.engine import _add_experts_to_the_dense_norm
    with pytest.raises(NotImplementedError, match="not wired into"):
        _add_experts_to_the_dense_norm(object(), None)
    _add_experts_to_the_dense_norm(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), None)
