"""The real command line: `deepspeed --num_gpus 2 launch.py ...` with 2 CPU processes on tiny settings."""
import csv
import glob
import json
import os
import re

import pytest
import torch

from tests.launcher import run_deepspeed


def _shm_buffers():
    return set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    before = _shm_buffers()
    proc = run_deepspeed(tmp, "--run_name", "tiny", "--epochs", "1")
    return tmp, proc, tmp / "runs" / "tiny", _shm_buffers() - before


def test_a_run_leaves_no_shared_memory_behind(first_run):
    """DeepSpeed's CPU allreduce buffers (69 MB per rank) are unlinked, not left in /dev/shm."""
    assert first_run[3] == set()


def test_results_json_has_every_documented_key(first_run):
    _, proc, run, _ = first_run
    r = json.loads((run / "results.json").read_text())
    assert r["synthetic"] is True and r["world_size"] == 2 and r["ep_size"] == 2
    assert r["num_experts"] == 8 and r["top_k"] == 2
    for k in ("total", "expert", "active_per_utterance"):
        assert r["params"][k] > 0
    assert r["params"]["active_per_utterance"] < r["params"]["total"]
    assert r["train"]["seconds"] > 0 and r["train"]["samples_per_s"] > 0
    for split in ("valid", "test"):
        for k in ("has0_acc2", "has0_f1", "non0_acc2", "non0_f1", "acc5", "acc7", "mae", "corr"):
            assert isinstance(r[split]["sentiment"][k], float)
        e = r[split]["emotion"]
        for k in ("micro_f1", "jaccard_acc", "mean_wacc", "mean_wf1"):
            assert 0.0 <= e[k] <= 1.0
        assert set(e["per_emotion"]) == {"happy", "sad", "anger", "surprise", "disgust", "fear"}
        assert set(e["per_emotion"]["fear"]) == {"wacc", "wf1"}
    assert {"mean_mae", "majority_non0_acc2"} <= set(r["baselines"])
    assert r["config"]["model"]["num_experts"] == 8
    assert "SYNTHETIC DATA" in proc.stdout and "| MMoLRE |" in proc.stdout
    assert "| MMoLRE, per-emotion thresholds (valid) |" in proc.stdout and "| best constant (valid) |" in proc.stdout
    assert set(r["emotion_decisions"]["thresholds"]) == set(r["test"]["emotion"]["per_emotion"])


