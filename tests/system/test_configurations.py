"""The configurations users run besides the default, through the real `deepspeed` launcher on CPU:
bf16, gradient accumulation, a capacity limit, and a resume under another world size mid-training."""
import csv
import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from mmolre.distributed import free_port
from mmolre.export import export
from mmolre.lr_schedule import warmup_cosine_factor
from tests import dist_helpers as h
from tests.launcher import ROOT, complete_tags, environment, final_weights, results, run_deepspeed, scalars


# ---- bf16 -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    run_deepspeed(tmp, "--ds_config", "ds_configs/zero2_bf16.json", "--run_name", "bf16", "--epochs", "3")
    return tmp / "runs" / "bf16"


def test_bf16_with_two_processes_and_expert_parallelism_trains(bf16_run):
    r = results(bf16_run)
    assert r["world_size"] == 2 and r["ep_size"] == 2
    assert json.loads((bf16_run / "config.json").read_text())["ds_config"]["bf16"]["enabled"] is True
    losses = [v for _, v in scalars(bf16_run, "loss/total")]   # every 2nd of 60 steps, micro batch 8
    quarter = len(losses) // 4
    assert quarter >= 7
    assert sum(losses[-quarter:]) < 0.9 * sum(losses[:quarter]), losses
    assert r["test"]["sentiment"]["mae"] < r["baselines"]["mean_mae"]


def test_export_of_a_bf16_run_takes_the_fp32_master_weights(bf16_run, tmp_path):
    payload = export(str(bf16_run), str(tmp_path / "model"), tag="latest")
    tag, module = final_weights(bf16_run)
    assert payload["checkpoint"] == tag
    exported = payload["state_dict"]
    assert module.keys() == exported.keys()
    experts = {k for k in module if "deepspeed_experts" in k}
    for key in experts:   # the experts are only ever stored as their fp32 masters (the expert state files)
        assert module[key].dtype == torch.float32 and torch.equal(exported[key], module[key]), key
    module = {k: v for k, v in module.items() if k not in experts}
    exported = {k: v for k, v in exported.items() if k not in experts}
    assert experts and all(v.dtype == torch.bfloat16 for v in module.values())   # DeepSpeed's files: bf16 copies
    finer = 0
    for key, master in exported.items():
        assert master.dtype == torch.float32
        assert torch.equal(master.bfloat16(), module[key]), key           # the masters of those very weights
        finer += int(not torch.equal(master.bfloat16().float(), master))  # ... with fp32 precision
    assert finer > 0.9 * len(exported)


# ---- gradient accumulation ------------------------------------------------------------------------------
# No dropout and no aux loss: both are per micro batch, so only then is micro 16 x 2 the same computation as
# micro 32 x 1 (the L1 and BCE means over equal micro batches average to the big batch's mean).
SAME_MATH = ["--dropout", "0", "--aux_loss_weight", "0", "--epochs", "1", "--max_steps", "4", "--log_every", "1"]


@pytest.mark.parametrize("procs", [1, 2])
def test_micro_16_accumulated_twice_trains_like_micro_32(tmp_path, procs):
    run_deepspeed(tmp_path, "--run_name", "acc", "--batch_size", "16", "--grad_accum", "2", *SAME_MATH,
                  procs=procs)
    run_deepspeed(tmp_path, "--run_name", "big", "--batch_size", "32", "--grad_accum", "1", *SAME_MATH,
                  procs=procs)
    acc, big = tmp_path / "runs" / "acc", tmp_path / "runs" / "big"
    assert results(acc)["global_step"] == results(big)["global_step"] == 4    # optimizer steps, not micro
    lr_acc, lr_big = scalars(acc, "train/lr"), scalars(big, "train/lr")
    # (steps and values apart: pytest >= 9.1 refuses approx on a list of tuples)
    assert [s for s, _ in lr_acc] == [s for s, _ in lr_big] == [1, 2, 3, 4]
    assert [v for _, v in lr_acc] == pytest.approx([v for _, v in lr_big], rel=1e-6)
    (tag_a, a), (tag_b, b) = final_weights(acc), final_weights(big)
    assert tag_a == tag_b == "step00000004"
    for key in a:   # Adam turns rounding differences in tiny gradients into ~1e-6 (the LR is 2e-3)
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5, msg=lambda m: f"{key}: {m}")


