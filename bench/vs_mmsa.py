"""Time to accuracy against MMSA 2.2.1 (the field's toolkit), side by side on one MMSA-format file.

Each system runs alone, one after the other, on the same cores with the same thread budget, on the same
pickle: MMSA's TFN, LMF and MulT (and MFN on aligned files) through `MMSA_run` with their default
configuration, then this trainer through the deepspeed launcher with 2 processes (expert parallelism 2)
and with 1 (and, per `--variant FLAGS`, a row with those flags on top). The table has the wall time of each process (start-up and data loading included; this trainer's
Arrow cache of the file is built once before the timed runs), the seconds
per epoch (between the first and the last validation, so start-up is not counted), the epochs, the test metrics of the checkpoint each system selected on validation, and the time
until its validation MAE first reached a target (default: the best validation MAE TFN reached).

    pip install -e ".[peers]"                                   # MMSA 2.2.1 and what its modules import
    python bench/vs_mmsa.py --like mosi-unaligned               # synthetic, MMSA's shapes (no real file needed)
    python bench/vs_mmsa.py --data MOSI/Processed/unaligned_50.pkl --dataset mosi

MMSA runs unmodified with two runtime shims for CPU and today's torch: `torch.cuda.set_device` (called
unconditionally) becomes a no-op, and `ReduceLROnPlateau` drops the `verbose=` argument torch removed.
Its data comes from `custom_feature` (the file given here), so no `dataset_root_dir` is needed. MulT is
capped in time (`--mult_cap`); a capped run is reported as not finished, with the epochs it completed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.commands import command_line, passthrough_parser, refuse_owned_flags  # noqa: E402
from mmolre.config import parse_args  # noqa: E402
from mmolre.distributed import free_port  # noqa: E402

# Every row of this trainer runs on the same file and seed, with its own run directory and expert parallelism.
OWNED_BY_BENCHMARK = {"--run_name", "--output_dir", "--seed", "--ep_size", "--data_path", "--dataset"}

MMSA_METRICS = {"mae": "MAE", "corr": "Corr", "non0_acc2": "Non0_acc_2", "has0_acc2": "Has0_acc_2"}


# ---- one MMSA model, in its own process -----------------------------------------------------------------

def _shim_mmsa_for_cpu() -> None:
    import torch
    import torch.optim.lr_scheduler as sched
    torch.cuda.set_device = lambda *a, **k: None        # MMSA calls it whatever the device
    plateau = sched.ReduceLROnPlateau

    class ReduceLROnPlateau(plateau):                   # torch removed `verbose`; MulT's trainer passes it
        def __init__(self, *args, verbose=None, **kwargs):
            super().__init__(*args, **kwargs)

    sched.ReduceLROnPlateau = ReduceLROnPlateau
    import MMSA.trains.singleTask.MULT as mult          # it imported the name before the shim
    mult.ReduceLROnPlateau = ReduceLROnPlateau


class EpochLog(logging.Handler):
    """MMSA logs one VAL line per epoch and one TEST line at the end: keep (seconds, MAE) of each."""

    def __init__(self, start: float, out: str):
        super().__init__()
        self.start, self.out = start, out   # start: wall-clock time the process was launched
        self.record_ = {"valid": [], "test": None, "finished": False}

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        values = {k: float(v) for k, v in re.findall(r"(\w+): (-?[\d.]+|nan)", msg)}
        if msg.startswith("VAL-"):
            self.record_["valid"].append({"seconds": time.time() - self.start, "mae": values.get("MAE")})
        elif msg.startswith("TEST-"):
            self.record_["test"] = values
        else:
            return
        _write_json(self.out, self.record_)   # after every epoch: a capped run keeps what it did


def mmsa_worker(model: str, dataset: str, data: str, aligned: bool, threads: int, seed: int, work: str,
                out: str, launched: float) -> None:
    import torch
    torch.set_num_threads(threads)
    _shim_mmsa_for_cpu()
    from MMSA import MMSA_run
    handler = EpochLog(launched, out)   # seconds from the launch, imports included, as for this trainer
    logging.getLogger("MMSA").addHandler(handler)
    # An aligned file has no audio/vision lengths, which MMSA reads unless the model is marked as needing
    # aligned data; that is all the flag changes for TFN, LMF and MulT (each still reads every step)
    config = {"need_data_aligned": True} if aligned else None
    MMSA_run(model, dataset, config=config, seeds=[seed], custom_feature=data, gpu_ids=[], num_workers=0,
             verbose_level=0, model_save_dir=work, res_save_dir=work, log_dir=work)
    handler.record_["finished"] = True
    _write_json(out, handler.record_)


def _write_json(path: str, content) -> None:
    """Whole or not at all: the cap's kill may come in the middle of a write."""
    with open(f"{path}.tmp", "w") as f:
        json.dump(content, f)
    os.replace(f"{path}.tmp", path)