def test_predictions_cover_the_test_split_once(first_run):
    _, _, run, _ = first_run
    r = json.loads((run / "results.json").read_text())
    with open(run / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == r["test"]["samples"] == len({row["id"] for row in rows})
    assert {"id", "sentiment_true", "sentiment_pred", "happy_prob", "fear_true"} <= set(rows[0])


def test_tensorboard_has_per_task_aux_losses_and_routing(first_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    _, _, run, _ = first_run
    tags = set()
    for root, _, files in os.walk(run / "tensorboard"):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(root, size_guidance={"scalars": 0, "histograms": 0})
            acc.Reload()
            tags |= set(acc.Tags()["scalars"]) | set(acc.Tags()["histograms"])
    for layer in ("text.0", "text.1", "audio.0", "vision.1"):
        for task in ("sentiment", "emotion"):
            assert f"moe/{layer}/{task}/aux_loss" in tags
            assert f"moe/{layer}/{task}/router_entropy" in tags
            assert f"moe/{layer}/{task}/rows/expert_000" in tags
            assert f"moe/{layer}/{task}/rows_per_expert" in tags
    for tag in ("loss/sentiment", "loss/emotion", "loss/aux", "train/lr", "train/samples_per_s",
                "metrics/valid/sentiment/mae", "metrics/valid/emotion/micro_f1", "modality_weight/emotion/audio"):
        assert tag in tags
    # TensorBoard lists the groups alphabetically: the losses and the validation metrics come first, the
    # hundreds of per-layer moe/ and routing/ cards after them (issue 24, item 5)
    from mmolre.tensorboard_tags import ORDER
    groups = sorted({t.split("/")[0] for t in tags})
    assert groups == list(ORDER) and groups[:2] == ["loss", "metrics"]
    assert all(t.startswith("metrics/valid/") for t in tags if t.split("/")[0] == "metrics")   # valid alone there


def test_one_tensorboard_run_with_the_runs_hyper_parameters_and_final_metrics(first_run):
    """Issue 24: one run per training run (DeepSpeed's own monitor off), and the HParams tab's records in it,
    read back from the event file: the hyper-parameters and the final metrics, equal to results.json's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    _, _, run, _ = first_run
    event_dirs = {root for root, _, files in os.walk(run / "tensorboard")
                  if any(f.startswith("events.out.tfevents") for f in files)}
    assert event_dirs == {str(run / "tensorboard")}
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    hparams = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    r = json.loads((run / "results.json").read_text())
    assert hparams["num_experts"] == r["num_experts"] and hparams["world_size"] == 2 and hparams["ep_size"] == 2
    assert hparams["balance"] == "aux" and hparams["top_k"] == r["top_k"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} >= {"metrics_final/valid_loss", "metrics_final/test_mae"}
    assert acc.Scalars("metrics_final/test_mae")[-1].value == pytest.approx(r["test"]["sentiment"]["mae"], rel=1e-6)


def test_checkpoint_holds_experts_per_global_id_in_one_file_per_rank(first_run):
    """3 modalities x 2 blocks = 6 MoE layers, 8 experts each, expert parallelism 2: each rank's file holds its
    4 experts of every layer (global ids 0-3 and 4-7), weights, moments and step counts; no per-expert file."""
    import torch
    _, _, run, _ = first_run
    tag = (run / "checkpoints" / "latest").read_text().strip()
    files = sorted(os.listdir(run / "checkpoints" / tag))
    assert not [f for f in files if f.startswith("layer_") and "_expert_" in f]
    states = [f for f in files if f.startswith("expert_state_rank")]
    assert states == ["expert_state_rank0.pt", "expert_state_rank1.pt"]
    for rank, name in enumerate(states):
        saved = torch.load(run / "checkpoints" / tag / name, weights_only=True)
        assert (saved["ep_rank"], saved["ep_size"], saved["num_experts"]) == (rank, 2, 8)
        assert len(saved["layers"]) == 6
        for values in saved["layers"].values():
            assert values["down.weight/weight"].shape[0] == values["step"].shape[0] == 4
            assert values["up.bias/exp_avg"].abs().sum() > 0 and int(values["step"].min()) > 0
    assert len(files) <= 8 * 2, files   # at most 8 files per rank, whatever the expert count


def test_resume_continues_from_the_checkpoint(first_run):
    tmp, _, run, _ = first_run
    first = json.loads((run / "results.json").read_text())
    proc = run_deepspeed(tmp, "--run_name", "tiny", "--epochs", "2", "--resume")
    assert "resumed from" in proc.stdout and "epoch 1, step" in proc.stdout
    second = json.loads((run / "results.json").read_text())
    assert second["train"]["epochs"] == 2
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][0] == first["history"][0]      # epoch 1 was not trained again
    assert second["global_step"] == 2 * first["global_step"]
    # selection on validation: the best epoch is the one with the lowest validation loss (ties: the first)
    losses = [h["valid_loss"] for h in second["history"]]
    assert second["best_epoch"] == 1 + losses.index(min(losses))
    assert second["best_checkpoint"] == f"step{second['history'][second['best_epoch'] - 1]['step']:08d}"


def test_impossible_configuration_fails_at_once(tmp_path):
    proc = run_deepspeed(tmp_path, "--num_experts", "3", "--ep_size", "2", check=False)
    assert proc.returncode != 0
    assert "--num_experts 3 is not divisible by --ep_size 2" in proc.stdout + proc.stderr


def test_a_run_that_will_not_fit_refuses_at_start_up_naming_its_estimate(tmp_path):
    """1,048,576 experts of the tiny model need about 20 GB per rank: refused before the model is built."""
    proc = run_deepspeed(tmp_path, "--num_experts", "1048576", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert re.search(r"this run needs about [\d.]+ GB \(parameters [\d.]+, gradients [\d.]+, optimizer [\d.]+, "
                     r"activations [\d.]+, runtime [\d.]+\) per rank, more than [\d.]+ GB available on this host / "
                     r"2 rank\(s\)", out), out[-3000:]
    assert not re.search(r"^run: .* \| world", out, re.M)   # refused before the model, the engine and any step
    assert not glob.glob(str(tmp_path / "runs" / "*" / "checkpoints" / "*"))


def test_the_test_pass_loads_the_selected_checkpoints_experts(tmp_path):
    """The test pass evaluates the checkpoint chosen on valid, experts included. The experts live in banks that
    DeepSpeed's weights-only load does not see: a checkpoint older than the last step must bring them back from
    its expert files (2 processes, expert parallelism 2: each rank its own share)."""
    import torch.multiprocessing as mp
    from mmolre.distributed import free_port
    from tests import dist_helpers as h
    out = tmp_path / "banks.pt"
    mp.spawn(h.selected_checkpoint_worker, args=(2, free_port(), str(tmp_path), str(out)), nprocs=2, join=True)
    ranks = torch.load(out, weights_only=False)
    assert len(ranks) == 2
    moved = False
    for record in ranks:
        for layer, saved in record["at_a"].items():
            for name, value in saved.items():
                moved |= not torch.equal(record["moved"][layer][name], value)
                assert torch.equal(record["loaded"][layer][name], value), (layer, name)
    assert moved   # the two later steps changed the experts, so the load had something to undo
