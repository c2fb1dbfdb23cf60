"""A step's losses, timing and routing as TensorBoard gets them (`step_metrics.py`), at world size 1."""
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mmolre.config import ModelConfig
from mmolre.distributed import DistInfo
from mmolre.losses import LossParts
from mmolre.model import MMoLRE
from mmolre.monitor import Monitor
from mmolre.step_metrics import StepMetrics, reduce_routing_over_ranks
from mmolre.train_state import TrainState

ONE = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1)


def loss(total):
    t = torch.tensor(float(total))
    return LossParts(total=t, sentiment=t / 2, emotion=t / 4, aux=t / 8, z=torch.tensor(0.0))


def model_output():
    torch.manual_seed(0)
    model = MMoLRE(ModelConfig(d_model=8, blocks=1, num_experts=4, expert_rank=2), {"text": (5, 6), "audio": (4, 3)})
    features = {"text": torch.randn(3, 5, 6), "audio": torch.randn(3, 4, 3)}
    masks = {m: torch.ones(3, x.shape[1], dtype=torch.bool) for m, x in features.items()}
    return model(features, masks)


def test_a_steps_losses_are_the_mean_of_its_counted_micro_batches_and_reach_tensorboard(tmp_path):
    monitor = Monitor(str(tmp_path))
    metrics = StepMetrics(monitor, ONE, samples_per_step=64, has_emotions=True, modalities=["text", "audio"])
    metrics.micro_batch(loss(2.0), counted=True, seconds=0.5)
    metrics.micro_batch(loss(float("nan")), counted=False, seconds=0.25)   # a skipped non-finite micro batch
    metrics.micro_batch(loss(4.0), counted=True, seconds=0.25)
    assert metrics.close_window(stepped=True) == 1.0
    assert metrics.due(10, log_every=10) and not metrics.due(9, log_every=10)
    state = TrainState(epoch=1, train_samples=640)
    out = model_output()
    metrics.log(10, state, out, {"train/lr": 1e-3}, grad_norm=0.7, bar=None)
    monitor.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    value = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}
    assert value["loss/total"] == 3.0 and value["loss/sentiment"] == 1.5 and value["loss/emotion"] == 0.75
    assert abs(value["train/samples_per_s"] - 64.0) < 1e-6      # one 64-sample step in 1 s
    assert abs(value["train/grad_norm"] - 0.7) < 1e-6 and value["train/samples"] == 640
    aux, _, _, weights, load = reduce_routing_over_ranks(out, ONE)
    assert abs(value["moe/text.0/sentiment/aux_loss"] - aux[0, 0]) < 1e-6
    assert abs(value["modality_weight/emotion/audio"] - weights[1, 1]) < 1e-6
    assert load[0, 0].sum() == 3 * 2                             # 3 utterances x top-2 for each task
    assert metrics.log_steps == 0 and metrics.log_seconds == 0.0  # throughput restarts after each log


def test_a_window_that_was_not_applied_does_not_count_towards_throughput():
    metrics = StepMetrics(Monitor(None), ONE, samples_per_step=64, has_emotions=False, modalities=["text"])
    metrics.micro_batch(loss(1.0), counted=False, seconds=2.0)
    metrics.close_window(stepped=False)
    assert metrics.log_steps == 0 and metrics.log_seconds == 0.0 and not metrics.due(10, 10)
