"""`mmolre`: the commands around training (training itself is `deepspeed launch.py ...`).

    mmolre show RUN_DIR                 print a finished run's test table from its results.json
    mmolre synthetic OUT.pkl [--like NAME] [--scale]  synthetic data as an MMSA-schema pickle
    mmolre export RUN_DIR OUT_DIR       a shareable model directory: model.safetensors, config.json, README.md
    mmolre predict MODEL_DIR DATA       run an exported model on CPU, no DeepSpeed engine or launcher
    mmolre report RUN_DIR...            group runs (experts, top-k, ... ), mean ± std over seeds, figures
    mmolre reshard RUN_DIR --world_size N --ep_size E   lay the latest checkpoint out for another topology
    mmolre featurize TABLE OUT.pkl      transcripts -> a text-only MMSA-schema dataset (a HF text encoder)
    mmolre data inspect PATH            splits, sizes, shapes, dtypes, label statistics, NaN/inf counts
    mmolre data verify PATH             the file's SHA-256 against the hashes MMSA publishes
    mmolre data convert FILE.pkl OUT_DIR  the checked dataset as Arrow files (no pickle) for --data_path
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _show(args) -> int:
    from .results import format_table
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
    from .data.schema import write_dataset
    from .data.synthetic import generate, generate_like
    if args.like:
        data = generate_like(args.like, 1.0 if args.scale is None else args.scale, args.seed)
        what = f"synthetic data shaped like MMSA's {args.like} file"
    else:
        scale = 0.5 if args.scale is None else args.scale
        data, what = generate(scale, args.seed), "synthetic MOSEI-like data (the embedded default)"
    write_dataset(data, args.out)
    shapes = ", ".join(f"{m} {tuple(data['train'][m].shape[1:])}" for m in ("text", "audio", "vision"))
    sizes = " / ".join(str(len(data[s]["id"])) for s in ("train", "valid", "test"))
    print(f"wrote {args.out}: {what}; {sizes} train/valid/test; {shapes}")
    return 0


def _export(args) -> int:
    from .export import export
    config = export(args.run_dir, args.out, args.tag)
    n = sum(v.numel() for v in config["state_dict"].values())
    print(f"wrote {args.out}/: model.safetensors ({n:,} fp32 parameters), config.json, README.md; checkpoint "
          f"{config['checkpoint']} of {args.run_dir}")
    return 0


def _predict(args) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from .results import write_predictions
    from .shared_model import load_model
    model = load_model(args.model, trust_pickle=args.trust_pickle)
    preds = model.predict(args.data, args.split, args.cache_dir)
    write_predictions(args.out, preds, model.thresholds)
    how = ("emotion decisions <emotion>_pred at the thresholds chosen on the validation split" if model.thresholds
           else "no emotion thresholds in this export (not the selected checkpoint of a finished run with emotion "
                "labels, or an export of an earlier version): emotion probabilities only")
    print(f"wrote {args.out}: {len(preds['ids'])} predictions for split {args.split!r} of {args.data}; {how}")
    return 0


def _reshard(args) -> int:
    """Run the trainer's own resume under the target topology in CPU processes (the deepspeed launcher,
    gloo) and save the checkpoint laid out for it: no GPU and no training needed. It reads the run's data
    (for the schedule's plan), so run it where the training ran: relative paths in config.json resolve
    against the current directory."""
    import subprocess
    import tempfile
    from .config import RunConfig
    from .distributed import free_port
    run_dir = os.path.abspath(args.run_dir)
    with open(os.path.join(run_dir, "config.json")) as f:
        recorded = json.load(f)
    ds_config = dict(recorded.pop("ds_config"))
    ds_config.pop("train_batch_size", None)   # it was derived for the old world size
    cfg = RunConfig.from_dict(recorded)
    cfg.train.resume, cfg.train.reshard_only, cfg.train.ep_size = True, True, args.ep_size
    cfg.train.output_dir, cfg.train.run_name = os.path.dirname(run_dir), os.path.basename(run_dir)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ds_config, f)
    cfg.train.ds_config = f.name
    flags = [f"--{name}={value}" for section in cfg.to_dict().values() for name, value in section.items()
             if value is not None]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.world_size),
           "--master_port", str(free_port()), "--module", "mmolre.launcher", *flags]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    try:
        done = subprocess.run(cmd, env=env)
    finally:
        os.unlink(f.name)
    return done.returncode


def _report(args) -> int:
    from .report import REPORT_METRICS, STUDY_METRICS, load_runs, markdown_report, plot_sweep
    runs = load_runs(args.run_dirs)
    table = markdown_report(runs, STUDY_METRICS if args.study else REPORT_METRICS)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: --plot needs matplotlib: pip install 'mmolre[plot]'", file=sys.stderr)
            return 2
        metric = tuple(args.metric.split("."))
        for path in plot_sweep(runs, args.plot, metric):
            print(f"wrote {path}")
    return 0


def _bclstm(args) -> int:
    from .data.bclstm import convert
    report = convert(args.npz, args.labels, args.out, args.dev_fraction, args.split_seed)
    sizes = " / ".join(f"{report['samples'][s]} ({report['videos'][s]} videos)" for s in ("train", "valid", "test"))
    print(f"wrote {args.out}: text, audio, vision [*, 1, 50] (bc-LSTM unimodal features), poria's split: {sizes} "
          f"train/valid/test")
    return 0


def _featurize(args) -> int:
    from .data.featurize import FeaturizeOptions, featurize
    opts = FeaturizeOptions(text_encoder=args.text_encoder, max_length=args.max_length, batch_size=args.batch_size,
                            skip_missing_text=args.skip_missing_text, train_from=args.train_from,
                            dev_fraction=args.dev_fraction, split_seed=args.split_seed, device=args.device,
                            transcripts_only=args.transcripts_only)
    report = featurize(args.table, args.out, opts)
    sizes = " / ".join(str(report["samples"][s]) for s in ("train", "valid", "test"))
    what = ("transcripts (raw_text) and labels, no features" if args.transcripts_only else
            f"text [*, {report['max_length']}, {report['hidden_size']}] from {args.text_encoder}")
    print(f"wrote {args.out}: {what}, {sizes} train/valid/test")
    for reason, left in report["left_out"].items():
        ids = left["ids"]
        print(f"  left out, {reason}: {left['count']} rows ({', '.join(ids[:3])}{' ...' if len(ids) > 3 else ''})")
    return 0


def _data_inspect(args) -> int:
    from .data.inspect import inspect
    print(inspect(args.path))
    return 0


def _data_verify(args) -> int:
    from .data.inspect import verify
    digest, known = verify(args.path)
    if known:
        print(f"{args.path}: OK, sha256 {digest} is MMSA's {known}")
        return 0
    print(f"{args.path}: sha256 {digest} matches none of the files MMSA publishes", file=sys.stderr)
    return 1


def _data_convert(args) -> int:
    from .data.converted import convert
    tolerance = {} if args.emotion_join_tolerance is None else {"join_tolerance": args.emotion_join_tolerance}
    meta = convert(args.pkl, args.out, args.emotion_labels, **tolerance)
    sizes = " / ".join(str(meta["splits"][s]["samples"]) for s in ("train", "valid", "test"))
    shapes = ", ".join(f"{m} {tuple(meta['shapes'][m])}" for m in meta["modalities"])
    replaced = {s: r["nonfinite_replaced"] for s, r in meta["splits"].items() if r["nonfinite_replaced"]}
    print(f"wrote {args.out}/: train/valid/test.arrow and meta.json ({sizes} train/valid/test; {shapes})"
          + (f"; non-finite feature values replaced by 0: {replaced}" if replaced else "")
          + f"\ntrain on it with --data_path {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmolre", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_model_commands(sub)
    _add_data_commands(sub)
    return parser


def _add_run_commands(sub) -> None:
    """What reads finished runs: show, report, reshard."""
    show = sub.add_parser("show", help="print a finished run's results table")
    show.add_argument("run_dir")
    show.set_defaults(func=_show)
    rep = sub.add_parser("report", help="a table (and figures) over many runs, e.g. a sweep")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", help="also write the markdown table here")
    rep.add_argument("--plot", help="write PREFIX_vs_experts.png and PREFIX_heatmap.png (needs matplotlib)")
    rep.add_argument("--metric", default="test.sentiment.mae", help="the metric the figures show")
    rep.add_argument("--study", action="store_true", help="the routing study's columns: accuracy, load balance, "
                     "dead experts, specialisation (routing_stats) and samples/s")
    rep.set_defaults(func=_report)
    res = sub.add_parser("reshard", help="lay a run's latest checkpoint out for another world size and "
                                         "expert-parallel size, offline on CPU")
    res.add_argument("run_dir")
    res.add_argument("--world_size", type=int, required=True, help="processes of the run that will resume it")
    res.add_argument("--ep_size", type=int, required=True, help="its expert-parallel size")
    res.set_defaults(func=_reshard)


def _add_model_commands(sub) -> None:
    """A trained model out of its run, and predictions from it: export, predict."""
    exp = sub.add_parser("export", help="write a shareable model directory (model.safetensors, config.json, "
                                        "README.md; no pickle) from a run's checkpoint")
    exp.add_argument("run_dir")
    exp.add_argument("out", help="the directory to write")
    exp.add_argument("--tag", default="best", help="'best' (validation's choice), 'latest', or a tag name")
    exp.set_defaults(func=_export)
    pred = sub.add_parser("predict", help="predict with an exported model on CPU")
    pred.add_argument("model", help="a directory `mmolre export` wrote")
    pred.add_argument("data", help="a dataset `mmolre data convert` wrote, or an MMSA-schema pickle (opening a "
                                   "pickle runs code: use files you trust)")
    pred.add_argument("--trust_pickle", action="store_true",
                      help="load an earlier version's export, one torch pickle (.pt): unpickling runs any code the "
                           "file names, so only for a file you trust")
    pred.add_argument("--split", default="test", choices=["train", "valid", "test"])
    pred.add_argument("--out", default="predictions.csv")
    pred.add_argument("--cache_dir", default=None, help="Arrow cache directory (default: as for training)")
    pred.set_defaults(func=_predict)


def _add_data_commands(sub) -> None:
    """Datasets: synthetic, featurize, bclstm, data inspect|verify."""
    syn = sub.add_parser("synthetic", help="write the synthetic dataset as an MMSA-schema pickle")
    syn.add_argument("out")
    syn.add_argument("--like", choices=["mosi-aligned", "mosi-unaligned", "mosei-aligned", "mosei-unaligned"],
                     help="MMSA's shapes, lengths, -inf and split sizes for that file (BERT text 50x768 with "
                          "text_bert; unaligned audio/vision 375-500 steps with lengths) instead of the default")
    syn.add_argument("--scale", type=float, default=None,
                     help="fraction of the split sizes (default 0.5 of MOSEI's; with --like, 1.0)")
    syn.add_argument("--seed", type=int, default=0)
    syn.set_defaults(func=_synthetic)
    _add_featurize(sub)
    bc = sub.add_parser("bclstm", help="the released bc-LSTM unimodal MOSI features (poria's split only) -> a "
                                       "trimodal MMSA-schema pickle")
    bc.add_argument("npz", help="mosi_bclstm_unimodal_50d.npz (shared/data/real/mosi/)")
    bc.add_argument("labels", help="mosi_labels.csv: the real-valued sentiment, joined by id")
    bc.add_argument("out", help="the pickle to write")
    bc.add_argument("--dev_fraction", type=float, default=0.2, help="share of poria's train videos kept for "
                                                                    "validation")
    bc.add_argument("--split_seed", type=int, default=0)
    bc.set_defaults(func=_bclstm)
    data = sub.add_parser("data", help="look at, verify or convert a dataset file").add_subparsers(dest="data_command", required=True)
    ins = data.add_parser("inspect", help="splits, sizes, shapes, dtypes, labels, NaN/inf counts of a pickle (opening "
                                          "it runs code: `verify` a downloaded file first) or of a converted dataset")
    ins.add_argument("path")
    ins.set_defaults(func=_data_inspect)
    ver = data.add_parser("verify", help="check a pickle's SHA-256 against MMSA's published hashes")
    ver.add_argument("path")
    ver.set_defaults(func=_data_verify)
    conv = data.add_parser("convert", help="a pickle, checked as for training, as Arrow files that --data_path "
                                           "reads (no pickle: safe to share and to open)")
    conv.add_argument("pkl", help="an MMSA-schema pickle (opening it runs code: convert files you trust)")
    conv.add_argument("out", help="the directory to write (new or empty)")
    conv.add_argument("--emotion_labels", default=None, help="join these emotion labels (as launch.py does)")
    conv.add_argument("--emotion_join_tolerance", type=float, default=None,
                      help="as launch.py's flag (default: the same)")
    conv.set_defaults(func=_data_convert)


def _add_featurize(sub) -> None:
    feat = sub.add_parser("featurize", help="transcripts in a label table -> a text-only MMSA-schema pickle")
    feat.add_argument("table", help="MMSA label.csv (video_id, clip_id, text, label, mode) or a MOSEI table")
    feat.add_argument("out", help="the pickle to write")
    feat.add_argument("--text_encoder", default="roberta-base",
                      help="a Hugging Face hub name or a local model directory (offline)")
    feat.add_argument("--max_length", type=int, default=50, help="tokens per utterance (MMSA uses 50)")
    feat.add_argument("--batch_size", type=int, default=32)
    feat.add_argument("--device", default="cpu")
    feat.add_argument("--skip_missing_text", action="store_true",
                      help="leave out (and list) rows without a transcript instead of failing")
    feat.add_argument("--train_from", default="train", choices=["train", "valid"],
                      help="'valid': divide the valid split by video into train and valid (MOSEI has no "
                           "train transcripts)")
    feat.add_argument("--dev_fraction", type=float, default=0.2, help="with --train_from valid: share of videos "
                                                                      "kept for validation")
    feat.add_argument("--split_seed", type=int, default=0)
    feat.add_argument("--transcripts_only", action="store_true",
                      help="write ids, transcripts and labels without running an encoder: the input of "
                           "launch.py --text_encoder DIR --finetune_text, which tokenizes them into its cache")
    feat.set_defaults(func=_featurize)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