# ---- capacity -------------------------------------------------------------------------------------------
def test_with_a_training_capacity_evaluation_predictions_do_not_depend_on_the_world_size(tmp_path):
    run_deepspeed(tmp_path, "--run_name", "cap", "--capacity_factor", "0.5", "--epochs", "1")
    two = tmp_path / "runs" / "cap"
    dropped = {task: [v for _, v in scalars(two, f"moe/text.0/{task}/dropped_fraction")]
               for task in ("sentiment", "emotion")}
    assert all(min(v) > 0 for v in dropped.values()), dropped        # the training capacity did drop rows
    one = tmp_path / "runs" / "cap1"
    shutil.copytree(two, one)
    (one / "results.json").unlink()
    run_deepspeed(tmp_path, "--run_name", "cap1", "--capacity_factor", "0.5", "--epochs", "1", "--resume", procs=1)

    def predictions(run):
        with open(run / "predictions_test.csv") as f:
            return {row["id"]: row for row in csv.DictReader(f)}
    a, b = predictions(two), predictions(one)
    assert a.keys() == b.keys() and results(one)["world_size"] == 1
    for sid in a:
        for col in ("sentiment_pred", "happy_prob", "fear_prob"):
            assert float(b[sid][col]) == pytest.approx(float(a[sid][col]), abs=1e-5), (sid, col)


# ---- a resume under another world size, with training left --------------------------------------------
def test_the_lr_schedule_continues_in_samples_after_a_resume_under_another_world_size(tmp_path):
    """2 processes (16 samples a step) stop at step 12 of 40; 1 process (8 a step) resumes. Every logged
    LR, before and after, lies on the one curve of the samples trained (640 in all, warm-up 32), and
    --max_steps 40 stays a budget of 640 samples (not 40 steps of 8)."""
    args = ["--run_name", "elastic", "--epochs", "3", "--max_steps", "40", "--log_every", "1"]
    stopped = run_deepspeed(tmp_path, *args, env={"MMOLRE_FAULT_STOP_STEP": "12"})
    assert "stop requested" in stopped.stdout
    resumed = run_deepspeed(tmp_path, *args, "--resume", procs=1)
    assert "the LR schedule continues at sample 192" in resumed.stdout
    run = tmp_path / "runs" / "elastic"
    samples, lrs = dict(scalars(run, "train/samples")), scalars(run, "train/lr")
    assert max(samples.values()) == 640 and results(run)["global_step"] == 12 + (640 - 192) // 8
    for step, lr in lrs:   # the LR a step used, against the samples trained before it
        per_step = 16 if step <= 12 else 8
        expected = 2e-3 * warmup_cosine_factor(samples[step] - per_step, per_step, 640, 32)
        assert lr == pytest.approx(expected, rel=1e-5), (step, samples[step])
    before, after = dict(lrs)[12], dict(lrs)[13]
    assert after == pytest.approx(before, rel=0.05)   # no jump back up the curve


