"""`mmolre`: the commands around training (training itself is `deepspeed launch.py ...`).

    mmolre show RUN_DIR                 print a finished run's test table from its results.json
    mmolre synthetic OUT.pkl [--scale]  write the embedded synthetic dataset as an MMSA-schema pickle
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys


def _show(args) -> int:
    from .report import format_table
    path = os.path.join(args.run_dir, "results.json")
    if not os.path.isfile(path):
        print(f"error: {path} does not exist (has the run finished?)", file=sys.stderr)
        return 2
    with open(path) as f:
        results = json.load(f)
    print(f"{args.run_dir}: world {results['world_size']}, expert parallel {results['ep_size']}, "
          f"{results['num_experts']} experts, top-{results['top_k']}, best epoch {results['best_epoch']}")
    print(format_table(results))
    return 0


def _synthetic(args) -> int:
    from .data.synthetic import generate, split_sizes
    with open(args.out, "wb") as f:
        pickle.dump(generate(args.scale, args.seed), f, protocol=4)
    print(f"wrote {args.out}: synthetic MOSEI-like data, splits {split_sizes(args.scale)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mmolre", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print a finished run's results table")
    show.add_argument("run_dir")
    show.set_defaults(func=_show)
    syn = sub.add_parser("synthetic", help="write the synthetic dataset as an MMSA-schema pickle")
    syn.add_argument("out")
    syn.add_argument("--scale", type=float, default=0.5, help="fraction of MOSEI's split sizes")
    syn.add_argument("--seed", type=int, default=0)
    syn.set_defaults(func=_synthetic)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