def run_mmsa(model: str, args, work: str, cap: float | None) -> dict:
    out = os.path.join(work, f"mmsa_{model}.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, os.path.abspath(__file__), "--_mmsa_worker", model, "--dataset", args.dataset,
           "--data", args.data, "--threads", str(args.threads), "--seed", str(args.seed), "--work", work,
           *(["--aligned"] if args.aligned else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "CUDA_VISIBLE_DEVICES": ""}
    cmd += ["--_launched", repr(time.time())]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=cap)
        capped = False
    except subprocess.TimeoutExpired:
        proc, capped = None, True
    wall = time.perf_counter() - start
    if proc is not None and proc.returncode:
        raise RuntimeError(f"MMSA {model} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    record = json.load(open(out)) if os.path.exists(out) else {"valid": [], "test": None}
    test = record.get("test") or {}
    return {"system": f"MMSA 2.2.1 {model.upper()} ({args.threads} threads, its defaults)", "wall_s": wall,
            "epochs": len(record["valid"]), "valid": record["valid"], "capped": capped,
            "test": {k: test.get(v) for k, v in MMSA_METRICS.items()} if test else None}


# ---- this trainer ---------------------------------------------------------------------------------------

def valid_curve(run: str, start_wall: float) -> list[dict]:
    """(seconds since the launch, valid MAE) per epoch, from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(run, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tag = next(t for t in acc.Tags()["scalars"] if t.startswith("metrics/valid/") and t.endswith("sentiment/mae"))
    return [{"seconds": e.wall_time - start_wall, "mae": e.value} for e in acc.Scalars(tag)]


def run_mmolre(processes: int, args, work: str, flags: list[str], cache: str | None = None,
               variant: str = "") -> dict:
    """One run of this trainer; `variant`: launch.py flags on top of `flags`, named in its row."""
    name = f"mmolre_{processes}p" + ("_" + hashlib.sha1(variant.encode()).hexdigest()[:8] if variant else "")
    run = os.path.join(work, "runs", name)
    subprocess.run(["rm", "-rf", run])
    threads = max(1, args.threads // processes)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes), "--master_port",
           str(free_port()), "launch.py", "--ds_config", "ds_configs/zero2.json", "--dataset", args.dataset,
           "--data_path", args.data, "--ep_size", str(processes), "--output_dir", os.path.join(work, "runs"),
           "--run_name", name, "--seed", str(args.seed), *flags, *shlex.split(variant)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
           "MMOLRE_CACHE": cache or os.path.join(work, "cache")}
    start_wall, start = time.time(), time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    with open(f"{run}.log", "w") as f:
        f.write(proc.stdout + proc.stderr)
    if proc.returncode:
        raise RuntimeError(f"{name} failed (whole output in {run}.log):\n{proc.stderr[-3000:]}")
    results = json.load(open(os.path.join(run, "results.json")))
    sentiment = results["test"]["sentiment"]
    args.constant_mae = results["baselines"]["mean_mae"]   # the train mean, predicted for every test sample
    return {"system": f"this trainer{f' `{variant}`' if variant else ''}, {processes} "
                      f"process{'es' if processes > 1 else ''} "
                      f"(expert parallel {processes}, {threads} thread{'s' if threads > 1 else ''} each)",
            "wall_s": wall, "epochs": results["train"]["epochs"], "valid": valid_curve(run, start_wall),
            "capped": False, "train_s": results["train"]["seconds"],
            "test": {k: sentiment.get(k) for k in MMSA_METRICS}}


def synthetic_like(like: str, work: str) -> str:
    """The file `mmolre synthetic --like LIKE` writes, made once under work."""
    path = os.path.join(work, f"synthetic_{like}.pkl")
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-m", "mmolre.cli", "synthetic", path, "--like", like], cwd=ROOT, check=True)
    return path


def prebuilt_cache(data: str, work: str) -> str:
    """This trainer's Arrow cache of `data`, built once before the timed runs, as any later run of the same
    file finds it (MMSA unpickles the file in every run; this trainer memory-maps its cache)."""
    from mmolre.data.cache import build_cache
    cache = os.path.join(work, "cache")
    build_cache(data, cache)
    return cache


# ---- the table ------------------------------------------------------------------------------------------

def time_to(curve: list[dict], target: float) -> float | None:
    return next((p["seconds"] for p in curve if p["mae"] is not None and p["mae"] <= target), None)


def table(rows: list[dict], target: float, what: str) -> str:
    lines = [f"| {what} | wall time | s / epoch | epochs | test MAE | Non0 Acc-2 | Corr | time to valid MAE "
             f"<= {target:.4f} |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["valid"]   # steady state: between the first and the last validation (start-up not counted)
        per_epoch = ((v[-1]["seconds"] - v[0]["seconds"]) / (len(v) - 1) if len(v) > 1 else
                     v[0]["seconds"] if v else None)
        t = r["test"] or {}
        reach = time_to(r["valid"], target)
        cell = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {r['system']}{' (capped: did not finish)' if r['capped'] else ''} | {r['wall_s']:.0f} s | "
                     f"{'—' if per_epoch is None else f'{per_epoch:.1f}'} | {r['epochs']} | {cell(t.get('mae'))} | {cell(t.get('non0_acc2'))} | "
                     f"{cell(t.get('corr'))} | {'not reached' if reach is None else f'{reach:.0f} s'} |")
    return "\n".join(lines)


def best_valid(row: dict) -> float | None:
    maes = [v["mae"] for v in row["valid"] if v["mae"] is not None]
    return min(maes) if maes else None


def ratios(rows: list[dict], target: float) -> str:
    """Each run of this trainer against each finished peer. The issue's measure: how long this trainer took
    from its launch until its validation MAE reached the peer's best validation MAE, against the peer's whole
    wall time (the ratio is peer wall / ours: above 1, this trainer reached the peer's accuracy sooner); then
    the wall times of the whole runs and the test MAEs. Validation only: no test number decides a cell."""
    ours = [r for r in rows if r["system"].startswith("this trainer")]
    peers = [r for r in rows if not r["system"].startswith("this trainer") and r["test"] and best_valid(r)]
    lines = ["| this trainer vs | " + " | ".join(f"{r['system'].split(' (')[0]}" for r in peers) + " |",
             "|---|" + "---|" * len(peers)]
    for o in ours:
        cells = []
        for r in peers:
            goal = best_valid(r)
            reach = time_to(o["valid"], goal)
            ratio = r["wall_s"] / reach if reach else None
            to_equal = (f"did not reach the peer's best valid MAE {goal:.3f}" if ratio is None else
                        f"**{ratio:.2f}x** faster to the peer's best valid MAE {goal:.3f} ({reach:.0f} s vs "
                        f"{r['wall_s']:.0f} s)" if ratio >= 1 else
                        f"{ratio:.2f}x: reached the peer's best valid MAE {goal:.3f} after the peer's whole run "
                        f"({reach:.0f} s vs {r['wall_s']:.0f} s)")
            cells.append(f"{to_equal}; whole runs: wall {r['wall_s'] / o['wall_s']:.2f} (peer / ours; {r['epochs']} "
                         f"vs {o['epochs']} epochs), test MAE {o['test']['mae']:.3f} vs {r['test']['mae']:.3f}")
        lines.append(f"| {o['system'].split(' (')[0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = passthrough_parser(__doc__)
    p.add_argument("--data", help="an MMSA-format pickle (default: one made with --like)")
    p.add_argument("--like", default="mosi-unaligned", help="mmolre synthetic --like NAME, when --data is not given")
    p.add_argument("--dataset", default=None, help="mosi or mosei: MMSA's configuration to use (default: from --like)")
    p.add_argument("--aligned", action="store_true", help="the file is aligned (default: from --like)")
    p.add_argument("--peers", default=None, help="MMSA models, comma-separated (default: tfn,lmf,mult; "
                                                 "aligned: tfn,lmf,mfn,mult)")
    p.add_argument("--mult_cap", type=float, default=600.0, help="seconds MulT may run")
    p.add_argument("--processes", default="2,1", help="this trainer's runs: process counts")
    p.add_argument("--threads", type=int, default=2, help="threads for every system (split across processes)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--variant", action="append", default=[], metavar="FLAGS",
                   help="one more row of this trainer with these launch.py flags on top (with the first of "
                        "--processes), e.g. --variant='--d_model 128'; repeatable")
    p.add_argument("--target_mae", type=float, default=None,
                   help="validation MAE for the time-to-accuracy column (default: TFN's best)")
    p.add_argument("--work", default=os.path.join(ROOT, "runs", "vs_mmsa"))
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "vs_mmsa"), help="OUT.json, OUT.md")
    p.add_argument("--_mmsa_worker", help=argparse.SUPPRESS)
    p.add_argument("--_launched", type=float, help=argparse.SUPPRESS)
    args, flags = p.parse_known_args(argv)
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    if args._mmsa_worker:
        return mmsa_worker(args._mmsa_worker, args.dataset, args.data, args.aligned, args.threads, args.seed, work,
                           os.path.join(work, f"mmsa_{args._mmsa_worker}.json"), args._launched)
    if not args.data:
        args.data = synthetic_like(args.like, work)
        args.dataset = args.dataset or args.like.split("-")[0]
        args.aligned = args.aligned or args.like.endswith("-aligned")
    elif not args.dataset:
        p.error("--data: say which of MMSA's configurations to use, --dataset mosi or --dataset mosei")
    else:   # aligned files carry no audio/vision lengths (MMSA would fail reading them)
        import pickle
        with open(args.data, "rb") as f:
            args.aligned = args.aligned or "audio_lengths" not in pickle.load(f)["train"]
    args.data = os.path.abspath(args.data)
    processes = [int(x) for x in args.processes.split(",")]
    for extra in [flags, *([*flags, *shlex.split(v)] for v in args.variant)]:   # before the peers' minutes
        refuse_owned_flags(p, extra, OWNED_BY_BENCHMARK, "set by this benchmark for every row")
        for n in processes:   # a typo or an impossible setting fails now
            parse_args(["--dataset", args.dataset, "--data_path", args.data, "--ep_size", str(n), *extra], world_size=n)
    peers = (args.peers or ("tfn,lmf,mfn,mult" if args.aligned else "tfn,lmf,mult")).split(",")
    if args.target_mae is None and "tfn" not in peers:
        p.error("the target validation MAE is TFN's best: include tfn in --peers or pass --target_mae")
    args.constant_mae = None
    cache = prebuilt_cache(args.data, work)
    rows = []
    for model in peers:
        rows.append(run_mmsa(model, args, work, args.mult_cap if model == "mult" else None))
        print(f"{rows[-1]['system']}: {rows[-1]['wall_s']:.0f} s, test {rows[-1]['test']}", flush=True)
    for n, variant in [(n, "") for n in processes] + [(processes[0], v) for v in args.variant]:
        rows.append(run_mmolre(n, args, work, flags, cache=cache, variant=variant))
        print(f"{rows[-1]['system']}: {rows[-1]['wall_s']:.0f} s, test {rows[-1]['test']}", flush=True)
    reference = next((r for r in rows if "TFN" in r["system"] and r["valid"]), None)
    if args.target_mae is None and reference is None:
        p.error("no TFN run to take the target validation MAE from: pass --target_mae")
    target = args.target_mae if args.target_mae is not None else min(v["mae"] for v in reference["valid"])
    what = os.path.basename(args.data) + (f" (mmolre synthetic --like {args.like})" if "synthetic_" in args.data else "")
    constant = ("" if args.constant_mae is None else
                f"\n| constant: the train mean for every sample | | | | {args.constant_mae:.3f} | | | |")
    md = table(rows, target, what) + constant + "\n\n" + ratios(rows, target)
    print(md)
    report = {"data": what, "dataset": args.dataset, "aligned": args.aligned, "threads": args.threads,
              "launch_flags": flags, "variants": args.variant, "target_valid_mae": target, "rows": rows,
              "command": command_line(__file__, argv)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(f"`{report['command']}`\n\n{md}\n")
    return report


if __name__ == "__main__":
    main()
