"""Each ablation flag and baseline changes the model as it says (module structure, parameters, routing)."""
import pytest
import torch
from deepspeed.moe.sharded_moe import MOELayer

from mmolre.config import ModelConfig
from mmolre.losses import compute_loss
from mmolre.model import MMoLRE, count_parameters
from mmolre.model.experts import expert_parameter_count
from tests import dist_helpers as h

SHAPES = {"text": (6, 8), "audio": (5, 4)}
BASE = dict(d_model=16, blocks=2, num_experts=4, top_k=2, expert_rank=4, dropout=0.0)


def build(**kw):
    torch.manual_seed(0)
    model = MMoLRE(ModelConfig(**{**BASE, **kw}), SHAPES)
    model.init_shared_experts(0, 0)
    return model


def run(model, n=6):
    batch = h.fixed_batch(n=n)
    return model(batch.features, batch.masks), batch


def moe_layers(model):
    """DeepSpeed's MoE layers (MOELayer: inside `MoE` on the stock path, inside ExpertParallelMoE on the fast one)."""
    return [m for m in model.modules() if isinstance(m, MOELayer)]


def test_full_model_has_moe_and_task_experts():
    model = build()
    assert len(moe_layers(model)) == 4
    assert all(b.task_specific is not None for _, b in model.moe_blocks())


def test_without_shared_experts_there_is_no_moe_layer():
    full, ablated = count_parameters(build()), build(shared_experts=False)
    assert moe_layers(ablated) == []
    assert count_parameters(ablated)["expert"] == 0
    assert count_parameters(ablated)["total"] < full["total"]
    out, _ = run(ablated)
    assert out.sentiment.shape == (6,)


def test_without_task_experts_only_shared_experts_remain():
    model = build(task_experts=False)
    assert all(b.task_specific is None for _, b in model.moe_blocks()) and len(moe_layers(model)) == 4


def test_without_routers_every_row_visits_every_expert_with_equal_weight():
    model = build(routers=False)
    gate = next(model.moe_blocks())[1].moe.deepspeed_moe.gate
    assert len(gate.routers) == 0 and model.cfg.effective_top_k == 4
    seen = []
    gate.register_forward_hook(lambda module, args, output: seen.append(output))
    out, _ = run(model, n=6)
    _, _, _, indices, _, combine_weights, _ = seen[0]
    # 6 utterances x 2 tasks, each row routed to all 4 experts and mixed with weight 1/4 each
    assert indices.shape == (4, 12) and all(sorted(col) == [0, 1, 2, 3] for col in indices.t().tolist())
    torch.testing.assert_close(combine_weights, torch.full((4, 12), 0.25))
    assert torch.allclose(out.aux_loss, torch.ones_like(out.aux_loss))   # a uniform mixture is balanced


def test_full_rank_experts_have_rank_d():
    low, full = count_parameters(build()), count_parameters(build(full_rank=True))
    assert low["per_expert"] == expert_parameter_count(16, 4)
    assert full["per_expert"] == expert_parameter_count(16, 16) == 4 * 16 * 16 + 2 * 16
    assert full["expert"] == low["full_rank_expert_equivalent"]


def test_one_block_halves_the_moe_layers():
    assert len(moe_layers(build(blocks=1))) == 2


def test_concat_fusion_replaces_task_adaptive_fusion():
    from mmolre.model.fusion import ConcatFusion, TaskAdaptiveFusion
    model = build(fusion="concat")
    assert all(isinstance(f, ConcatFusion) for f in model.fusion)
    assert not any(isinstance(m, TaskAdaptiveFusion) for m in model.modules())
    out, _ = run(model)
    assert torch.allclose(out.modality_weights, torch.full_like(out.modality_weights, 0.5))


@pytest.mark.parametrize("task, trained, idle", [("sentiment", "sentiment_head", "emotion_head"),
                                                 ("emotion", "emotion_head", "sentiment_head")])
def test_single_task_training_gives_the_other_head_no_gradient(task, trained, idle):
    model = build()
    out, batch = run(model)
    compute_loss(out, batch, aux_weight=0.01, emotion_weight=1.0, tasks=task).total.backward()
    assert getattr(model, trained)[-1].weight.grad.abs().sum() > 0
    assert getattr(model, idle)[-1].weight.grad.abs().sum() == 0


def test_hard_sharing_baseline_has_one_shared_stream_and_no_experts():
    model = build(model="hard_sharing")
    assert model.num_streams == 1 and len(model.fusion) == 1 and moe_layers(model) == []
    out, _ = run(model)
    assert out.sentiment.shape == (6,) and out.emotion_logits.shape == (6, 6)


def test_mmoe_baseline_is_a_dense_softmax_mixture_without_task_experts():
    model = build(model="mmoe")
    gate = next(model.moe_blocks())[1].moe.deepspeed_moe.gate
    assert len(gate.routers) == 2 and gate.k == 4
    assert all(b.task_specific is None for _, b in model.moe_blocks())
    out, _ = run(model)
    assert torch.all(out.expert_load == 6)   # dense: every row reaches every expert


@pytest.mark.parametrize("tasks", ["both", "sentiment", "emotion"])
def test_a_single_task_run_selects_its_checkpoint_on_its_own_task(tasks):
    """The validation loss that chooses the checkpoint counts only the trained task: an untrained head's
    loss (here the emotion probabilities of a sentiment-only run) must not decide."""
    import numpy as np
    from mmolre.config import RunConfig
    from mmolre.evaluate import _score
    cfg = RunConfig()
    cfg.train.tasks = tasks
    rng = np.random.default_rng(0)
    n = 40
    preds = {"ids": [str(i) for i in range(n)], "sentiment_pred": rng.normal(size=n),
             "sentiment_true": rng.normal(size=n), "emotion_true": (rng.random((n, 6)) > 0.7) * 1.0,
             "has_emotion": np.ones(n)}
    losses = []
    for emotion_prob in (np.full((n, 6), 0.3), rng.random((n, 6))):   # a sensible and a random emotion head
        loss, metrics = _score({**preds, "emotion_prob": emotion_prob}, cfg)
        expected = {"both": metrics["sentiment"]["mae"] + metrics["emotion"]["bce"],
                    "sentiment": metrics["sentiment"]["mae"], "emotion": metrics["emotion"]["bce"]}[tasks]
        assert loss == pytest.approx(expected) and metrics["loss"] == loss
        losses.append(loss)
    assert (losses[0] == losses[1]) == (tasks == "sentiment")
