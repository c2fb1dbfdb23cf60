"""`--expert_optimizer lazy` against `dense` on real labels, before any default changes.

The real-label setting of bench/real_labels.py (text only, frozen all-MiniLM-L6-v2 features of the real MOSI
and MOSEI transcripts, 2 processes, expert parallelism 2), with many experts, so that most of them wait in most
steps and the two optimizers differ: each seed trains once with `--expert_optimizer dense` and once with `lazy`,
everything else equal. The table reads the validation split first (what a choice may look at), then the test
split, and how often an expert took a step under lazy (its own step count over the run's steps, from the final
checkpoint's expert state files).

    python bench/lazy_vs_dense.py --num_experts 1024 --seeds 1,2,3 --out bench/results/lazy_vs_dense
"""
from __future__ import annotations

import glob
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.commands import command_line, passthrough_parser, refuse_owned_flags  # noqa: E402
from bench.real_labels import REAL, default_encoder, featurize, summarise, train_mmolre  # noqa: E402
from mmolre.report import load_runs, metric  # noqa: E402

MODES = ("dense", "lazy")


def best_valid(run: dict, path: tuple) -> float:
    """A validation metric at the epoch the run selected (its best validation loss)."""
    return metric(run["history"][run["best_epoch"] - 1], ("valid", *path))


def expert_step_fraction(run_dir: str) -> float:
    """Mean over experts of (the expert's own AdamW steps) / (the run's optimizer steps), final checkpoint."""
    with open(os.path.join(run_dir, "results.json")) as f:
        steps = json.load(f)["global_step"]
    tags = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "step*")))
    counts = [v["step"].float() for path in glob.glob(os.path.join(tags[-1], "expert_state_rank*.pt"))
              for v in torch.load(path, map_location="cpu", weights_only=True, mmap=True)["layers"].values()]
    return float(torch.cat(counts).mean()) / steps


def main(argv=None) -> dict:
    p = passthrough_parser(__doc__)
    p.add_argument("--encoder", default=default_encoder(), help="a local Hugging Face model directory")
    p.add_argument("--datasets", default="mosi,mosei")
    p.add_argument("--real_dir", default=REAL)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "lazy_vs_dense"))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "lazy_vs_dense"))
    args, extra = p.parse_known_args(argv)
    refuse_owned_flags(p, extra, {"--seed", "--expert_optimizer"}, "set per run by this script")
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.work, exist_ok=True)
    report = {"command": command_line(__file__, argv), "launch_extra": extra, "seeds": seeds, "datasets": {}}
    lines = [f"`{report['command']}`", "",
             f"Text only, frozen encoder features of the real transcripts (as bench/real_labels.py); "
             f"{args.processes} processes, expert parallelism {args.processes}; mean ± std over seeds {args.seeds}. "
             f"Valid: at the epoch each run selected on validation loss.", "",
             "| dataset | `--expert_optimizer` | valid MAE | valid corr | valid emotion micro-F1 | test MAE | test corr | "
             "test emotion micro-F1 | expert steps / run steps |", "|---|---|---|---|---|---|---|---|---|"]
    for name in args.datasets.split(","):
        path = featurize(name, args.encoder, args.work, args.real_dir)
        report["datasets"][name] = {}
        for mode in MODES:
            dirs = [train_mmolre(name, path, os.path.join(args.work, "runs"), f"{name}_{mode}_s{s}",
                                 ["--seed", str(s), "--expert_optimizer", mode, *extra], args.processes)
                    for s in seeds]
            runs = load_runs(dirs)
            emotions = "emotion" in runs[0]["test"]
            cell = {"valid_mae": [best_valid(r, ("sentiment", "mae")) for r in runs],
                    "valid_corr": [best_valid(r, ("sentiment", "corr")) for r in runs],
                    "test_mae": [metric(r, ("test", "sentiment", "mae")) for r in runs],
                    "test_corr": [metric(r, ("test", "sentiment", "corr")) for r in runs],
                    "expert_step_fraction": [expert_step_fraction(d) for d in dirs]}
            if emotions:
                cell["valid_micro_f1"] = [best_valid(r, ("emotion", "micro_f1")) for r in runs]
                cell["test_micro_f1"] = [metric(r, ("test", "emotion", "micro_f1")) for r in runs]
            report["datasets"][name][mode] = cell
            lines.append(f"| {name.upper()} | {mode} | {summarise(cell['valid_mae'])} | {summarise(cell['valid_corr'])} | "
                         f"{summarise(cell['valid_micro_f1']) if emotions else ''} | {summarise(cell['test_mae'])} | "
                         f"{summarise(cell['test_corr'])} | {summarise(cell['test_micro_f1']) if emotions else ''} | "
                         f"{np.mean(cell['expert_step_fraction']):.3f} |")
            print(lines[-1], flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
