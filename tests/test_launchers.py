"""Other ways in: rank discovery from Slurm's variables, and `accelerate launch`."""
import json
import os
import subprocess
import sys

from mmolre.distributed import fill_env
from tests.launcher import ROOT, TINY, environment, free_port

def test_ranks_come_from_slurm_variables_under_srun():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
           "SLURM_TASKS_PER_NODE": "4(x2)", "MASTER_PORT": "29999"}
    fill_env(env)
    assert [env[v] for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE")] == ["5", "8", "1", "4"]


def test_a_batch_script_without_srun_is_one_process():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}   # the batch step itself has no SLURM_STEP_ID
    fill_env(env)
    assert env["WORLD_SIZE"] == "1" and env["RANK"] == "0" and env["MASTER_PORT"]


def test_a_launcher_that_sets_ranks_wins():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "1234", "SLURM_PROCID": "7",
           "SLURM_NTASKS": "9", "SLURM_STEP_ID": "0"}
    fill_env(env)
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2"


def test_accelerate_launch_takes_the_deepspeed_config_of_its_plugin(tmp_path):
    config = tmp_path / "accelerate.yaml"
    text = open(os.path.join(ROOT, "ds_configs", "accelerate_zero2.yaml")).read()
    config.write_text(text.replace("ds_configs/zero2.json", "ds_configs/zero1.json"))
    args = [a for a in TINY]
    i = args.index("--ds_config")
    del args[i:i + 2]   # the DeepSpeed config comes from the accelerate config
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
           str(free_port()), "launch.py", *args, "--epochs", "1", "--output_dir", str(tmp_path / "runs"),
           "--run_name", "acc"]
    proc = subprocess.run(cmd, cwd=ROOT, env=environment(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "acc"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["ds_config"] == "ds_configs/zero1.json" and cfg["ds_config"]["zero_optimization"]["stage"] == 1
    r = json.loads((run / "results.json").read_text())
    assert r["world_size"] == 2 and r["ep_size"] == 2
