"""Launchers besides deepspeed: accelerate launch with its DeepSpeed plugin."""
import json
import os
import subprocess
import sys

from tests.launcher import ROOT, TINY, environment, free_port


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
