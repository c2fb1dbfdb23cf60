"""The route-based gating equals DeepSpeed's top1gating/top2gating bit for bit: routes, slots, combine weights,
capacity and the gradient of the logits."""
import pytest
import torch
from torch.nn import functional as F
from deepspeed.moe.sharded_moe import top1gating, top2gating, topkgating

from mmolre.model.sparse_gating import deepspeed_gating


def deepspeed_reference(logits, k, factor, drop, sampling):
    if k == 1:
        out = top1gating(logits, factor, 0, None, None, drop, False, None, True)
    elif k == 2:
        out = top2gating(logits, factor, 0, drop, None, sampling, True)
    else:
        out = topkgating(logits, k, factor, 0, drop, None, sparse_routes=True)
    return out[1], out[3], out[4], out[5]


def draws(rows, experts, seed):
    g = torch.Generator().manual_seed(seed)
    yield "random", torch.randn(rows, experts, generator=g) * 3
    yield "ties", torch.randint(0, 3, (rows, experts), generator=g).float()   # many equal logits per row
    yield "uniform", torch.zeros(rows, experts)                                # every expert tied


def run(fn, logits, seed, k, factor, drop, sampling):
    x = logits.clone().requires_grad_(True)
    torch.manual_seed(seed)   # the second-expert sampling's noise
    capacity, indices, slots, weights = fn(x.clone(), k, factor, drop, sampling)
    probe = torch.linspace(-1, 1, weights.numel()).view_as(weights)
    (weights * probe).sum().backward()
    return int(capacity), indices, slots, weights.detach(), x.grad


@pytest.mark.parametrize("k,drop,sampling", [(1, False, False), (2, False, False), (2, True, False),
                                             (2, False, True), (2, True, True), (1, True, False), (3, False, False)])
@pytest.mark.parametrize("rows,experts", [(7, 4), (64, 16), (33, 1000)])
def test_routes_equal_deepspeeds_gating_bit_for_bit(k, drop, sampling, rows, experts):
    factor = 1.0   # with a limit: ceil(rows / experts * k) slots per expert, which the draws overfill
    for name, logits in draws(rows, experts, seed=rows + experts):
        theirs = run(deepspeed_reference, logits, 5, k, factor, drop, sampling)
        for given in (False, True):   # the softmax computed inside, or handed in by the gate
            ours = run(lambda x, *a: deepspeed_gating(x, a[0], a[1], 0, a[2], None, a[3],
                                                      probs=F.softmax(x, dim=1) if given else None),
                       logits, 5, k, factor, drop, sampling)
            assert ours[0] == theirs[0], (name, "capacity")
            for what, a, b in zip(("experts", "slots", "combine weights", "logits' gradient"), ours[1:], theirs[1:]):
                assert a.dtype == b.dtype and torch.equal(a, b), (name, what, given)


def test_a_capacity_limit_drops_routes_as_deepspeed_does():
    """The drop path is exercised: routes past an expert's capacity come back as -1, second choices first."""
    logits = torch.zeros(16, 4)
    logits[:, 0] = 5.0   # every row's first choice is expert 0, its second expert 1
    logits[:, 1] = 4.0
    capacity, indices, slots, weights = deepspeed_gating(logits.clone(), 2, 1.0, 0, True, None, False)
    assert int(capacity) == 8   # ceil(16 / 4 * 1.0 * 2)
    assert (indices[0, :8] == 0).all() and (indices[0, 8:] == -1).all()
    assert (indices[1, :8] == 1).all() and (indices[1, 8:] == -1).all()   # expert 1 had no first choices
    assert (weights[:, 8:] == 0).all()   # rows that lost both routes carry no weight
    ref = deepspeed_reference(logits.clone(), 2, 1.0, True, False)
    assert torch.equal(indices, ref[1]) and torch.equal(slots, ref[2]) and torch.equal(weights, ref[3])
