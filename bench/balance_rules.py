"""aux_free's bias update when a step routes fewer rows than there are experts (issue 23, item 2): the sign
rule against the relative rule, on the routing study's data (real MOSEI text, bench/routing_study.py).

Per run, from the epochs' training routes (`history[i]`): the dead experts (no route of either task) and the
busiest expert's routes over the mean (the worse task and layer), at the end of the first epoch and the worst
of the later epochs; and the dev loss the checkpoint was chosen by (never the test split). Runs are reused by
name, as the routing study's.

    python bench/balance_rules.py --experts 1024 --top_ks 1,2,4 --seeds 1 --out bench/results/balance_rules
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.commands import command_line  # noqa: E402
from bench.real_labels import encoder_label, train_mmolre  # noqa: E402
from bench.routing_study import study_data, study_parser  # noqa: E402
from bench.uniform_reference import reference_for  # noqa: E402


def epoch_balance(results: dict) -> list[tuple[int, float]]:
    """(dead experts summed over layers, worst layer's train load max/mean) per epoch."""
    return [(sum(h["dead_experts"].values()), max(h["train_load_max_over_mean"].values()))
            for h in results["history"]]


def row(results: dict, update: str, rate: str, path: str) -> dict:
    per_epoch = epoch_balance(results)
    later = per_epoch[1:] or per_epoch
    best = results["history"][results["best_epoch"] - 1]
    return {"num_experts": results["num_experts"], "top_k": results["top_k"], "update": update, "rate": rate,
            "route_per": results["config"]["model"].get("route_per", "utterance"),
            "seed": results["seed"], "dead_epoch1": per_epoch[0][0], "load_epoch1": per_epoch[0][1],
            "dead_later_max": max(d for d, _ in later), "load_later_max": max(r for _, r in later),
            "dead_last": per_epoch[-1][0], "load_last": per_epoch[-1][1],
            **reference_for(path, results),
            "dev_loss": best["valid_loss"], "per_epoch": per_epoch}


def main(argv=None) -> None:
    p = study_parser(__doc__, "1024", "1", "balance_rules")
    p.add_argument("--updates", default="sign,relative")
    p.add_argument("--rates", default="0.01", help="--balance_bias_rate values")
    args, extra = p.parse_known_args(argv)
    path, suffix = study_data(p, args, extra, {"--num_experts", "--top_k", "--balance", "--seed",
                                               "--balance_bias_update", "--balance_bias_rate"})
    rows = []
    for e in args.experts.split(","):
        for k in args.top_ks.split(","):
            for update in args.updates.split(","):
                for rate in args.rates.split(","):
                    for s in args.seeds.split(","):
                        name = f"e{e}_k{k}_aux_free_{update}_r{rate}_s{s}{suffix}"
                        run = train_mmolre("mosei", path, os.path.join(args.work, "runs"), name,
                                           ["--num_experts", e, "--top_k", k, "--balance", "aux_free",
                                            "--balance_bias_update", update, "--balance_bias_rate", rate,
                                            "--seed", s, *extra], args.processes)
                        with open(os.path.join(run, "results.json")) as f:
                            rows.append(row(json.load(f), update, rate, path))
                        r = rows[-1]
                        print(f"{name}: dead {r['dead_epoch1']} then <= {r['dead_later_max']}, load max/mean "
                              f"{r['load_epoch1']:.2f} then <= {r['load_later_max']:.2f}, dev loss {r['dev_loss']:.4f}",
                              flush=True)
    lines = [f"`{command_line(__file__, argv)}`", "",
             f"MOSEI text (encoder {encoder_label(args.encoder)}), {args.processes} processes, expert parallelism "
             f"{args.processes}, `--balance aux_free`, extra flags {' '.join(extra) or 'none'}. Training routes of each "
             "epoch: dead experts summed over the 2 MoE layers, the busiest expert's routes over the mean (worst layer "
             "and task); epoch 1, the worst of epochs 2 to the last, and the last. `uniform`: what content-blind "
             "uniform random routing of the same routes gives (bench/uniform_reference.py; a yardstick, not a "
             "bound). Dev loss at the selected epoch.", "",
             "| experts | top-k | route per | update | rate | seed | dead, epoch 1 / later (max) / last | uniform: dead "
             "| load max/mean, epoch 1 / later (max) / last | uniform: max/mean | dev loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['num_experts']} | {r['top_k']} | {r['route_per']} | {r['update']} | {r['rate']} | "
                     f"{r['seed']} | {r['dead_epoch1']} / {r['dead_later_max']} / {r['dead_last']} | "
                     f"{r['uniform_dead']:.1f} | {r['load_epoch1']:.2f} / {r['load_later_max']:.2f} / "
                     f"{r['load_last']:.2f} | {r['uniform_load']:.2f} | {r['dev_loss']:.4f} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
