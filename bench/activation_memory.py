"""A micro batch's activation memory, measured beside what the memory estimate counts for it.

Each configuration runs in a fresh process (peak resident memory is a process's high-water mark): build the model
on MMSA MOSI shapes (text 50 x 768, audio 375 x 5, vision 500 x 20), then one training forward and backward at
the micro batch, or one evaluation forward without gradients at the evaluation batch; the table shows the peak
resident memory over what the built model held, and `memory_estimate`'s activation term for it (training:
`activation_bytes`; evaluation: `evaluation_activation_bytes`). One process, one thread, expert parallelism 1,
fp32, random features with every step valid.

    python bench/activation_memory.py --out bench/results/activation_memory
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.commands import command_line, write_result  # noqa: E402

SHAPES = {"text": (50, 768), "audio": (375, 5), "vision": (500, 20)}
CONFIGS = [("train", 32, []), ("eval", 128, []),
           ("train", 32, ["--num_experts", "1024"]), ("train", 32, ["--d_model", "256", "--num_experts", "1024"]),
           ("eval", 128, ["--d_model", "256", "--num_experts", "1024"]),
           ("train", 32, ["--route_per", "step"]), ("train", 32, ["--route_per", "step", "--num_experts", "1024"]),
           ("train", 32, ["--route_per", "step", "--num_experts", "4096"]),
           ("eval", 128, ["--route_per", "step", "--num_experts", "1024"])]


def measure(phase: str, batch: int, flags: list[str]) -> dict:
    """In this process: the peak over the built model, and the estimate's activation term."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from mmolre.config import parse_args
    from mmolre.memory_estimate import activation_bytes, evaluation_activation_bytes
    from mmolre.model import MMoLRE
    torch.set_num_threads(1)
    cfg = parse_args(["--dataset", "mosi", *flags])
    model = MMoLRE(cfg.model, SHAPES, ep_size=1)
    features = {m: torch.randn(batch, t, f) for m, (t, f) in SHAPES.items()}
    masks = {m: torch.ones(batch, t, dtype=torch.bool) for m, (t, _) in SHAPES.items()}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if phase == "eval":
        model.eval()
        with torch.no_grad():
            model(features, masks)
        estimate = evaluation_activation_bytes(cfg, SHAPES, batch, 4)
    else:
        out = model(features, masks)
        (out.sentiment.sum() + out.emotion_logits.sum()).backward()
        estimate = activation_bytes(cfg, SHAPES, batch, 4)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    return {"phase": phase, "batch": batch, "flags": flags, "measured_gb": (peak - before) / 2 ** 20,
            "estimate_gb": estimate / 2 ** 30}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", help=argparse.SUPPRESS)   # a configuration, as JSON, measured in this process
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "activation_memory"))
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return []
    rows = []
    for config in CONFIGS:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(config)], cwd=ROOT, check=True,
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = [f"`{command_line(__file__, argv)}`", "",
             "| phase | batch | flags | measured peak over the model, GB | estimate's activations, GB | "
             "estimate / measured |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['phase']} | {r['batch']} | `{' '.join(r['flags']) or 'defaults'}` | "
                     f"{r['measured_gb']:.2f} | {r['estimate_gb']:.2f} | {r['estimate_gb'] / r['measured_gb']:.1f} |")
    write_result(args.out, {"command": command_line(__file__, argv), "rows": rows}, lines)
    return rows


if __name__ == "__main__":
    main()
