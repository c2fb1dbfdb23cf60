"""What a training step and a checkpoint cost as the expert count grows: from 8 experts to the largest count
this machine's memory holds.

    python bench/expert_scale.py                                   # the default grid, 2 processes, ep 2
    python bench/expert_scale.py --experts 8,1024,16384 --steps 6 --out bench/results/expert_scale
    python bench/expert_scale.py ... --expert_optimizer lazy       # extra flags go to launch.py's config

For each count, 2 processes (expert parallelism 2, one thread each) build the trainer exactly as `launch.py`
does (the default model, 6 MoE layers; `--synthetic_scale 0.05`, micro batch 32), train warm-up steps and
then `--steps` timed optimizer steps through `Trainer.train_step`, save a checkpoint, and a second pair of
processes resumes it. Per count it records:

* the step time split into forward + backward, gradient reduction, the clipping norm, the optimizer, zeroing
  the gradients and the rest ("bookkeeping": the loss, the trainer's per-step collectives, copies and
  all-gathers inside the optimizer step), each the mean over the timed steps on rank 0, and samples/s;
* peak memory per rank (the larger of the two ranks' maximum RSS);
* the checkpoint's files (in all, and the most any one rank wrote), its bytes, and the seconds to save it;
* the seconds to load it (`Checkpointer.resume`), and to resume (a new process pair from launch to the first
  optimizer step after the load).

Counts that would not fit are run with a lower `--expert_rank` or fewer blocks (`--fit COUNT:RANK:BLOCKS`),
and the table says so. Results: OUT.json, OUT.md and OUT.png (time per step and checkpoint size against the
expert count).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.commands import ROOT, command_line, passthrough_parser  # noqa: E402

PHASES = ("forward_backward", "gradient_reduction", "clipping_norm", "optimizer", "zeroing", "bookkeeping")
DEFAULT_EXPERTS = "8,64,512,1024,4096,16384,32768,65536,131072"
DEFAULT_FIT = "65536:8:2,131072:4:2"   # experts:rank:blocks for counts whose default model would not fit in 24 GB


class PhaseClock:
    """Seconds spent inside wrapped methods, per phase (nested calls of the same phase count once)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.depth = defaultdict(int)

    def wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def timed(*args, **kwargs):
            self.depth[phase] += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.depth[phase] -= 1
                if self.depth[phase] == 0:
                    self.seconds[phase] += time.perf_counter() - start
        setattr(owner, name, timed)

    def take(self) -> dict:
        out = dict(self.seconds)
        self.seconds.clear()
        return out


def instrument(trainer) -> PhaseClock:
    """Wrap the engine's and the optimizers' phase methods (whichever of them this version has)."""
    clock = PhaseClock()
    engine, opt = trainer.engine, trainer.engine.optimizer
    clock.wrap(engine, "forward", "forward")
    clock.wrap(engine, "backward", "backward")
    clock.wrap(engine, "step", "engine_step")
    for name in ("reduce_ipg_grads", "overlapping_partition_gradients_reduce_epilogue", "reduce_gradients",
                 "allreduce_gradients"):
        clock.wrap(opt, name, "gradient_reduction")
    clock.wrap(engine, "allreduce_gradients", "gradient_reduction")
    for name in ("scaled_global_norm", "get_grad_norm", "clip_fp32_gradients"):
        clock.wrap(opt, name, "clipping_norm")
    clock.wrap(engine, "clip_fp32_gradients", "clipping_norm")
    for name in ("_optimizer_step",):
        clock.wrap(opt, name, "optimizer")
    if not hasattr(opt, "_optimizer_step") and hasattr(opt, "step"):   # ZeRO-0: the torch optimizer itself
        clock.wrap(opt, "step", "optimizer")
    clock.wrap(opt, "zero_grad", "zeroing")
    store = getattr(trainer.engine, "expert_optimizer", None)   # the experts held in banks, where they are
    if store is not None:
        clock.wrap(store, "reduce_gradients", "gradient_reduction")
        clock.wrap(store, "squared_norm", "clipping_norm")
        clock.wrap(store, "apply_update", "optimizer")
        clock.wrap(store, "zero_grad", "zeroing")
    return clock


def split(raw: dict, total: float) -> dict:
    """The issue's phases from the wrapped methods' seconds of one step."""
    reduction = raw.get("gradient_reduction", 0.0)
    phases = {"forward_backward": raw.get("forward", 0.0) + raw.get("backward", 0.0) - min(
                  reduction, raw.get("backward", 0.0)),
              "gradient_reduction": reduction, "clipping_norm": raw.get("clipping_norm", 0.0),
              "optimizer": raw.get("optimizer", 0.0), "zeroing": raw.get("zeroing", 0.0)}
    phases["bookkeeping"] = max(0.0, total - sum(phases.values()))
    return phases


