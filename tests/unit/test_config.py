import json

import pytest

from mmolre.config import ConfigError, RunConfig, TrainConfig, parse_args
from mmolre.distributed import choose_ep_size
from mmolre.engine import load_ds_config


@pytest.mark.parametrize("argv, message", [
    (["--num_experts", "6", "--ep_size", "4"], "--num_experts 6 is not divisible by --ep_size 4"),
    (["--top_k", "9"], "--top_k 9 must be between 1 and --num_experts 8"),
    (["--modalities", "text,smell"], "--modalities: unknown ['smell']"),
    (["--ds_config", "nope.json"], "--ds_config: no such file 'nope.json'"),
    (["--capacity_factor", "-1"], "--capacity_factor must be >= 0"),
    (["--on_nonfinite", "ignore"], "--on_nonfinite must be 'stop' or 'skip'"),
    (["--router_noise", "--capacity_factor", "1"], "--router_noise with --capacity_factor > 0"),
    (["--reshard_only"], "--reshard_only needs --resume"),
    (["--ep_size", "4", "--num_experts", "8"], "--ep_size 4 does not divide the world size 2"),
])
def test_impossible_flags_fail_with_a_clear_message(argv, message, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    assert message in str(e.value)


def test_flags_are_read_for_another_world_size_and_never_abbreviated(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")   # a benchmark in one process checking flags for a 2-process run
    assert parse_args(["--ep_size", "2"], world_size=2).train.ep_size == 2
    with pytest.raises(ConfigError, match="does not divide the world size 2"):
        parse_args(["--ep_size", "4"], world_size=2)
    with pytest.raises(SystemExit):   # a prefix of --seed is a typo, not --seed
        parse_args(["--see", "3"])
    assert "unrecognized arguments: --see 3" in capsys.readouterr().err


def test_flags_fill_the_dataclasses_and_round_trip():
    cfg = parse_args(["--num_experts", "16", "--top_k", "1", "--resume", "--modalities", "text", "--local_rank=1"])
    assert cfg.model.num_experts == 16 and cfg.model.top_k == 1 and cfg.train.resume is True
    assert cfg.data.modality_list == ["text"]
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("requested, world, experts, per_node, expected", [
    (0, 2, 8, 2, 2), (0, 1, 8, 1, 1), (0, 16, 64, 8, 8), (0, 8, 6, 8, 2), (0, 4, 7, 4, 1), (2, 4, 8, 4, 2),
    (0, 12, 4, 3, 1)])   # 3 ranks a node: a group of 2 consecutive ranks would span two nodes
def test_expert_parallel_size_rule(requested, world, experts, per_node, expected):
    assert choose_ep_size(requested, world, experts, per_node) == expected


def test_expert_parallel_size_must_divide_the_world():
    with pytest.raises(ValueError, match="--ep_size 4 does not divide the world size 2"):
        choose_ep_size(4, 2, 8, 2)


def _ds(tmp_path, content):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return TrainConfig(ds_config=str(path))


@pytest.mark.parametrize("content, message", [
    ({"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}},
     "ZeRO stage 3"),
    ({"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 4, "fp16": {"enabled": True}}, "fp16"),
    ({"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "Adam"}},
     "remove the 'optimizer' section"),
    ({"train_micro_batch_size_per_gpu": 4}, "set 'gradient_clipping' explicitly"),
    ({"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 4, "zero_optimisation": {"stage": 2}},
     "unknown key 'zero_optimisation' \\(did you mean 'zero_optimization'\\?\\)"),
    ({"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 4, "train_batch_size": 12},
     "train_batch_size 12 != micro batch 4 x accumulation 1 x world size 2 = 8"),
    ({"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}},
     "bf16 with ZeRO stage 0 is not supported with MoE layers"),
    ({"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 4, "bfloat16": {"enabled": True}},
     "bfloat16 with ZeRO stage 0 is not supported with MoE layers"),
    ({"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 4, "compile": {"enabled": True}},
     "remove the 'compile' section"),
    ({"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 4, "use_data_before_expert_parallelism": True},
     "use_data_before_expert_parallelism is not supported"),
    ({"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 0},
     "gradient_accumulation_steps must be an integer >= 1"),
])
def test_deepspeed_config_problems_are_named(tmp_path, content, message):
    with pytest.raises(ConfigError, match=message):
        load_ds_config(_ds(tmp_path, content), world_size=2, on_gpu=False)


def test_deepspeed_config_overrides(tmp_path):
    cfg = _ds(tmp_path, {"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 4, "train_batch_size": 64,
                         "tensorboard": {"enabled": True, "output_path": "x"}})
    cfg.batch_size = 16
    ds = load_ds_config(cfg, world_size=4, on_gpu=False)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["train_batch_size"] == 64
    cfg.grad_accum, cfg.batch_size = 2, 8
    ds = load_ds_config(cfg, world_size=4, on_gpu=False)   # micro 8 x 2 x 4 ranks: still 64
    assert ds["gradient_accumulation_steps"] == 2 and ds["train_batch_size"] == 64
    assert ds["tensorboard"] == {"enabled": False, "output_path": "x"}   # one TensorBoard run: the trainer's


def test_shipped_configs_pass_the_checks():
    for name in ("zero0", "zero1", "zero2"):
        load_ds_config(TrainConfig(ds_config=f"ds_configs/{name}.json"), world_size=2, on_gpu=False)
    load_ds_config(TrainConfig(ds_config="ds_configs/zero2_bf16.json"), world_size=8, on_gpu=True)
