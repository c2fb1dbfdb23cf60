"""The benchmarks reuse a finished run only if it was made with the settings asked for now."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench.reuse import StaleRunError, finished_run  # noqa: E402
from mmolre.config import parse_args  # noqa: E402
from mmolre.engine import load_ds_config  # noqa: E402

FLAGS = ["--dataset", "mosi", "--data_path", "data/mosi.pkl", "--modalities", "text", "--seed", "2"]


def finished(run_dir, flags, world_size=1, edit=None, start_in=None, monkeypatch=None):
    """A run directory as train.py leaves it: config.json (the validated flags, started from `start_in`, and
    the resolved DeepSpeed config) and results.json."""
    if start_in:
        monkeypatch.chdir(start_in)   # the trainer records --ds_config absolute when started elsewhere
    cfg = parse_args(flags)
    ds = load_ds_config(cfg.train, world_size, on_gpu=False)
    config = {**cfg.to_dict(), "ds_config": ds}
    if edit:
        edit(config)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump({"world_size": world_size}, f)
    monkeypatch and monkeypatch.chdir(ROOT)


def test_a_run_with_the_same_settings_is_reused_wherever_it_lives(tmp_path, monkeypatch):
    encoder = tmp_path / "encoder"
    encoder.mkdir()
    flags = [*FLAGS, "--d_model", "32", "--finetune_text"]
    # started from another directory (the encoder named relative to it): the trainer made --ds_config and
    # --text_encoder absolute
    finished(tmp_path / "a", [*flags, "--text_encoder", "encoder", "--output_dir", "/elsewhere", "--run_name", "old",
                              "--log_every", "5"], start_in=tmp_path, monkeypatch=monkeypatch)
    flags += ["--text_encoder", os.path.relpath(encoder, ROOT)]   # the benchmarks launch from the repository
    saved = json.load(open(tmp_path / "a" / "config.json"))
    assert os.path.isabs(saved["train"]["ds_config"]) and os.path.isabs(saved["model"]["text_encoder"])
    assert finished_run(str(tmp_path / "a"), [*flags, "--output_dir", str(tmp_path), "--run_name", "a"], 1)
    assert not finished_run(str(tmp_path / "never_ran"), FLAGS, 1)


def test_a_run_made_with_other_settings_is_refused_and_kept(tmp_path):
    finished(tmp_path / "lr", [*FLAGS, "--lr", "1e-3"])
    with pytest.raises(StaleRunError, match=r"--lr: 0\.001 there, 0\.002 now"):
        finished_run(str(tmp_path / "lr"), FLAGS, 1)
    # a default that changed since the run (dropout was 0.1), a flag added since whose older behaviour is known
    # (no --temporal_steps: no pooling), and a setting its version did not record
    finished(tmp_path / "old", FLAGS, edit=lambda c: (c["model"].update(dropout=0.1), c["model"].pop("temporal_steps"),
                                                      c["train"].pop("expert_optimizer")))
    with pytest.raises(StaleRunError) as error:
        finished_run(str(tmp_path / "old"), FLAGS, 1)
    assert "--dropout: 0.1 there, 0.0 now" in str(error.value)
    assert "--temporal_steps: 0 there, 50 now" in str(error.value)
    assert "--expert_optimizer: not recorded there (an older version's run), 'dense' now" in str(error.value)
    assert os.path.isfile(tmp_path / "old" / "results.json")
    # flags added since, read as the run behaved (--balance_bias_update sign, no --patience): reused when asked
    # for that, refused under today's default
    sign = [*FLAGS, "--balance_bias_update", "sign"]
    finished(tmp_path / "before", sign, edit=lambda c: (c["model"].pop("balance_bias_update"), c["train"].pop("patience")))
    assert finished_run(str(tmp_path / "before"), sign, 1)
    with pytest.raises(StaleRunError, match="--balance_bias_update: 'sign' there, 'relative' now"):
        finished_run(str(tmp_path / "before"), FLAGS, 1)
    # the same flags on another world size, or with another micro batch in the DeepSpeed config
    finished(tmp_path / "world", FLAGS, world_size=2)
    with pytest.raises(StaleRunError, match="world size 2 there, 1 now"):
        finished_run(str(tmp_path / "world"), FLAGS, 1)
    finished(tmp_path / "micro", FLAGS, edit=lambda c: c["ds_config"].update(train_micro_batch_size_per_gpu=8))
    with pytest.raises(StaleRunError, match="the resolved DeepSpeed config"):
        finished_run(str(tmp_path / "micro"), FLAGS, 1)


def test_a_run_on_a_file_whose_content_changed_is_refused(tmp_path):
    data = tmp_path / "mosi.pkl"
    data.write_bytes(b"first version")
    flags = [*FLAGS[:2], "--data_path", str(data)]
    finished(tmp_path / "a", flags)
    results = tmp_path / "a" / "results.json"
    from mmolre.data.cache import file_sha256
    json.dump({"world_size": 1, "data": {"mosi": {"sha256": file_sha256(str(data))}}}, open(results, "w"))
    assert finished_run(str(tmp_path / "a"), flags, 1)
    data.write_bytes(b"second version")
    with pytest.raises(StaleRunError, match="content changed"):
        finished_run(str(tmp_path / "a"), flags, 1)


def test_a_run_from_before_the_evaluation_batch_flag_is_reused_unless_an_evaluation_capacity_makes_it_matter(
        tmp_path):
    """--eval_batch_size only regroups the evaluation forwards, so a run that did not record it counts as today's;
    under an evaluation capacity a prediction depends on its batch, and the batch is compared."""
    finished(tmp_path / "before", FLAGS, edit=lambda c: c["train"].pop("eval_batch_size"))
    assert finished_run(str(tmp_path / "before"), FLAGS, 1)
    assert finished_run(str(tmp_path / "before"), [*FLAGS, "--eval_batch_size", "64"], 1)
    capacity = [*FLAGS, "--eval_capacity_factor", "1.0"]
    finished(tmp_path / "capacity", capacity, edit=lambda c: c["train"].pop("eval_batch_size"))
    with pytest.raises(StaleRunError, match="--eval_batch_size: not recorded there"):
        finished_run(str(tmp_path / "capacity"), capacity, 1)