def _env(rank: int, world: int, port: int, cache: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                      MMOLRE_CACHE=cache, MMOLRE_DS_LOG="warning")


def _config(flags: list[str], out_dir: str, resume: bool):
    from mmolre.config import parse_args
    return parse_args(["--synthetic_scale", "0.05", "--epochs", "1", "--ep_size", "2", "--log_every", "1000",
                       "--output_dir", out_dir, "--run_name", "scale", *(["--resume"] if resume else []), *flags])


def _files_per_rank(tag_dir: str, world: int, experts: int, ep: int) -> dict:
    """Which rank wrote each file of a checkpoint, from the file names."""
    import re
    per_rank = defaultdict(int)
    for name in os.listdir(tag_dir):
        m = re.search(r"rank_?(\d+)", name.replace("mp_rank_00", ""))
        expert = re.match(r"layer_\d+_expert_(\d+)_", name)
        if expert:
            per_rank[int(expert.group(1)) // (experts // ep)] += 1
        elif m:
            per_rank[int(m.group(1))] += 1
        else:
            per_rank[0] += 1
    return dict(per_rank)


def train_worker(rank: int, world: int, port: int, flags: list[str], out_dir: str, cache: str, warmup: int,
                 steps: int, result: str) -> None:
    _env(rank, world, port, cache)
    import torch
    torch.set_num_threads(1)
    from mmolre import distributed
    from mmolre.train import Trainer
    start = time.perf_counter()
    trainer = Trainer(_config(flags, out_dir, resume=False))
    built = time.perf_counter() - start
    clock = instrument(trainer)
    sampler = trainer.loader.sampler
    sampler.start_at(0, 0)
    batches = iter(trainer.loader)
    gas = trainer.geometry.grad_accum
    per_step = []
    for i in range(warmup + steps):
        window = [next(batches) for _ in range(gas)]
        distributed.barrier(trainer.info)
        clock.take()
        t0 = time.perf_counter()
        trainer.train_step(window, None)
        total = time.perf_counter() - t0
        if i >= warmup:
            per_step.append({"total": total, **split(clock.take(), total)})
    distributed.barrier(trainer.info)
    t0 = time.perf_counter()
    tag = trainer.checkpointer.save(trainer.state, trainer.loads)
    save_s = time.perf_counter() - t0
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    rss = distributed.all_gather(rss_gb, trainer.info)
    if trainer.info.is_main:
        tag_dir = os.path.join(trainer.checkpointer.ckpt_dir, tag)
        names = os.listdir(tag_dir)
        cfg = trainer.cfg.model
        record = {"built_s": built, "steps": per_step, "save_s": save_s, "peak_rss_gb": max(rss),
                  "estimate_gb": trainer.memory_estimate.total / 1024 ** 3,
                  "files": len(names), "bytes": sum(os.path.getsize(os.path.join(tag_dir, n)) for n in names),
                  "files_per_rank": _files_per_rank(tag_dir, world, cfg.num_experts, trainer.ep_size),
                  "params": trainer.params, "samples_per_step": trainer.geometry.samples_per_step}
        with open(result, "w") as f:
            json.dump(record, f)
    distributed.shutdown(trainer.info)


def resume_worker(rank: int, world: int, port: int, flags: list[str], out_dir: str, cache: str, result: str,
                  launched: float) -> None:
    _env(rank, world, port, cache)
    import torch
    torch.set_num_threads(1)
    from mmolre import distributed
    from mmolre.train import Trainer
    trainer = Trainer(_config(flags, out_dir, resume=True))
    t0 = time.perf_counter()
    trainer.state = trainer.checkpointer.resume(trainer.loads)
    load_s = time.perf_counter() - t0
    sampler = trainer.loader.sampler
    sampler.start_at(trainer.state.epoch, trainer.state.epoch_samples)
    batches = iter(trainer.loader)
    trainer.train_step([next(batches) for _ in range(trainer.geometry.grad_accum)], None)
    distributed.barrier(trainer.info)
    if trainer.info.is_main:
        with open(result, "w") as f:
            json.dump({"load_s": load_s, "resume_s": time.time() - launched}, f)
    distributed.shutdown(trainer.info)


def measure(experts: int, flags: list[str], warmup: int, steps: int, cache: str) -> dict:
    import torch.multiprocessing as mp
    from mmolre.distributed import free_port
    with tempfile.TemporaryDirectory(prefix=f"scale{experts}-") as tmp:
        flags = ["--num_experts", str(experts), *flags]
        out = os.path.join(tmp, "train.json")
        mp.spawn(train_worker, args=(2, free_port(), flags, tmp, cache, warmup, steps, out), nprocs=2, join=True)
        with open(out) as f:
            record = json.load(f)
        out = os.path.join(tmp, "resume.json")
        mp.spawn(resume_worker, args=(2, free_port(), flags, tmp, cache, out, time.time()), nprocs=2, join=True)
        with open(out) as f:
            record.update(json.load(f))
    steps_ = record.pop("steps")
    record["step_s"] = statistics.fmean(s["total"] for s in steps_)
    record["phases_s"] = {p: statistics.fmean(s[p] for s in steps_) for p in PHASES}
    record["samples_per_s"] = record["samples_per_step"] / record["step_s"]
    return record


def markdown(rows: list[dict], command: str) -> str:
    lines = [f"`{command}`", "",
             "2 processes, expert parallelism 2, 1 thread each; the default model (d 64, rank 16, 2 blocks x 3 "
             "modalities = 6 MoE layers) unless the row says otherwise; micro batch 32 (64 rows per task and MoE "
             "layer per step); step phases are the mean over the timed steps on rank 0.", "",
             "| experts | model | expert params | s / step | samples/s | fwd+bwd | grad reduction | clip norm | "
             "optimizer | zeroing | bookkeeping | peak RSS / rank (start-up estimate) | ckpt files (max per rank) | "
             "ckpt GB | save s | load s | resume s |", "|" + "---|" * 17]
    for r in rows:
        p = r["phases_s"]
        lines.append(
            f"| {r['experts']:,} | {r['model']} | {r['params']['expert'] / 1e6:.1f} M | {r['step_s']:.2f} | "
            f"{r['samples_per_s']:.1f} | " + " | ".join(f"{p[k]:.3f}" for k in PHASES)
            + f" | {r['peak_rss_gb']:.1f} GB{estimate(r)} | {r['files']:,} ({max(r['files_per_rank'].values()):,}) | "
              f"{r['bytes'] / 1e9:.2f} | {r['save_s']:.1f} | {r['load_s']:.1f} | {r['resume_s']:.1f} |")
    return "\n".join(lines)


def estimate(row: dict) -> str:
    return f" ({row['estimate_gb']:.1f})" if "estimate_gb" in row else ""   # runs before the estimate existed


DENSE_CHECKPOINT_BYTES = 28   # per dense parameter: DeepSpeed's module file (4), ZeRO's fp32 partition and two
#                               moments (12) and the topology-free copy of weight and moments (12)


def projection(rows: list[dict], ranks: int = 64, ep: int = 64, experts: int = 262144,
               client_gbps: float = 1.0, aggregate_gbps: float = 50.0) -> dict:
    """The measured per-parameter costs carried, on paper, to `ranks` ranks with expert parallelism `ep` and
    `experts` experts per layer (the default model), on a parallel file system of `client_gbps` per rank and
    `aggregate_gbps` in all. Dense parameters grow with the expert count (each router's last layer is d x N):
    a linear fit of the measured default-model rows gives them."""
    default = [r for r in rows if r["model"] == "default"]
    if len(default) < 2:
        return None   # the fit of the dense parameters needs two counts
    a, b = default[0], default[-1]
    per_expert = b["params"]["per_expert"]
    slope = (b["params"]["dense"] - a["params"]["dense"]) / (b["experts"] - a["experts"])
    dense = a["params"]["dense"] + slope * (experts - a["experts"])
    layers = b["params"]["expert"] // (b["experts"] * per_expert)
    local = experts // ep * layers * per_expert                      # this rank's expert parameters
    measured = (b["bytes"] - DENSE_CHECKPOINT_BYTES * b["params"]["dense"]) / b["params"]["expert"]   # per expert param
    expert_file = local * measured
    dense_shard = dense * 12 / ranks                                 # ZeRO's fp32 partition and moments
    rank0_extra = dense * (4 + 12)                                    # DeepSpeed's module file, topology-free copy
    files = 3 * ranks + 4
    total = ranks * (expert_file + dense_shard) + rank0_extra
    return {"ranks": ranks, "ep_size": ep, "experts": experts, "expert_params_per_rank": local,
            "dense_params": int(dense), "bytes_per_expert_param_measured": measured,
            "bytes_per_rank": expert_file + dense_shard, "bytes_rank0": expert_file + dense_shard + rank0_extra,
            "files": files, "bytes_total": total, "client_gbps": client_gbps, "aggregate_gbps": aggregate_gbps,
            "save_s": max((expert_file + dense_shard + rank0_extra) / (client_gbps * 1e9),
                          total / (aggregate_gbps * 1e9)),
            "deepspeed_files": experts * layers + ranks + 1}


def projection_markdown(p: dict) -> str:
    return "\n".join([
        f"On paper: {p['ranks']} ranks, expert parallelism {p['ep_size']}, {p['experts']:,} experts per MoE layer "
        f"(the default model), a parallel file system of {p['client_gbps']:g} GB/s per rank and "
        f"{p['aggregate_gbps']:g} GB/s in all; {p['bytes_per_expert_param_measured']:.1f} bytes per expert parameter "
        f"as measured at the largest default-model count above.", "",
        "| per checkpoint | expert params per rank | dense params (every rank) | bytes per rank | bytes on rank 0 | "
        "files | seconds to save | DeepSpeed's per-expert layout: files |", "|---|---|---|---|---|---|---|---|",
        f"| | {p['expert_params_per_rank'] / 1e6:.0f} M | {p['dense_params'] / 1e6:.0f} M | "
        f"{p['bytes_per_rank'] / 1e9:.2f} GB | {p['bytes_rank0'] / 1e9:.2f} GB | {p['files']:,} | {p['save_s']:.1f} | "
        f"{p['deepspeed_files']:,} |"])


def count_label(experts: int) -> str:
    return f"{experts // 1024}k" if experts >= 1024 and experts % 1024 == 0 else str(experts)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["experts"] for r in rows]
    bottom = [0.0] * len(rows)
    for phase in PHASES:
        ys = [r["phases_s"][phase] for r in rows]
        a.bar([count_label(x) for x in xs], ys, bottom=bottom, label=phase.replace("_", " "))
        bottom = [u + v for u, v in zip(bottom, ys)]
    a.set(xlabel="shared experts per MoE layer", ylabel="seconds per optimizer step", title="a training step")
    a.legend(fontsize=7)
    b.plot(xs, [r["bytes"] / 1e9 for r in rows], marker="o", label="checkpoint GB")
    b.set(xscale="log", xlabel="shared experts per MoE layer", ylabel="GB", title="a checkpoint")
    files = b.twinx()   # files span 9 to 10^5: their own log axis
    files.plot(xs, [r["files"] for r in rows], marker="s", color="tab:orange", label="checkpoint files")
    files.set(yscale="log", ylabel="files", ylim=(1, 10 ** 6))
    lines = b.get_legend_handles_labels()[0] + files.get_legend_handles_labels()[0]
    b.legend(lines, [h.get_label() for h in lines], fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = passthrough_parser(__doc__)
    parser.add_argument("--experts", default=DEFAULT_EXPERTS, help="comma-separated expert counts")
    parser.add_argument("--fit", default=DEFAULT_FIT,
                        help="COUNT:RANK:BLOCKS,...: run these counts with that --expert_rank and --blocks")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per count")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "expert_scale"))
    args, extra = parser.parse_known_args(argv)
    fit = {int(c): (r, b) for c, r, b in (x.split(":") for x in args.fit.split(",") if x)}
    cache = os.environ.get("MMOLRE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mmolre")
    rows = []
    for experts in (int(x) for x in args.experts.split(",")):
        rank, blocks = fit.get(experts, (16, 2))
        model = "default" if (rank, blocks) == (16, 2) else f"--expert_rank {rank} --blocks {blocks}"
        flags = ["--expert_rank", str(rank), "--blocks", str(blocks), *extra]
        print(f"{experts} experts ({model}) ...", flush=True)
        record = measure(experts, flags, args.warmup, args.steps, cache)
        rows.append({"experts": experts, "model": model, **record})
        print(f"  {record['step_s']:.2f} s/step, {record['peak_rss_gb']:.1f} GB/rank, {record['files']} files, "
              f"{record['bytes'] / 1e9:.2f} GB, save {record['save_s']:.1f} s, load {record['load_s']:.1f} s",
              flush=True)
        with open(args.out + ".json", "w") as f:   # after every count: a long run keeps what it measured
            json.dump({"command": command_line(__file__, argv), "rows": rows}, f, indent=1)
    record = {"command": command_line(__file__, argv), "rows": rows, "projection": projection(rows)}
    with open(args.out + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(rows, command_line(__file__, argv)) + "\n")
        if record["projection"]:
            f.write("\n" + projection_markdown(record["projection"]) + "\n")
    plot(rows, args.out + ".png")
    print(markdown(rows, command_line(__file__, argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
