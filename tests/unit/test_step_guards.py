"""Stop requests, non-finite losses and the fault hooks (`step_guards.py`), at world size 1."""
import signal

import pytest
import torch

from mmolre.data.loader import Batch
from mmolre.distributed import DistInfo
from mmolre.step_guards import FAULT_STOP_STEP, FaultHooks, NonFiniteLoss, StepGuards

ONE = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1)


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """StepGuards installs SIGTERM/SIGUSR1 handlers; the test process gets its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def batch(ids):
    n = len(ids)
    return Batch(ids=ids, features={}, masks={}, sentiment=torch.zeros(n), emotions=torch.zeros(n, 6),
                 has_emotion=torch.zeros(n, dtype=torch.bool), valid=torch.tensor([i != "" for i in ids]))


def test_the_hooks_come_from_the_environment():
    hooks = FaultHooks.from_env({"MMOLRE_FAULT_NAN_STEP": "3", "MMOLRE_FAULT_NAN_RANK": "1",
                                 "MMOLRE_FAULT_STOP_STEP": "7"})
    assert hooks == FaultHooks(nan_micro_batch=3, nan_rank=1, stop_step=7)
    assert FaultHooks.from_env({}) == FaultHooks()


def test_the_nan_hook_hits_the_nth_micro_batch_of_its_rank_only():
    guards = StepGuards("stop", FaultHooks(nan_micro_batch=2, nan_rank=0))
    losses = [guards.inject_faults(torch.tensor(1.0), ONE, global_step=0) for _ in range(3)]
    assert [bool(torch.isfinite(x)) for x in losses] == [True, False, True]
    other_rank = StepGuards("stop", FaultHooks(nan_micro_batch=1, nan_rank=1))
    assert torch.isfinite(other_rank.inject_faults(torch.tensor(1.0), ONE, 0))


def test_a_stop_is_requested_once_the_hooks_step_is_reached_and_all_ranks_agree():
    guards = StepGuards("stop", FaultHooks(stop_step=3))
    guards.inject_faults(torch.tensor(1.0), ONE, global_step=1)
    assert guards.agree(torch.tensor(1.0), ONE) == (False, False)
    guards.inject_faults(torch.tensor(1.0), ONE, global_step=2)          # this micro batch makes step 3
    assert guards.agree(torch.tensor(float("inf")), ONE) == (True, True)
    assert guards.stop_reason == FAULT_STOP_STEP


def test_a_signal_is_a_stop_request():
    guards = StepGuards("stop", FaultHooks())
    signal.raise_signal(signal.SIGUSR1)
    assert guards.agree(torch.tensor(1.0), ONE) == (False, True) and guards.stop_reason == "SIGUSR1"


def test_a_nonfinite_loss_stops_naming_the_real_samples_or_is_skipped(capsys):
    where = "step 3 (epoch 1, micro batch 3)"
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 3 \(epoch 1, micro batch 3\); the weights were "
                                            r"not updated. Samples of the batch: \['v\$_\$1', 'v\$_\$2'\]"):
        StepGuards("stop", FaultHooks()).nonfinite(torch.tensor(float("nan")), batch(["v$_$1", "v$_$2", ""]), ONE,
                                                   where)
    StepGuards("skip", FaultHooks()).nonfinite(torch.tensor(float("nan")), batch(["v$_$1"]), ONE, where)
    assert "warning: skipped a non-finite loss at step 3" in capsys.readouterr().out
