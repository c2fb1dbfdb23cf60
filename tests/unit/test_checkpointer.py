"""What a checkpoint's marker must agree with before a resume: `checkpointer.check_resume_compatible`, a pure
function, against the marker of a checkpoint written before the training loop was split into modules."""
import json
import os
import shutil

import pytest

from mmolre.checkpointer import check_resume_compatible, checkpoint_layout, recorded_steps
from mmolre.config import ConfigError, parse_args

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "run_format2")
SHAPES = {"text": (50, 64), "audio": (50, 74), "vision": (50, 35)}


def fixture_marker() -> dict:
    with open(os.path.join(FIXTURE, "checkpoints", "step00000006", "mmolre_complete.json")) as f:
        return json.load(f)


def cfg(*flags):
    return parse_args(["--num_experts", "8", *flags], world_size=2)


def check(marker, c, tokens=None, saved_steps=None):
    layout = checkpoint_layout(c, tokens, SHAPES)
    check_resume_compatible(marker, layout, c, saved_steps or marker.get("steps"), "runs/r/checkpoints/step00000006")


def test_the_checkpoint_written_before_the_split_is_compatible_with_its_own_settings():
    marker = fixture_marker()
    assert marker["format"] == 2 and marker["world_size"] == 2
    check(marker, cfg())
    layout = checkpoint_layout(cfg(), None, SHAPES)
    assert {k: layout[k] for k in ("balance", "router_groups", "text_encoder", "text_tokens", "steps")} == \
        {k: marker[k] for k in ("balance", "router_groups", "text_encoder", "text_tokens", "steps")}
    assert layout["expert_store"] == "banks" and "expert_store" not in marker   # format 2: DeepSpeed's files
    check(marker, cfg("--grouped_experts", "false"))                            # which both paths read


def test_a_checkpoint_of_a_newer_format_is_refused():
    with pytest.raises(ConfigError, match=r"written by a newer version of the trainer \(checkpoint format 99"):
        check({**fixture_marker(), "format": 99}, cfg())


def test_switching_aux_free_or_router_groups_is_refused_but_aux_to_none_is_not():
    marker = fixture_marker()
    with pytest.raises(ConfigError, match="saved with --balance aux and no --router_lr_scale other than 1; this run has "
                                          "--balance aux_free"):
        check(marker, cfg("--balance", "aux_free"))
    with pytest.raises(ConfigError, match="--router_lr_scale 3.0"):
        check(marker, cfg("--router_lr_scale", "3"))
    check(marker, cfg("--balance", "none"))   # no buffer, no own groups either way: the same layout
    older = {k: v for k, v in marker.items() if k not in ("balance", "router_groups")}   # markers before the keys
    check(older, cfg())


def test_switching_the_text_encoder_on_or_off_or_retokenizing_is_refused(tiny_encoder):
    from mmolre.data.tokens import TextTokens
    marker = fixture_marker()
    encoder = cfg("--dataset", "mosi", "--data_path", "x.pkl", "--text_encoder", tiny_encoder, "--finetune_text",
                  "--text_max_length", "8")
    tokens = TextTokens(tiny_encoder, 8)
    with pytest.raises(ConfigError, match="saved without --finetune_text; this run has it"):
        check(marker, encoder, tokens)
    tuned = {**marker, "text_encoder": tiny_encoder, "text_tokens": tokens.key()}
    with pytest.raises(ConfigError, match="--finetune_text; this run has not"):
        check(tuned, cfg())
    with pytest.raises(ConfigError, match="another tokenizer or --text_max_length"):
        check(tuned, encoder, TextTokens(tiny_encoder, 9))
    check(tuned, encoder, tokens)


def test_switching_where_the_experts_live_is_refused():
    marker = {**fixture_marker(), "format": 3, "expert_store": "banks"}
    check(marker, cfg())
    with pytest.raises(ConfigError, match=r"keeps its shared experts in expert banks \(--grouped_experts true\); this "
                                          r"run has --grouped_experts False"):
        check(marker, cfg("--grouped_experts", "false"))
    with pytest.raises(ConfigError, match="DeepSpeed's expert parameters"):
        check({**marker, "expert_store": "deepspeed"}, cfg())


