"""The paper's ablations and the baselines it argues against, each over several seeds, on one data set.

Every variant is one set of launch.py flags; each (variant, seed) is a run directory under --output_dir
(finished runs are kept, so the study can be resumed; one made with other settings, such as an older
default, is refused by name rather than counted: bench/reuse.py). The table is `mmolre report`'s, grouped by
variant, mean ± std over seeds.

    python bench/ablations.py --seeds 1,2,3 --out bench/results/ablations_synthetic.md
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.commands import passthrough_parser  # noqa: E402
from bench.reuse import finished_run  # noqa: E402
from mmolre.distributed import free_port  # noqa: E402

VARIANTS = {
    "MMoLRE (full)": [],
    "w/o shared experts": ["--shared_experts", "false"],
    "w/o task-specific experts": ["--task_experts", "false"],
    "w/o routers (uniform mixture)": ["--routers", "false"],
    "full-rank experts": ["--full_rank", "true"],
    "w/o UniTSE block 2": ["--blocks", "1"],
    "concatenation instead of fusion": ["--fusion", "concat"],
    "sentiment only": ["--tasks", "sentiment"],
    "emotions only": ["--tasks", "emotion"],
    "baseline: hard sharing": ["--model", "hard_sharing"],
    "baseline: MMoE (dense)": ["--model", "mmoe"],
}


def main(argv=None) -> str:
    p = passthrough_parser(__doc__)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--output_dir", default="runs/ablations")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from the list above")
    p.add_argument("--out", help="write the markdown table here")
    args, launch_args = p.parse_known_args(argv)
    launch_args = launch_args or ["--synthetic_scale", "0.1", "--epochs", "3"]
    names = [v for v in args.variants.split(",") if v]
    dirs = {}
    for name in names:
        for seed in args.seeds.split(","):
            run = f"{name.replace(' ', '_').replace('/', '').replace(':', '').replace('(', '').replace(')', '')}_s{seed}"
            path = os.path.join(args.output_dir, run)
            dirs.setdefault(name, []).append(path)
            launch = [*launch_args, *VARIANTS[name], "--seed", seed, "--output_dir", args.output_dir, "--run_name", run]
            if finished_run(path, launch, args.processes):   # (one made with other settings is refused)
                continue
            env = {**os.environ}
            env.setdefault("DS_ACCELERATOR", "cpu")
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.processes),
                   "--master_port", str(free_port()), "launch.py", *launch]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{run} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
            print(f"  done {run}", flush=True)
    from mmolre.report import REPORT_METRICS, load_runs, mean_std, metric
    head = ["variant", "runs", "params", "active/utt."] + [".".join(m[1:]) for m in REPORT_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        runs = load_runs(dirs[name])
        cells = [name, str(len(runs)), f"{runs[0]['params']['total']:,}", f"{runs[0]['params']['active_per_utterance']:,}"]
        for m in REPORT_METRICS:
            values = [v for v in (metric(r, m) for r in runs) if v is not None]
            mu, sd = mean_std(values)
            cells.append(f"{mu:.4f} ± {sd:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(f"launch.py {' '.join(launch_args)}, {args.processes} process(es), seeds {args.seeds}\n\n"
                    + table + "\n")
    return table


if __name__ == "__main__":
    main()
