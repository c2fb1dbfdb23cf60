"""End-to-end training throughput through the real launcher, measured side by side in one run.

For 1 and 2 processes (expert parallelism 1 and 2), 8 and 128 shared experts, low-rank (r = 16) and
full-rank (r = d) experts: training samples/s (median of the TensorBoard `train/samples_per_s` windows
after the first, which holds start-up costs) and the bytes of shared-expert parameters each rank holds.

    python bench/train_throughput.py --json bench/results/train_throughput_cpu.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmolre.distributed import free_port  # noqa: E402


def samples_per_s(run_dir: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    values = [e.value for e in acc.Scalars("train/samples_per_s")]
    return statistics.median(values[1:] if len(values) > 1 else values)


def run(procs: int, experts: int, rank: int, args, workdir: str) -> dict:
    name = f"p{procs}_e{experts}_r{rank}"
    env = {**os.environ, "MMOLRE_CACHE": args.cache_dir, "DEEPSPEED_TIMEOUT": "5"}
    if not args.gpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // procs)))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(procs), "--master_port",
           str(free_port()), "launch.py", "--ds_config", args.ds_config, "--synthetic_scale", str(args.scale),
           "--num_experts", str(experts), "--expert_rank", str(rank), "--d_model", str(args.d_model),
           "--epochs", "1", "--max_steps", str(args.steps), "--log_every", "5", "--batch_size", str(args.batch_size),
           "--output_dir", workdir, "--run_name", name]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, name, "results.json")) as f:
        r = json.load(f)
    return {"processes": procs, "ep_size": r["ep_size"], "experts": experts, "rank": rank,
            "samples_per_s": samples_per_s(os.path.join(workdir, name)),
            "expert_bytes_per_rank": r["params"]["expert_bytes_per_rank"], "params_total": r["params"]["total"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", default="1,2")
    p.add_argument("--experts", default="8,128")
    p.add_argument("--d_model", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--scale", type=float, default=0.1, help="synthetic data size (fraction of MOSEI)")
    p.add_argument("--ds_config", default="ds_configs/zero2.json")
    p.add_argument("--gpu", action="store_true", help="use the GPUs (pass --ds_config ds_configs/zero2_bf16.json)")
    p.add_argument("--cache_dir", default=os.environ.get("MMOLRE_CACHE", os.path.expanduser("~/.cache/mmolre")))
    p.add_argument("--json")
    args = p.parse_args(argv)
    ranks = {"low-rank": 16, "full-rank": args.d_model}
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for procs, experts, (kind, rank) in itertools.product(
                [int(x) for x in args.processes.split(",")], [int(x) for x in args.experts.split(",")],
                ranks.items()):
            row = {**run(procs, experts, rank, args, workdir), "kind": kind}
            rows.append(row)
            print(f"  {procs} process(es), ep {row['ep_size']}, {experts:4d} experts, {kind:9s}: "
                  f"{row['samples_per_s']:8.1f} samples/s, expert bytes/rank {row['expert_bytes_per_rank']:,}",
                  flush=True)

    def find(**kw):
        return next((r for r in rows if all(r[k] == v for k, v in kw.items())), None)

    summary = {}
    for procs in {r["processes"] for r in rows}:
        a, b = find(processes=procs, experts=128, kind="low-rank"), find(processes=procs, experts=8, kind="low-rank")
        if a and b:
            summary[f"throughput_128_vs_8_p{procs}"] = a["samples_per_s"] / b["samples_per_s"]
    for experts in {r["experts"] for r in rows}:
        one, two = find(processes=1, experts=experts, kind="low-rank"), find(processes=2, experts=experts,
                                                                               kind="low-rank")
        if one and two:
            summary[f"expert_bytes_ep2_over_ep1_e{experts}"] = two["expert_bytes_per_rank"] / one["expert_bytes_per_rank"]
        low, full = find(processes=1, experts=experts, kind="low-rank"), find(processes=1, experts=experts,
                                                                               kind="full-rank")
        if low and full:
            summary[f"lowrank_speedup_over_fullrank_e{experts}"] = low["samples_per_s"] / full["samples_per_s"]
            summary[f"lowrank_expert_bytes_fraction_e{experts}"] = (low["expert_bytes_per_rank"]
                                                                    / full["expert_bytes_per_rank"])
    print("\n| processes | ep | experts | experts | samples/s | expert bytes per rank |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} | {r['ep_size']} | {r['experts']} | {r['kind']} | {r['samples_per_s']:.1f} | "
              f"{r['expert_bytes_per_rank']:,} |")
    for k, v in sorted(summary.items()):
        print(f"{k}: {v:.3f}")
    result = {"runs": rows, **summary, "d_model": args.d_model, "steps": args.steps, "batch_size": args.batch_size,
              "device": "gpu" if args.gpu else f"cpu ({os.cpu_count()} cores)"}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