def test_lazy_to_dense_expert_adamw_is_refused_but_dense_to_lazy_is_not():
    marker = {**fixture_marker(), "format": 3, "expert_store": "banks", "expert_optimizer": "lazy"}
    check(marker, cfg("--expert_optimizer", "lazy"))
    with pytest.raises(ConfigError, match=r"trained with --expert_optimizer lazy.*Resume with --expert_optimizer lazy"):
        check(marker, cfg())
    check({**marker, "expert_optimizer": "dense"}, cfg("--expert_optimizer", "lazy"))
    check({k: v for k, v in marker.items() if k != "expert_optimizer"}, cfg())   # markers before the key


def test_other_time_steps_per_modality_are_refused():
    marker = fixture_marker()
    with pytest.raises(ConfigError, match=r"trained on \{'text': 50, 'audio': 50, 'vision': 50\} time steps per "
                                          r"modality, this run has \{'text': 10, 'audio': 10, 'vision': 10\}"):
        check(marker, cfg("--temporal_steps", "10"))


def test_steps_of_a_marker_without_them_come_from_the_runs_recorded_config(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    assert recorded_steps(str(run), SHAPES) == {"text": 50, "audio": 50, "vision": 50}
    config = json.loads((run / "config.json").read_text())
    del config["model"]["temporal_steps"]    # a run from before --temporal_steps pooled nothing
    (run / "config.json").write_text(json.dumps(config))
    long = {"text": (50, 64), "audio": (375, 5)}
    assert recorded_steps(str(run), long) == {"text": 50, "audio": 375}
    assert recorded_steps(str(tmp_path / "missing"), long) == {"text": 50, "audio": 375}


def _engine_with(optimizer, clipping=1.0):
    """What apply_hyperparameters reads of a DeepSpeed engine: the torch optimizer its schedule steps, the wrapper
    optimizer (ZeRO's holds clip_grad), the configured clipping."""
    from types import SimpleNamespace
    return SimpleNamespace(lr_scheduler=SimpleNamespace(optimizer=optimizer),
                           optimizer=SimpleNamespace(clip_grad=0.5), gradient_clipping=lambda: clipping)


def test_a_resume_puts_this_runs_weight_decay_and_clipping_on_the_restored_groups():
    import torch
    from mmolre.checkpointer import apply_hyperparameters, optimizer_hyperparameters
    from mmolre.engine import optimizer_groups
    from mmolre.model import MMoLRE
    model = MMoLRE(cfg("--grouped_experts", "false").model, {"text": (5, 6)}, ep_size=1)   # experts in ZeRO's groups
    fresh = torch.optim.AdamW(optimizer_groups(model, 0.3, lr=1e-3), lr=1e-3)
    engine = _engine_with(fresh)
    this_run = optimizer_hyperparameters(engine)
    saved = torch.optim.AdamW(optimizer_groups(model, 0.01, lr=1e-3), lr=1e-3, betas=(0.8, 0.9))
    fresh.load_state_dict(saved.state_dict())            # what DeepSpeed's full load does to the groups
    assert [g["weight_decay"] for g in fresh.param_groups] == [0.01, 0.0, 0.01, 0.0]
    assert [g["name"] for g in fresh.param_groups][2:] == ["ep_size_1", "ep_size_1"]   # DeepSpeed's expert names
    apply_hyperparameters(engine, this_run)
    assert [g["weight_decay"] for g in fresh.param_groups] == [0.3, 0.0, 0.3, 0.0]
    assert all(g["betas"] == (0.9, 0.999) for g in fresh.param_groups) and engine.optimizer.clip_grad == 1.0


def test_groups_that_are_not_this_runs_are_refused():
    import torch
    from mmolre.checkpointer import apply_hyperparameters, optimizer_hyperparameters
    from mmolre.engine import optimizer_groups
    from mmolre.model import MMoLRE
    model = MMoLRE(cfg("--grouped_experts", "false").model, {"text": (5, 6)}, ep_size=1)
    engine = _engine_with(torch.optim.AdamW(optimizer_groups(model, 0.01, lr=1e-3), lr=1e-3))
    wanted = optimizer_hyperparameters(engine)
    swapped = [wanted[0], wanted[1], wanted[3], wanted[2]]   # expert decay and no-decay groups in another order
    with pytest.raises(ConfigError, match="the checkpoint's optimizer groups"):
        apply_hyperparameters(engine, swapped)
    with pytest.raises(ConfigError):
        apply_hyperparameters(engine, wanted[:3])
