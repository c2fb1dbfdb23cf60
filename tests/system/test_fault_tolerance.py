"""Kill, stop, corrupt and resume real 2-process runs started through the `deepspeed` launcher."""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.launcher import (ROOT, complete_tags, environment, final_weights, rank_pid, results, run_deepspeed,
                            start_deepspeed, wait_for)

# aux_free balancing here (its selection biases must survive every fault); the accumulating runs below use
# the default aux loss
RUN = ["--epochs", "2", "--save_every", "4", "--keep_checkpoints", "3", "--dropout", "0.1", "--balance", "aux_free"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run."""
    tmp = tmp_path_factory.mktemp("reference")
    run_deepspeed(tmp, "--run_name", "ref", *RUN)
    return tmp, tmp / "runs" / "ref"


def test_same_seed_gives_bit_identical_metrics_and_a_converted_dataset_trains_like_its_pickle(reference,
                                                                                              tmp_path):
    """The same seed on the same data, here read from the pickle-free dataset `mmolre data convert` wrote of
    the reference's pickle: the same metrics to the last bit. (The kill/resume tests below rerun the pickle.)"""
    from mmolre.data.converted import convert
    _, ref = reference
    source = json.loads((ref / "data_meta.json").read_text())["sources"]["synthetic"]
    convert(source, str(tmp_path / "converted"))
    run_deepspeed(tmp_path, "--run_name", "again", *RUN, "--dataset", "mmsa", "--data_path", str(tmp_path / "converted"))
    again = tmp_path / "runs" / "again"
    assert results(again)["test"] == results(ref)["test"]
    assert results(again)["valid"] == results(ref)["valid"]
    assert results(again)["history"] == results(ref)["history"]
    r = results(ref)
    assert r["seed"] == 1 and r["versions"]["deepspeed"] and r["versions"]["torch"] and "git_commit" in r


def _kill_then_resume(tmp_path, ref, args):
    """SIGKILL a run somewhere after its first checkpoint, resume it, and compare with `ref` bit for bit."""
    run = tmp_path / "runs" / "killed"
    proc = start_deepspeed(tmp_path, "--run_name", "killed", *args, log=tmp_path / "killed.log")
    wait_for(lambda: complete_tags(run), proc)
    time.sleep(random.uniform(0.0, 1.0))          # somewhere after the first checkpoint
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run / "results.json").exists()
    resumed = run_deepspeed(tmp_path, "--run_name", "killed", *args, "--resume")
    assert "resumed from" in resumed.stdout
    assert results(run)["test"] == results(ref)["test"]
    assert results(run)["history"] == results(ref)["history"]
    (tag_a, a), (tag_b, b) = final_weights(ref), final_weights(run)
    assert tag_a == tag_b and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    return run


def test_sigkill_mid_epoch_then_resume_ends_like_an_uninterrupted_run(reference, tmp_path):
    """Also the aux_free selection biases (module state, nudged only at optimizer steps) and the routing
    history (the epoch's loads and the last validation's routes are in the checkpoint) end bit-identical."""
    run = _kill_then_resume(tmp_path, reference[1], RUN)
    _, state = final_weights(run)
    biases = [v for k, v in state.items() if k.endswith("gate.selection_bias")]
    assert biases and all(b.abs().max() > 0 for b in biases)
    assert "stability" in results(run)["history"][1]["routing"]["text.0"]["sentiment"]


# micro batch 8 x 2 accumulated on 2 ranks: 10 optimizer steps per epoch, a checkpoint every 2 of them
ACCUMULATING = ["--epochs", "2", "--save_every", "2", "--keep_checkpoints", "3", "--dropout", "0.1",
                "--grad_accum", "2"]


