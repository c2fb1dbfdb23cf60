"""The sample-based LR schedule: one curve whatever the batch geometry, and what a resume keeps of its plan."""
import pytest
import torch

from mmolre.lr_schedule import SchedulePlan, WarmupCosineBySamples, warmup_cosine_factor


def scheduler(epochs=2, max_steps=0, warmup_ratio=0.1, samples_per_epoch=320, samples_per_step=16):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return WarmupCosineBySamples(opt, SchedulePlan(epochs, max_steps, warmup_ratio, samples_per_epoch, samples_per_step))


def run(sched, steps):
    lrs = []
    for _ in range(steps):
        lrs.append(sched.optimizer.param_groups[0]["lr"])
        sched.step()
    return lrs


def test_the_curve_depends_on_samples_not_on_how_they_are_grouped():
    big, small = scheduler(samples_per_step=32), scheduler(samples_per_step=16)
    lrs_big, lrs_small = run(big, 20), run(small, 40)
    assert big.total_samples == small.total_samples == 640
    # past the warm-up, a step of 32 samples and the first of two steps of 16 start at the same sample
    assert lrs_big[3:] == pytest.approx(lrs_small[6::2])
    assert lrs_small[-1] == pytest.approx(warmup_cosine_factor(39 * 16, 16, 640, 64))


def test_a_resume_under_another_batch_size_keeps_the_plan_and_the_step_budget():
    two = scheduler(max_steps=30, samples_per_epoch=320, samples_per_step=16)   # 2 ranks x 8
    run(two, 12)
    one = scheduler(max_steps=30, samples_per_epoch=324, samples_per_step=8)    # 1 rank x 8: other epochs
    one.load_state_dict(two.state_dict())
    assert (one.samples, one.total_samples, one.warmup_samples, one.max_samples) == (192, 480, 48, 480)
    assert one.optimizer.param_groups[0]["lr"] == pytest.approx(warmup_cosine_factor(192, 8, 480, 48))


def test_a_resume_with_more_epochs_or_another_step_budget_re_plans():
    first = scheduler(epochs=1)
    run(first, 20)                                   # the whole of its single epoch
    more = scheduler(epochs=3)
    more.load_state_dict(first.state_dict())
    assert more.samples == 320 and more.total_samples == 960 and more.max_samples == 0
    budget = scheduler(max_steps=10)
    run(budget, 4)
    longer = scheduler(max_steps=25, samples_per_step=8)   # 21 more steps of 8 samples
    longer.load_state_dict(budget.state_dict())
    assert longer.max_samples == 4 * 16 + 21 * 8


def test_a_state_without_a_plan_keeps_the_position_and_plans_anew():
    sched = scheduler()
    sched.load_state_dict({"samples": 160, "last_epoch": 10})
    assert sched.samples == 160 and sched.total_samples == 640
    with pytest.raises(ValueError, match="earlier version"):
        sched.load_state_dict({"last_epoch": 3, "lr_lambdas": [None]})   # a LambdaLR's state
