"""Start-up: seconds from `deepspeed launch.py` to the first optimizer step, and to the process's exit, with a
warm data cache (issue 25, item 3: 2 processes in at most 5 s).

The first step's time is the wall time of its TensorBoard event (`--log_every 1`), against the moment the
launcher was started; each configuration runs `--repeats` times after one warm-up run (which builds the Arrow
cache and DeepSpeed's CPU op), and the median is reported. One optimizer step, then the test pass of a
one-step run (`--max_steps 1`), so "exit" includes validation, a checkpoint and the test.

    python bench/startup.py --out bench/results/startup
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.commands import command_line, write_result  # noqa: E402
from mmolre.distributed import free_port  # noqa: E402


def first_step_wall(run: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return min(e.wall_time for e in acc.Scalars("loss/total"))


def one_start(processes: int, work: str, name: str, flags: list[str]) -> dict:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes), "--master_port",
           str(free_port()), "launch.py", "--ds_config", "ds_configs/zero2.json", "--max_steps", "1", "--log_every",
           "1", "--ep_size", str(processes), "--output_dir", work, "--run_name", name, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "MMOLRE_CACHE": os.path.join(work, "cache")}
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    end = time.time()
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return {"first_step_s": first_step_wall(os.path.join(work, name)) - start, "exit_s": end - start}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", default="2,1")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "startup"))
    args, flags = p.parse_known_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        one_start(1, work, "warmup", flags)   # the Arrow cache and DeepSpeed's op, built once
        for n in [int(x) for x in args.processes.split(",")]:
            runs = [one_start(n, work, f"p{n}_{i}", flags) for i in range(args.repeats)]
            rows.append({"processes": n, "runs": runs,
                         **{k: statistics.median(r[k] for r in runs) for k in ("first_step_s", "exit_s")}})
            print(f"{n} process(es): first step {rows[-1]['first_step_s']:.1f} s, exit {rows[-1]['exit_s']:.1f} s "
                  f"(median of {args.repeats})", flush=True)
    lines = [f"`{command_line(__file__, argv)}`", "",
             "| processes | launch -> first optimizer step (median) | launch -> exit (median) | runs |",
             "|---|---|---|---|"]
    for r in rows:
        each = "; ".join(f"{x['first_step_s']:.1f} / {x['exit_s']:.1f}" for x in r["runs"])
        lines.append(f"| {r['processes']} | {r['first_step_s']:.1f} s | {r['exit_s']:.1f} s | {each} |")
    report = {"command": command_line(__file__, argv), "flags": flags, "rows": rows}
    write_result(args.out, report, lines)
    return report


if __name__ == "__main__":
    main()
