"""How many steps the temporal front end keeps: speed and validation accuracy, side by side in one run.

On an MMSA-format file with long unaligned audio/vision (default: `mmolre synthetic --like mosi-unaligned`),
trains this trainer once per `--temporal_steps` value (0 = no front end, every step enters the experts) with
the same seed, processes and flags, and reports seconds per epoch (relative to no front end) and the best
validation MAE. Selection is on the validation split only; the test split is not read here.

    python bench/temporal_steps.py --steps 0,25,50,100 --out bench/results/temporal_steps
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.commands import command_line, passthrough_parser  # noqa: E402
from bench.vs_mmsa import prebuilt_cache, run_mmolre, synthetic_like  # noqa: E402


def main(argv=None) -> dict:
    p = passthrough_parser(__doc__)
    p.add_argument("--like", default="mosi-unaligned")
    p.add_argument("--steps", default="0,25,50,100")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "temporal_steps"))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "temporal_steps"))
    args, flags = p.parse_known_args(argv)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    args.data, args.dataset = synthetic_like(args.like, work), args.like.split("-")[0]
    cache = prebuilt_cache(args.data, work)
    rows = {}
    for steps in (int(s) for s in args.steps.split(",")):
        r = run_mmolre(args.processes, args, os.path.join(work, f"steps{steps}"),
                       [*flags, "--temporal_steps", str(steps)], cache=cache)
        rows[steps] = {"seconds_per_epoch": r["train_s"] / r["epochs"], "wall_s": r["wall_s"],
                       "best_valid_mae": min(v["mae"] for v in r["valid"]), "epochs": r["epochs"]}
        print(steps, rows[steps], flush=True)
    base = rows.get(0)
    lines = [f"`{command_line(__file__, argv)}` "
             f"({args.processes} processes, {args.threads} threads in all, seed {args.seed}, "
             f"mmolre synthetic --like {args.like})", "",
             "| --temporal_steps | train s / epoch | speed-up vs no front end | best valid MAE | wall time |",
             "|---|---|---|---|---|"]
    for steps, r in rows.items():
        speed = f"{base['seconds_per_epoch'] / r['seconds_per_epoch']:.1f}x" if base else "—"
        lines.append(f"| {steps or '0 (none)'} | {r['seconds_per_epoch']:.1f} | {speed} | {r['best_valid_mae']:.4f} | "
                     f"{r['wall_s']:.0f} s |")
    md = "\n".join(lines)
    print(md)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"rows": rows, "flags": flags, "like": args.like, "processes": args.processes}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(md + "\n")
    return rows


if __name__ == "__main__":
    main()
