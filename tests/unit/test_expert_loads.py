"""The one owner of the epoch's expert loads, the routing record of an epoch, and aux_free's nudges
(`expert_loads.py`), at world size 1 (the 2-process behaviour: tests/system/test_fault_tolerance.py)."""
import numpy as np
import torch

from mmolre.config import ModelConfig
from mmolre.distributed import DistInfo
from mmolre.evaluate import EvalResult
from mmolre.expert_loads import (EpochExpertLoads, SelectionBiasNudges, dead_experts_by_layer, epoch_load_record,
                                 routing_record)
from mmolre.model import MMoLRE

ONE = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1)


def test_loads_are_counted_once_across_a_checkpoint_and_cleared_at_the_epochs_end():
    loads = EpochExpertLoads((2, 2, 4), torch.device("cpu"), ONE)
    assert loads.collect_for_checkpoint() is None and loads.end_epoch() is None   # nothing routed yet
    a, b = torch.arange(16.).view(2, 2, 4), torch.ones(2, 2, 4)
    loads.add(a)
    saved = loads.collect_for_checkpoint()
    assert torch.equal(saved, a)
    loads.add(b)                                             # counting goes on from the saved total
    assert np.array_equal(loads.end_epoch(), (a + b).numpy())
    assert loads.end_epoch() is None                         # the next epoch starts from nothing
    resumed = EpochExpertLoads((2, 2, 4), torch.device("cpu"), ONE)
    resumed.restore(saved)
    resumed.add(b)
    assert np.array_equal(resumed.end_epoch(), (a + b).numpy())


def test_dead_experts_are_those_no_task_sent_a_row():
    load = np.zeros((2, 2, 4))
    load[0, 0, :3] = 1        # layer 0: expert 3 dead
    load[1, 1, [0, 2]] = 5    # layer 1: experts 1 and 3 dead
    assert dead_experts_by_layer(load, ["text.0", "text.1"]) == {"text.0": 1, "text.1": 2}
    assert dead_experts_by_layer(None, ["text.0"]) is None
    assert dead_experts_by_layer(np.zeros((1, 2, 0)), ["text.0"]) is None   # no shared experts


def test_the_epoch_load_record_gives_the_worse_tasks_busiest_expert_over_the_mean():
    load = np.zeros((2, 2, 4))
    load[0, 0] = [1, 1, 1, 1]     # balanced
    load[0, 1] = [4, 0, 0, 0]     # 4 over a mean of 1
    load[1, 0] = [2, 1, 1, 0]     # 2 over 1; task 1 routed nothing (no ratio)
    record = epoch_load_record(load, ["text.0", "text.1"])
    assert record == {"dead_experts": {"text.0": 0, "text.1": 1},
                      "train_load_max_over_mean": {"text.0": 4.0, "text.1": 2.0}}
    assert epoch_load_record(None, ["text.0"]) == {}


def _valid(routes: np.ndarray) -> EvalResult:
    return EvalResult(loss=1.0, metrics={}, predictions={"ids": ["a", "b"], "routes": routes},
                      routing={"text.0": {"task_divergence": 0.1}})


def test_the_routing_record_keeps_routes_small_and_warns_of_dead_experts():
    loads = {"dead_experts": {"text.0": 2, "text.1": 0}, "train_load_max_over_mean": {"text.0": 3.0, "text.1": 1.5}}
    record, routes, warning = routing_record(_valid(np.array([[[[1, 2]]], [[[0, 3]]]])), loads, num_experts=8,
                                             epoch=3)
    assert record == {"routing": {"text.0": {"task_divergence": 0.1}}, **loads}
    assert routes["ids"] == ["a", "b"] and routes["routes"].dtype == torch.int16
    assert warning == "warning: epoch 3: shared experts that received no row: text.0 2 of 8"
    _, routes, warning = routing_record(_valid(np.zeros((2, 1, 1, 2), np.int64)), {"dead_experts": {"text.0": 0}},
                                        40_000, 1)
    assert routes["routes"].dtype == torch.int32 and warning is None
    record, routes, _ = routing_record(EvalResult(1.0, {}, {"ids": []}, None), {}, 8, 1)
    assert record == {} and routes is None


def test_aux_free_biases_move_after_an_applied_step_only():
    model = MMoLRE(ModelConfig(d_model=8, blocks=1, num_experts=4, expert_rank=2, balance="aux_free",
                               balance_bias_update="sign"),
                   {"text": (5, 6)})
    nudges = SelectionBiasNudges(model, "aux_free", ONE)
    gate = nudges.gates[0]
    counts = torch.tensor([[4., 0., 0., 0.], [1., 1., 1., 1.]])
    gate.pending_counts = counts
    nudges.after_step(stepped=False)                         # a skipped step: counts dropped, biases kept
    assert gate.pending_counts is None and gate.selection_bias.abs().sum() == 0
    gate.pending_counts = counts
    nudges.after_step(stepped=True)
    rate = gate.bias_rate
    assert torch.equal(gate.selection_bias, torch.tensor([[-rate, rate, rate, rate], [0., 0., 0., 0.]]))
    assert SelectionBiasNudges(model, "aux", ONE).gates == []


def test_a_skipped_micro_batchs_routes_leave_the_windows_aux_free_counts():
    model = MMoLRE(ModelConfig(d_model=8, blocks=1, num_experts=4, expert_rank=2, balance="aux_free",
                               balance_bias_update="sign"),
                   {"text": (5, 6)})
    nudges = SelectionBiasNudges(model, "aux_free", ONE)
    gate = nudges.gates[0]
    first, skipped = torch.tensor([[4., 0., 0., 0.], [1., 1., 1., 1.]]), torch.tensor([[0., 0., 0., 8.]] * 2)
    nudges.before_micro_batch()
    gate.pending_counts = first                      # what a micro batch's forward adds
    nudges.before_micro_batch()
    gate.pending_counts = first + skipped
    nudges.drop_micro_batch()                        # its loss was not finite
    assert torch.equal(gate.pending_counts, first)
    nudges.after_step(stepped=True)
    rate = gate.bias_rate
    assert torch.equal(gate.selection_bias, torch.tensor([[-rate, rate, rate, rate], [0., 0., 0., 0.]]))
