"""What an epoch costs besides training: validation (with its logging) and the checkpoint (issue 25, item 4: at most
10 % of an epoch).

Runs this trainer at its defaults on an MMSA-shaped file (`mmolre synthetic --like`, the file bench/vs_mmsa.py
uses) with 2 and 1 processes, and with each `--variant FLAGS` on top, one run after the other, all in one
invocation. Each run's results.json holds the seconds the trainer records per epoch (`train.epoch_seconds`: the
training loop, the validation, the checkpoint); the table shows their medians over the epochs and the overhead,
(validation + checkpoint) / the epochs' whole time (`train.epoch_overhead`). The Arrow cache is built once, before
the timed runs. By default the second row per process count evaluates in batches of one micro batch
(`--eval_batch_size 32`), the size evaluation used before the flag existed.

    python bench/epoch_overhead.py --out bench/results/epoch_overhead
    python bench/epoch_overhead.py --like mosi-aligned --variant='--d_model 128'
"""
from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.commands import command_line, passthrough_parser, refuse_owned_flags, write_result  # noqa: E402
from mmolre.data.synthetic import LIKE  # noqa: E402
from mmolre.distributed import free_port  # noqa: E402

OWNED_BY_BENCHMARK = {"--run_name", "--output_dir", "--ep_size", "--data_path", "--dataset"}
PHASES = ("train", "validate", "checkpoint")


def one_run(processes: int, data: str, work: str, name: str, flags: list[str]) -> dict:
    """One run of the trainer; its per-epoch seconds and overhead as results.json records them."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes), "--master_port",
           str(free_port()), "launch.py", "--ds_config", "ds_configs/zero2.json", "--dataset", "mosi", "--data_path",
           data, "--ep_size", str(processes), "--output_dir", work, "--run_name", name, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // processes)),
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"), "MMOLRE_CACHE": os.path.join(work, "cache")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(work, name, "results.json")) as f:
        results = json.load(f)
    epochs = results["train"]["epoch_seconds"]
    return {"epochs": epochs, "overhead": results["train"]["epoch_overhead"],
            **{phase: statistics.median(e[phase] for e in epochs) for phase in PHASES}}


def main(argv=None) -> dict:
    p = passthrough_parser(__doc__)
    p.add_argument("--like", default="mosi-unaligned", choices=sorted(LIKE))
    p.add_argument("--processes", default="2,1")
    p.add_argument("--variant", action="append", default=None,
                   help="launch.py flags for one more row per process count (default: '--eval_batch_size 32')")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "epoch_overhead"))
    args, flags = p.parse_known_args(argv)
    refuse_owned_flags(p, flags, OWNED_BY_BENCHMARK, "are set by the benchmark for each run")
    variants = ["", *(args.variant if args.variant is not None else ["--eval_batch_size 32"])]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, f"synthetic_{args.like}.pkl")
        subprocess.run([sys.executable, "-m", "mmolre.cli", "synthetic", data, "--like", args.like], cwd=ROOT,
                       check=True, capture_output=True)
        from mmolre.data.cache import build_cache
        build_cache(data, os.path.join(work, "cache"))
        for n in [int(x) for x in args.processes.split(",")]:
            for i, variant in enumerate(variants):
                run = one_run(n, data, work, f"p{n}_v{i}", [*flags, *shlex.split(variant)])
                rows.append({"processes": n, "variant": variant, **run})
                print(f"{n} process(es) {variant or 'defaults'}: " + ", ".join(f"{k} {run[k]:.2f} s" for k in PHASES)
                      + f" per epoch; overhead {run['overhead']:.1%}", flush=True)
    lines = [f"`{command_line(__file__, argv)}`", "",
             f"| {args.like} file | training s / epoch | validation s / epoch | checkpoint s / epoch | overhead "
             f"(validation + checkpoint) / epoch |", "|---|---|---|---|---|"]
    for r in rows:
        name = f"{r['processes']} process{'es' if r['processes'] > 1 else ''}" + (f", `{r['variant']}`"
                                                                                  if r["variant"] else "")
        lines.append(f"| {name} | {r['train']:.2f} | {r['validate']:.2f} | {r['checkpoint']:.3f} | "
                     f"{r['overhead']:.1%} |")
    report = {"command": command_line(__file__, argv), "flags": flags, "like": args.like, "rows": rows}
    write_result(args.out, report, lines)
    return report


if __name__ == "__main__":
    main()