@pytest.fixture(scope="module")
def reference_accumulating(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accumulating")
    run_deepspeed(tmp, "--run_name", "ref", *ACCUMULATING)
    return tmp / "runs" / "ref"


def test_sigkill_with_gradient_accumulation_then_resume_is_bit_identical(reference_accumulating, tmp_path):
    """Checkpoints are taken at accumulation boundaries only, so a kill anywhere loses no partial window;
    --max_steps, --save_every and the step count are optimizer steps, not micro batches."""
    run = _kill_then_resume(tmp_path, reference_accumulating, ACCUMULATING)
    r = results(run)
    assert r["global_step"] == 2 * 10 and [h["step"] for h in r["history"]] == [10, 20]
    for tag in complete_tags(run):
        marker = json.loads((run / "checkpoints" / tag / "mmolre_complete.json").read_text())
        assert marker["step"] % 2 == 0 and marker["grad_accum"] == 2
        assert marker["epoch_samples"] % (8 * 2 * 2) == 0   # a whole number of windows


def test_sigterm_on_one_rank_checkpoints_on_all_and_exits_zero(tmp_path):
    run = tmp_path / "runs" / "stopped"
    proc = start_deepspeed(tmp_path, "--run_name", "stopped", "--epochs", "3", log=tmp_path / "stopped.log")
    wait_for(lambda: glob.glob(str(run / "tensorboard" / "events.*")), proc)
    os.kill(rank_pid(proc, 1), signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    log = (tmp_path / "stopped.log").read_text()
    assert "stop requested" in log and "continue with --resume" in log
    tags = complete_tags(run)
    assert tags and not (run / "results.json").exists()
    marker = json.loads((run / "checkpoints" / tags[-1] / "mmolre_complete.json").read_text())
    assert marker["epoch"] < 3
    done = run_deepspeed(tmp_path, "--run_name", "stopped", "--epochs", "3", "--resume")
    assert f"step {marker['step']}" in done.stdout
    assert results(run)["train"]["epochs"] == 3


def test_a_half_written_checkpoint_is_skipped_with_a_warning(reference, tmp_path):
    _, ref = reference
    run = tmp_path / "runs" / "ref"
    shutil.copytree(ref, run)
    newest = complete_tags(run)[-1]
    # what a crash in the middle of a save leaves: no marker, a truncated file
    os.remove(run / "checkpoints" / newest / "mmolre_complete.json")
    with open(run / "checkpoints" / newest / "mp_rank_00_model_states.pt", "r+b") as f:
        f.truncate(100)
    (run / "results.json").unlink()
    proc = run_deepspeed(tmp_path, "--run_name", "ref", *RUN, "--resume")
    out = proc.stdout + proc.stderr
    assert f"skipping incomplete checkpoint(s) ['{newest}']" in out
    # resuming from the previous checkpoint redoes the lost work exactly
    assert results(run)["test"] == results(ref)["test"]


def _from_a_mid_run_checkpoint(ref, dest):
    """A copy of the reference run as it was at its newest checkpoint inside epoch 2, with no results yet."""
    shutil.copytree(ref, dest)
    (dest / "results.json").unlink()
    mid = [t for t in complete_tags(dest) if 20 < int(t[4:]) < 40][-1]
    for tag in complete_tags(dest):
        if tag > mid:
            shutil.rmtree(dest / "checkpoints" / tag)
    return mid


def _final_optimizer_state(run, ep_size):
    """The finished run's fp32 weights, AdamW moments and step of every dense parameter (the topology-free
    state) and of every expert (the expert state files), experts by global id."""
    from mmolre import expert_state_files, topology_free_state
    tag_dir = str(run / "checkpoints" / complete_tags(run)[-1])
    state = topology_free_state.read(tag_dir, ep_size, 8)
    layers = [f"{m}.{b}" for m in ("text", "audio", "vision") for b in (0, 1)]
    experts, _ = expert_state_files.read_share(tag_dir, layers, 8, 1, 0, ep_size)
    for layer, values in experts.items():
        for name in ("down.weight", "down.bias", "up.weight", "up.bias"):
            state["params"][f"{layer}:{name}"] = {k: values[f"{name}/{k2}"] for k, k2 in
                                                  (("fp32", "weight"), ("exp_avg", "exp_avg"),
                                                   ("exp_avg_sq", "exp_avg_sq"))}
        state["expert_steps"] = state.get("expert_steps", []) + values["step"].tolist()
    return state


def _relative_gaps(a, b) -> dict:
    """Per state kind, the largest relative distance ||x - y|| / ||y|| over the parameters."""
    gaps = {}
    for name, entry in b["params"].items():
        for kind, y in entry.items():
            gap = float((a["params"][name][kind] - y).norm() / y.norm().clamp_min(1e-12))
            gaps[kind] = max(gaps.get(kind, 0.0), gap)
    return gaps


def test_resume_under_another_expert_parallel_size_trains_on_like_the_same_topology(reference, tmp_path):
    """One mid-epoch-2 checkpoint (2 processes, ep 2) continued to the end three times: by 2 processes with ep 2
    (DeepSpeed's own full load), by 1 process with ep 1 on micro batches of 16 (the same 16 samples a step;
    weights, AdamW moments and step from the topology-free state), and, as the control, by that 1 process from
    the weights alone (the topology-free state removed). Dropout off (per-rank random streams do not carry over
    to another world size). The first two must end with the same weights and AdamW state; the control must not,
    so a wrong restore of the moments or the step would fail this test."""
    _, ref = reference
    args = [*RUN, "--dropout", "0", "--resume"]
    mid = _from_a_mid_run_checkpoint(ref, tmp_path / "runs" / "same")
    _from_a_mid_run_checkpoint(ref, tmp_path / "runs" / "other")
    _from_a_mid_run_checkpoint(ref, tmp_path / "runs" / "control")
    for path in (tmp_path / "runs" / "control" / "checkpoints" / mid).glob("elastic_rank*.pt"):
        path.unlink()   # the dense model's moments and step ...
    for path in (tmp_path / "runs" / "control" / "checkpoints" / mid).glob("expert_state_rank*.pt"):
        saved = torch.load(path, weights_only=True)   # ... and the experts': as if they had not been carried
        for values in saved["layers"].values():
            for key in values:
                if "/exp_avg" in key or key == "step":
                    values[key] = torch.zeros_like(values[key])
        torch.save(saved, path)
    same = run_deepspeed(tmp_path, "--run_name", "same", *args)
    assert f"resumed from {tmp_path}/runs/same/checkpoints/{mid}: epoch 1" in same.stdout
    other = run_deepspeed(tmp_path, "--run_name", "other", *args, "--batch_size", "16", procs=1)
    assert "under another topology" in other.stdout
    assert "AdamW moments and step of every parameter were carried over" in other.stdout
    assert "expert parallel 2, now 1 / 1" in other.stdout
    control = run_deepspeed(tmp_path, "--run_name", "control", *args, "--batch_size", "16", procs=1)
    assert "WEIGHTS ONLY: the optimizer state was reset" in control.stdout
    one, two = results(tmp_path / "runs" / "other"), results(tmp_path / "runs" / "same")
    assert one["ep_size"] == 1 and two["ep_size"] == 2 and one["global_step"] == two["global_step"] == 40
    for k, v in two["test"]["sentiment"].items():
        assert one["test"]["sentiment"][k] == pytest.approx(v, abs=1e-4), k
    reference_state = _final_optimizer_state(tmp_path / "runs" / "same", 2)
    carried = _relative_gaps(_final_optimizer_state(tmp_path / "runs" / "other", 1), reference_state)
    reset = _relative_gaps(_final_optimizer_state(tmp_path / "runs" / "control", 1), reference_state)
    assert all(gap < 1e-3 for gap in carried.values()), carried
    assert reset["exp_avg_sq"] > 0.1 and reset["exp_avg"] > 0.1, reset   # the control is far off
    assert _final_optimizer_state(tmp_path / "runs" / "other", 1)["step"] == reference_state["step"] == 40
    assert _final_optimizer_state(tmp_path / "runs" / "other", 1)["expert_steps"] == reference_state["expert_steps"]
    assert set(reference_state["expert_steps"]) == {40}   # dense expert steps: every expert, every step
    control_gaps = {k: v for k, v in _relative_gaps(_final_optimizer_state(tmp_path / "runs" / "control", 1),
                                                    {"params": {n: e for n, e in reference_state["params"].items()
                                                                if ":" in n}}).items()}
    assert control_gaps["exp_avg_sq"] > 0.1, control_gaps   # the experts' reset moments are far off too


def test_a_resume_applies_this_runs_weight_decay_to_the_restored_optimizer(reference, tmp_path):
    """DeepSpeed's full load (same topology) restores the saved param groups, weight decay included; the
    resumed run's --weight_decay (recorded in its config.json) is what its AdamW steps must use."""
    _, ref = reference
    run = tmp_path / "runs" / "ref"
    mid = _from_a_mid_run_checkpoint(ref, run)
    proc = run_deepspeed(tmp_path, "--run_name", "ref", *RUN, "--weight_decay", "0.3", "--resume")
    assert f"checkpoints/{mid}: epoch 1" in proc.stdout
    assert json.loads((run / "config.json").read_text())["train"]["weight_decay"] == 0.3

    def groups(run_dir):
        newest = run_dir / "checkpoints" / complete_tags(run_dir)[-1] / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
        return torch.load(newest, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
    before = [g["weight_decay"] for g in groups(ref)]          # 0.01 where decayed, 0 for biases and norms
    assert sorted(set(before)) == [0.0, 0.01]
    assert [g["weight_decay"] for g in groups(run)] == [0.3 if wd else 0.0 for wd in before]


def test_export_then_predict_matches_the_trainers_test_predictions(reference, tmp_path):
    tmp, ref = reference
    model = tmp_path / "model"
    env = environment(tmp)
    cli = [sys.executable, "-m", "mmolre.cli"]
    subprocess.run([*cli, "export", str(ref), str(model)], cwd=ROOT, env=env, check=True, capture_output=True)
    assert sorted(p.name for p in model.iterdir()) == ["README.md", "config.json", "model.safetensors"]   # no pickle
    source = json.loads((ref / "data_meta.json").read_text())["sources"]["synthetic"]
    out = tmp_path / "pred.csv"
    subprocess.run([*cli, "predict", str(model), source, "--out", str(out)], cwd=ROOT,
                   env={**env, "WORLD_SIZE": "", "RANK": ""}, check=True, capture_output=True)
    import csv
    trainer = {r["id"]: r for r in csv.DictReader(open(ref / "predictions_test.csv"))}
    exported = {r["id"]: r for r in csv.DictReader(open(out))}
    assert trainer.keys() == exported.keys()
    for sid, row in trainer.items():
        for col in ("sentiment_pred", "happy_prob", "fear_prob"):
            assert float(exported[sid][col]) == pytest.approx(float(row[col]), abs=1e-4), (sid, col)
    # the emotion thresholds chosen on valid for the selected checkpoint travel with it into the export, and
    # predict's decisions are the trainer's
    decisions = json.loads((ref / "results.json").read_text())["emotion_decisions"]
    assert decisions["chosen_on"] == "valid" and set(decisions["thresholds"]) == {"happy", "sad", "anger",
                                                                                   "surprise", "disgust", "fear"}
    assert json.loads((model / "config.json").read_text())["emotion_thresholds"] == decisions["thresholds"]
    for rows in (trainer, exported):   # (their probabilities agree to 1e-4, so compare each with its own)
        for row in rows.values():
            for e, t in decisions["thresholds"].items():
                assert int(row[f"{e}_pred"]) == int(float(row[f"{e}_prob"]) > t)
    assert {"majority", "prevalence", "best_constant"} <= set(decisions["baselines"])
    assert "synthetic data" in (model / "README.md").read_text()   # the model card says what it learned from


def test_the_python_api_predicts_like_the_cli_on_a_file_and_on_arrays(reference, tmp_path, monkeypatch):
    """`from mmolre import load_model`: the same predictions from the MMSA file and from its arrays; an
    earlier version's pickle export loads only when trusted."""
    import pickle
    import numpy as np
    import mmolre
    tmp, ref = reference
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from mmolre.export import export
    config = export(str(ref), str(tmp_path / "model"))
    model = mmolre.load_model(str(tmp_path / "model"))
    source = json.loads((ref / "data_meta.json").read_text())["sources"]["synthetic"]
    from_file = model.predict(source, split="test", cache_dir=str(tmp / "cache"))
    from mmolre.data.converted import convert   # the same file as a pickle-free dataset: the same predictions
    convert(source, str(tmp_path / "converted"))
    from_converted = model.predict(str(tmp_path / "converted"), split="test", cache_dir=str(tmp / "cache"))
    assert list(from_converted["ids"]) == list(from_file["ids"])
    np.testing.assert_array_equal(from_converted["sentiment_pred"], from_file["sentiment_pred"])
    with open(source, "rb") as f:   # our own file
        test = pickle.load(f)["test"]
    arrays = {k: test[k] for k in ("id", "text", "audio", "vision", "audio_lengths", "vision_lengths",
                                   "regression_labels") if k in test}
    from_arrays = model.predict(arrays)
    order = np.argsort(from_arrays["ids"])
    assert list(np.asarray(from_file["ids"])[np.argsort(from_file["ids"])]) == list(np.asarray(from_arrays["ids"])[order])
    np.testing.assert_allclose(np.asarray(from_arrays["sentiment_pred"])[order],
                               np.asarray(from_file["sentiment_pred"])[np.argsort(from_file["ids"])], atol=1e-5)
    assert from_file["emotion_pred"].shape == (len(from_file["ids"]), 6)
    legacy = tmp_path / "model.pt"   # the single-pickle format of earlier versions
    state = config.pop("state_dict")
    torch.save({**{k: v for k, v in config.items() if k != "format"}, "format": "mmolre-export-1",
                "state_dict": state}, legacy)
    with pytest.raises(ValueError, match="is a torch pickle .* opening it runs any code"):
        mmolre.load_model(str(legacy))
    with pytest.warns(UserWarning, match="unpickling"):
        trusted = mmolre.load_model(str(legacy), trust_pickle=True)
    np.testing.assert_allclose(trusted.predict(arrays)["sentiment_pred"], from_arrays["sentiment_pred"], atol=0)


def test_a_nan_loss_stops_the_run_naming_step_and_samples(tmp_path):
    proc = run_deepspeed(tmp_path, "--run_name", "nan", "--epochs", "1", check=False,
                         env={"MMOLRE_FAULT_NAN_STEP": "3", "MMOLRE_FAULT_NAN_RANK": "1"})
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "non-finite loss at step 3 (epoch 1, micro batch 3); the weights were not updated" in out
    assert "synth" in out.split("Samples of the batch:")[1][:200]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_nan_loss_can_be_skipped_and_counted(tmp_path, accumulation):
    """Without accumulation the micro batch's step is skipped whole; inside an accumulation window the micro
    batch contributes an exact zero gradient and the window's other micro batch makes the step."""
    run_deepspeed(tmp_path, "--run_name", "skip", "--epochs", "1", "--on_nonfinite", "skip", "--grad_accum",
                  str(accumulation), env={"MMOLRE_FAULT_NAN_STEP": "3"})
    r = results(tmp_path / "runs" / "skip")
    assert r["train"]["skipped_nonfinite"] == 1
    micro_batches = 326 // (8 * 2)
    assert r["global_step"] == (micro_batches - 1 if accumulation == 1 else micro_batches // accumulation)
    _, weights = final_weights(tmp_path / "runs" / "skip")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert r["test"]["sentiment"]["mae"] == r["test"]["sentiment"]["mae"]   # finite, not NaN


def test_a_skipped_micro_batch_adds_no_routes_to_the_epochs_loads(tmp_path):
    """Inside an accumulation window a skipped micro batch contributes no gradient and no routes: the epoch's
    loads (dead experts) and aux_free's counts leave it out (issue 23; before, its routes were counted)."""
    run_deepspeed(tmp_path, "--run_name", "skip", "--epochs", "1", "--on_nonfinite", "skip", "--grad_accum", "2",
                  "--balance", "aux_free", "--save_every", "2", "--keep_checkpoints", "20",
                  env={"MMOLRE_FAULT_NAN_STEP": "3"})
    tag = tmp_path / "runs" / "skip" / "checkpoints" / "step00000002"   # micro batches 1-4, the 3rd skipped
    load = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)["train_state"]["epoch_load"]
    routes_per_micro_batch = 8 * 2 * 2   # per layer and task: micro batch 8 on each of 2 ranks, top-2, no capacity
    assert torch.equal(load.sum(-1), torch.full(load.shape[:2], 3.0 * routes_per_micro_batch))


def test_a_dead_rank_ends_the_run_in_bounded_time(tmp_path):
    run = tmp_path / "runs" / "dead"
    proc = start_deepspeed(tmp_path, "--run_name", "dead", "--epochs", "20", "--dist_timeout", "30",
                           log=tmp_path / "dead.log")
    wait_for(lambda: glob.glob(str(run / "tensorboard" / "events.*")), proc)
    killed = time.time()
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    code = proc.wait(timeout=120)
    elapsed = time.time() - killed
    assert code != 0
    assert elapsed < 45, f"the surviving rank took {elapsed:.0f} s to exit"


def test_a_checkpoint_of_an_earlier_version_resumes_its_weights_saying_so(reference, tmp_path):
    _, ref = reference
    run = tmp_path / "runs" / "ref"
    shutil.copytree(ref, run)
    newest = run / "checkpoints" / complete_tags(run)[-1] / "mmolre_complete.json"
    marker = json.loads(newest.read_text())
    del marker["format"]   # what the trainer wrote before checkpoints had a format number
    newest.write_text(json.dumps(marker))
    (run / "results.json").unlink()
    proc = run_deepspeed(tmp_path, "--run_name", "ref", *RUN, "--resume")
    assert "WEIGHTS ONLY: the optimizer state was reset" in proc.stdout and "written by an earlier version" in proc.stdout
    for k, v in results(ref)["test"]["sentiment"].items():
        assert results(run)["test"]["sentiment"][k] == pytest.approx(v, abs=1e-6), k


def test_reshard_refuses_a_checkpoint_without_optimizer_state_and_leaves_it_as_it_was(reference, tmp_path):
    _, ref = reference
    run = tmp_path / "runs" / "ref"
    shutil.copytree(ref, run)
    tag_dir = run / "checkpoints" / complete_tags(run)[-1]
    for path in tag_dir.glob("elastic_rank*.pt"):   # what an earlier version's checkpoint lacks
        path.unlink()
    files = sorted(p.name for p in tag_dir.iterdir())
    config = (run / "config.json").read_text()
    proc = subprocess.run([sys.executable, "-m", "mmolre.cli", "reshard", str(run), "--world_size", "1",
                           "--ep_size", "1"], cwd=ROOT, env=environment(tmp_path), capture_output=True, text=True)
    assert proc.returncode != 0
    assert "holds no topology-free optimizer state" in proc.stdout + proc.stderr
    assert sorted(p.name for p in tag_dir.iterdir()) == files and (run / "config.json").read_text() == config
    assert not list((run / "checkpoints").glob("*before-reshard*"))


def test_reshard_of_a_mid_epoch_checkpoint_keeps_the_epochs_loads(reference, tmp_path):
    """A mid-epoch checkpoint holds the epoch's expert loads so far (for the dead-expert count), and after a
    resume only rank 0 holds them: the reshard's save must still run the same collectives on every rank."""
    _, ref = reference
    run = tmp_path / "runs" / "ref"
    shutil.copytree(ref, run)
    (run / "results.json").unlink()
    tags = complete_tags(run)
    mid = [t for t in tags if int(t[4:]) % 10][-1]          # 10 steps per epoch: a save_every tag
    for tag in tags:
        if tag > mid:
            shutil.rmtree(run / "checkpoints" / tag)

    def client(tag):
        return torch.load(run / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
    before = client(mid)["train_state"]["epoch_load"]
    assert before is not None and before.sum() > 0
    from mmolre.checkpoint import THRESHOLDS   # emotion decisions beside a checkpoint survive its reshard
    (run / "checkpoints" / mid / THRESHOLDS).write_text('{"thresholds": {"happy": 0.3}}')
    proc = subprocess.run([sys.executable, "-m", "mmolre.cli", "reshard", str(run), "--world_size", "2",
                           "--ep_size", "1"], cwd=ROOT, env=environment(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert torch.equal(client(mid)["train_state"]["epoch_load"], before)
    assert json.loads((run / "checkpoints" / mid / THRESHOLDS).read_text()) == {"thresholds": {"happy": 0.3}}
    assert json.loads((run / "checkpoints" / mid / "mmolre_complete.json").read_text())["ep_size"] == 1
