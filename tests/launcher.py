"""Start `launch.py` through the real `deepspeed` launcher with CPU processes, for the end-to-end tests."""
import glob
import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import torch

from mmolre.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--ds_config", "ds_configs/zero2.json", "--synthetic_scale", "0.02", "--d_model", "16",
        "--num_experts", "8", "--expert_rank", "4", "--batch_size", "8", "--log_every", "2", "--blocks", "2"]


def command(tmp, args, procs=2):
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(procs), "--master_port",
            str(free_port()), "launch.py", *TINY, "--output_dir", str(tmp / "runs"), *args]


def environment(tmp, **extra):
    return {**os.environ, "DS_ACCELERATOR": "cpu", "DEEPSPEED_TIMEOUT": "2", "OMP_NUM_THREADS": "1",
            "MMOLRE_CACHE": str(tmp / "cache"), **extra}


def run_deepspeed(tmp, *args, procs=2, check=True, env=None):
    proc = subprocess.run(command(tmp, args, procs), cwd=ROOT, env=environment(tmp, **(env or {})),
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def start_deepspeed(tmp, *args, procs=2, log=None):
    """Start in the background, in its own session (so the whole group can be killed)."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(command(tmp, args, procs), cwd=ROOT, env=environment(tmp), stdout=out,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def results(run):
    return json.loads((run / "results.json").read_text())


def final_weights(run):
    """The weights of the newest complete checkpoint: DeepSpeed's module file, and every shared expert by global
    id under DeepSpeed's per-expert key, from DeepSpeed's per-expert files or the expert state files (banks)."""
    tags = sorted(glob.glob(str(run / "checkpoints" / "step*" / "mmolre_complete.json")))
    tag_dir = os.path.dirname(tags[-1])
    state = dict(torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), weights_only=False)["module"])
    for path in glob.glob(os.path.join(tag_dir, "layer_*_expert_*")):
        state.update(torch.load(path, weights_only=False))
    for path in sorted(glob.glob(os.path.join(tag_dir, "expert_state_rank*.pt"))):
        saved = torch.load(path, weights_only=True)
        first = saved["ep_rank"] * saved["num_experts"] // saved["ep_size"]
        for layer, values in saved["layers"].items():
            modality, block = layer.split(".")
            prefix = f"unitse.{modality}.blocks.{block}.moe.deepspeed_moe.experts.deepspeed_experts."
            for key, rows in values.items():
                if key.endswith("/weight"):
                    for i, row in enumerate(rows):
                        state[f"{prefix}{first + i}.{key[:-len('/weight')]}"] = row
    return os.path.basename(tag_dir), state


def complete_tags(run):
    return sorted(os.path.basename(os.path.dirname(p))
                  for p in glob.glob(str(run / "checkpoints" / "step*" / "mmolre_complete.json")))


def wait_for(predicate, proc, timeout=300):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the condition held")
        if time.time() - start > timeout:
            pytest.fail("timed out")
        time.sleep(0.05)


def rank_pid(launcher, rank):
    for child in psutil.Process(launcher.pid).children(recursive=True):
        if f"--local_rank={rank}" in " ".join(child.cmdline()):
            return child.pid
    raise AssertionError(f"no process for rank {rank}")


def scalars(run, tag) -> list[tuple[int, float]]:
    """(step, value) of one TensorBoard scalar, in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]
