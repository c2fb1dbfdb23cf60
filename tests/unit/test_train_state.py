"""The run's progress as a checkpoint carries it (`train_state.TrainState`)."""
import json
import os

import torch

from mmolre.train_state import TrainState

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "run_format2")


def test_the_state_of_a_checkpoint_written_before_the_split_reads_back():
    tag = os.path.join(FIXTURE, "checkpoints", "step00000006")
    client = torch.load(os.path.join(tag, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    with open(os.path.join(tag, "mmolre_complete.json")) as f:
        marker = json.load(f)
    saved = client["train_state"]
    state = TrainState.from_client_state(saved, marker, micro_batch=8)
    assert (state.epoch, state.epoch_samples, state.global_step) == (0, 96, 6)
    assert state.train_samples == 96 and state.schedule["samples"] == 96
    assert saved["epoch_load"].shape == (6, 2, 8)          # the epoch's loads travel beside it (expert_loads.py)
    assert not hasattr(state, "epoch_load")


def test_a_checkpoint_that_counted_batches_resumes_at_the_same_sample():
    """Older checkpoints stored the epoch position in batches of their own world size."""
    state = TrainState.from_client_state({"epoch_step": 5, "global_step": 5, "unknown_key": 1},
                                         {"world_size": 4, "micro_batch": 8}, micro_batch=16)
    assert state.epoch_samples == 5 * 8 * 4 and state.global_step == 5


def test_the_best_validation_selects_the_checkpoint():
    state = TrainState()
    state.epoch = 1
    assert state.record_validation("step00000010", 0.9)
    state.epoch = 2
    assert not state.record_validation("step00000020", 0.95)
    state.epoch = 3
    assert state.record_validation("step00000030", 0.5)
    assert (state.best_tag, state.best_epoch, state.best_valid_loss) == ("step00000030", 3, 0.5)