def saved_share(run, ep_size: int, ep_rank: int, names) -> tuple[dict, int]:
    """The newest checkpoint's saved state for one rank's parameter names, mapped here (not with the
    trainer's code): stacked "...experts.down_weight" [local experts, ...] from the per-expert entries."""
    from mmolre import checkpoint, topology_free_state
    tag = checkpoint.latest_complete(checkpoint.checkpoint_dir(str(run)))
    marker = checkpoint.read_marker(checkpoint.checkpoint_dir(str(run)), tag)
    files = {}
    for r in range(marker["ep_size"]):   # (rank 0 alone where the experts are in banks: the dense state)
        path = run / "checkpoints" / tag / f"{topology_free_state.PREFIX}{r}.pt"
        if path.exists():
            files[r] = torch.load(path, weights_only=True)
    experts = json.loads((run / "config.json").read_text())["model"]["num_experts"]
    old_per_rank, per_rank = experts // marker["ep_size"], experts // ep_size
    share = {}
    for name in names:
        if ".deepspeed_moe.experts." in name:   # stacked: gather this rank's global ids from the saving ranks
            rows = []
            for g in range(ep_rank * per_rank, (ep_rank + 1) * per_rank):
                saved = files[g // old_per_rank]["params"][name]
                rows.append({k: v[g % old_per_rank] for k, v in saved.items()})
            share[name] = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        else:
            share[name] = files[0]["params"][name]
    return share, files[0]["step"]


def saved_expert_rows(run, ep_size: int, ep_rank: int) -> dict:
    """The newest checkpoint's expert state rows of one rank's global experts, sliced here from the expert
    state files (not with the trainer's code)."""
    from mmolre import checkpoint
    tag = checkpoint.latest_complete(checkpoint.checkpoint_dir(str(run)))
    files = sorted((run / "checkpoints" / tag).glob("expert_state_rank*.pt"))
    saved = [torch.load(f, weights_only=True) for f in files]
    saved.sort(key=lambda s: s["ep_rank"])
    experts, old_per_rank = saved[0]["num_experts"], saved[0]["num_experts"] // saved[0]["ep_size"]
    per_rank = experts // ep_size
    out = {}
    for layer in saved[0]["layers"]:
        for key in saved[0]["layers"][layer]:
            rows = [saved[g // old_per_rank]["layers"][layer][key][g % old_per_rank]
                    for g in range(ep_rank * per_rank, (ep_rank + 1) * per_rank)]
            out.setdefault(layer, {})[key] = torch.stack(rows)
    return out


def check_restored(ranks, run, ep_size, bf16):
    for rank in ranks:
        for stage in (1, 2):
            r = rank[stage]
            assert r["restored"] == "weights and optimizer"
            saved_experts = saved_expert_rows(run, ep_size, rank["ep_rank"])
            assert r["experts"].keys() == saved_experts.keys() and saved_experts
            for layer, values in r["experts"].items():   # every expert's fp32 weights, moments and step count
                assert values.keys() == saved_experts[layer].keys()
                for key, value in values.items():
                    assert torch.equal(value, saved_experts[layer][key]), (stage, layer, key)
                assert int(values["step"].min()) > 0
            mine = r["state"]["params"]
            saved, step = saved_share(run, ep_size, rank["ep_rank"], mine.keys())
            assert r["state"]["step"] == step > 0
            assert mine.keys() == r["per_parameter"].keys()
            for name, entry in mine.items():
                assert entry.keys() == saved[name].keys() == {"fp32", "exp_avg", "exp_avg_sq"}
                for k in entry:   # weights and both AdamW moments, parameter by parameter
                    assert torch.equal(entry[k], saved[name][k]), (stage, name, k)
                    # the batched assembly is DeepSpeed's, parameter by parameter
                    assert torch.equal(entry[k], r["per_parameter"][name][k]), (stage, name, k)
                if bf16:   # the masters of the loaded bf16 weights, finer than what DeepSpeed rebuilt
                    assert torch.equal(entry["fp32"].bfloat16(), r["module"][name]), (stage, name)
                    assert torch.equal(r["refreshed"][name], r["module"][name].float()), (stage, name)


def test_a_bf16_resume_under_another_topology_keeps_masters_moments_and_step(bf16_run, tmp_path):
    """The 2-process, ep 2 bf16 checkpoint loaded by 2 processes with ep 1 (experts now replicated, their
    optimizer state partitioned over both ranks), under ZeRO 1 and 2: DeepSpeed can only load the weights
    (and rebuilds the masters from the bf16 copies); the trainer puts every parameter's fp32 master, AdamW
    moments and step back, each expert from the rank that saved it."""
    out = tmp_path / "state.pt"
    mp.spawn(h.topology_change_resume_worker, args=(2, free_port(), str(bf16_run), str(out), 1, True), nprocs=2,
             join=True)
    check_restored(torch.load(out, weights_only=False), bf16_run, 1, True)


# Elastic resume: with no dropout and no aux loss (both per rank), 4 ranks x micro 4 and 2 ranks x micro 8
# train on the same 16 samples per step, so changing topology must not change the trajectory.
ELASTIC = ["--dropout", "0", "--aux_loss_weight", "0", "--epochs", "2", "--log_every", "1", "--save_every", "100"]


def test_a_step_routed_run_stopped_at_2_2_resumes_at_1_1_like_an_uninterrupted_run(tmp_path):
    """--route_per step through the launcher: stopped mid-epoch with 2 processes (ep 2, each rank routing its
    own steps), resumed by one process (ep 1) with the same 8 samples per step: the losses, norms and learning
    rates of every step and the validation history match the uninterrupted 2-process run."""
    step = ["--route_per", "step", *ELASTIC]
    run_deepspeed(tmp_path, "--run_name", "straight", "--batch_size", "4", "--ep_size", "2", *step, procs=2)
    stopped = run_deepspeed(tmp_path, "--run_name", "elastic", "--batch_size", "4", "--ep_size", "2", *step,
                            procs=2, env={"MMOLRE_FAULT_STOP_STEP": "5"})
    assert "stop requested" in stopped.stdout
    resumed = run_deepspeed(tmp_path, "--run_name", "elastic", "--batch_size", "8", "--ep_size", "1", *step,
                            "--resume", procs=1)
    assert "world size 2 / expert parallel 2, now 1 / 1" in resumed.stdout
    assert "AdamW moments and step of every parameter were carried over" in resumed.stdout
    run, straight = tmp_path / "runs" / "elastic", tmp_path / "runs" / "straight"
    assert results(run)["global_step"] == results(straight)["global_step"] > 5
    for tag in ("train/lr", "loss/total", "train/grad_norm"):
        mine, ref = dict(scalars(run, tag)), dict(scalars(straight, tag))
        assert sorted(mine) == sorted(ref), tag
        assert [mine[s] for s in sorted(mine)] == pytest.approx([ref[s] for s in sorted(ref)], rel=1e-3), tag
    for mine, ref in zip(results(run)["history"], results(straight)["history"], strict=True):
        assert mine["valid_loss"] == pytest.approx(ref["valid_loss"], rel=1e-3)


def test_an_elastic_resume_4_4_then_2_2_then_4_2_trains_like_an_uninterrupted_run(tmp_path):
    run_deepspeed(tmp_path, "--run_name", "straight", "--batch_size", "4", "--ep_size", "4", *ELASTIC, procs=4)
    stopped = run_deepspeed(tmp_path, "--run_name", "elastic", "--batch_size", "4", "--ep_size", "4", *ELASTIC,
                            procs=4, env={"MMOLRE_FAULT_STOP_STEP": "6"})
    assert "stop requested" in stopped.stdout
    run = tmp_path / "runs" / "elastic"
    # the 4/4 checkpoint into 2 ranks with ep 2: every parameter's weights, moments and step, exactly
    out = tmp_path / "state.pt"
    mp.spawn(h.topology_change_resume_worker, args=(2, free_port(), str(run), str(out), 2, False), nprocs=2, join=True)
    check_restored(torch.load(out, weights_only=False), run, 2, False)
    middle = run_deepspeed(tmp_path, "--run_name", "elastic", "--batch_size", "8", "--ep_size", "2", *ELASTIC,
                           "--resume", procs=2, env={"MMOLRE_FAULT_STOP_STEP": "14"})
    assert "AdamW moments and step of every parameter were carried over" in middle.stdout
    assert "world size 4 / expert parallel 4, now 2 / 2" in middle.stdout
    last = run_deepspeed(tmp_path, "--run_name", "elastic", "--batch_size", "4", "--ep_size", "2", *ELASTIC,
                         "--resume", procs=4)
    assert "world size 2 / expert parallel 2, now 4 / 2" in last.stdout
    assert "AdamW moments and step of every parameter were carried over" in last.stdout
    straight = tmp_path / "runs" / "straight"
    assert results(run)["global_step"] == results(straight)["global_step"] == 40
    lr = dict(scalars(run, "train/lr"))
    assert lr == pytest.approx(dict(scalars(straight, "train/lr")), rel=1e-6)
    for tag in ("loss/total", "train/grad_norm"):
        mine, ref = dict(scalars(run, tag)), dict(scalars(straight, tag))
        assert sorted(mine) == sorted(ref) == list(range(1, 41)), tag
        assert [mine[s] for s in sorted(mine)] == pytest.approx([ref[s] for s in sorted(ref)], rel=1e-3), tag
    (tag_a, a), (tag_b, b) = final_weights(run), final_weights(straight)
    assert tag_a == tag_b
    # The losses and norms above are the exact check. The weights differ by reduction order only, but
    # without an aux loss the routers' last layer gets tiny gradients, whose rounding noise Adam turns into
    # steps of up to ~lr/10 (seen: 1e-4 on a router bias); anything else is within ~1e-5.
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=3e-4, msg=lambda m: f"{key}: {m}")
    # offline: the finished 4/4 run laid out for 2/2, which then resumes it as its own (DeepSpeed's full load)
    from mmolre import topology_free_state
    tag = complete_tags(straight)[-1]
    before = topology_free_state.read(str(straight / "checkpoints" / tag), 4, 8)
    experts_before = saved_expert_rows(straight, 1, 0)   # every expert, by global id
    proc = subprocess.run([sys.executable, "-m", "mmolre.cli", "reshard", str(straight), "--world_size", "2",
                           "--ep_size", "2"], cwd=ROOT, env=environment(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert complete_tags(straight)[-1] == tag
    after = topology_free_state.read(str(straight / "checkpoints" / tag), 2, 8)   # written by the 2/2 engine
    assert after["step"] == before["step"] == 40 and after["params"].keys() == before["params"].keys()
    for name, entry in before["params"].items():
        for k, v in entry.items():
            assert torch.equal(after["params"][name][k], v), (name, k)
    experts_after = saved_expert_rows(straight, 1, 0)
    assert experts_after.keys() == experts_before.keys() and len(list((straight / "checkpoints" / tag).glob(
        "expert_state_rank*.pt"))) == 2   # written by the 2/2 engine
    for layer, values in experts_before.items():
        for key, value in values.items():
            assert torch.equal(experts_after[layer][key], value), (layer, key)
    marker = json.loads((straight / "checkpoints" / tag / "mmolre_complete.json").read_text())
    assert (marker["world_size"], marker["ep_size"], marker["step"]) == (2, 2, 40)
    assert not list((straight / "checkpoints").glob("*before-reshard*"))
    more = run_deepspeed(tmp_path, "--run_name", "straight", "--batch_size", "8", "--ep_size", "2", *ELASTIC[:4],
                         "--epochs", "3", "--resume", procs=2)
    assert f"resumed from {straight}/checkpoints/{tag}: epoch 2, step 40" in more.stdout
    assert results(straight)["global_step"] == 60
