"""Where one training step's time goes, component by component, on MMSA-shaped batches.

Builds the model in this process (1 process, expert parallelism 1, no DeepSpeed engine) at the defaults or
the given flags, and times forward + backward of each part on one micro batch of `mmolre synthetic --like`
shapes: each modality's front end, encoder and UniTSE blocks, the fusion and heads, then the AdamW step
(torch's, as a stand-in for the engine's) and the model's whole step. With --trainer, also the trainer's own
optimizer step on the same batch and weights in this process (`Trainer.train_step`: to the device, the
DeepSpeed engine's forward, backward and step with its ZeRO-2 buckets and clipping, the loss guards, the
aux_free nudges and the step's metrics), and its ratio to the model's whole step: the trainer's overhead
(issue 25, item 4: at most 1.25). Both on the CPU, in one process (no all-to-all, one-rank reductions: the
2-process cost is in bench/vs_mmsa.py's s/epoch). The model's whole step updates the shared experts with
plain AdamW over their banks (`torch.optim.AdamW` on the bank tensors, the sparse gradients made dense), as
the trainer's default expert optimizer does with its own clipping and bookkeeping. Not timed here: evaluation, checkpoints and
start-up; the trainer's s/epoch in bench/vs_mmsa.py holds all of them. Median of --repeats after warm-up, all
in one run, so the shares and the ratio are comparable; the absolute times are this machine's.

    python bench/profile_step.py --like mosi-unaligned --trainer --out bench/results/profile_step
    python bench/profile_step.py --like mosi-unaligned --d_model 128 --temporal_steps 10
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from bench.commands import passthrough_parser  # noqa: E402
from mmolre.config import parse_args  # noqa: E402
from mmolre.data.synthetic import LIKE  # noqa: E402
from mmolre.model import MMoLRE  # noqa: E402


def median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def batch(like: str, size: int, generator: torch.Generator):
    """Random features of the file's shapes, with valid lengths as `generate_like` draws them."""
    shapes = {m: (LIKE[like].steps[m], LIKE[like].dims[m]) for m in ("text", "audio", "vision")}
    features, masks = {}, {}
    for m, (t, f) in shapes.items():
        mean = 18.0 if m == "text" or LIKE[like].aligned else t / 2.5
        lengths = torch.clamp(torch.normal(mean, mean / 2, (size,), generator=generator).round(), 3, t)
        masks[m] = torch.arange(t)[None, :] < lengths[:, None]
        features[m] = torch.randn(size, t, f, generator=generator) * masks[m].unsqueeze(-1)
    return shapes, features, masks


def fwd_bwd(model, fn, *inputs, input_grad: bool = True):
    """A closure: forward `fn`, backward the sum of its outputs, as in a step: gradients start from none (as
    after the optimizer's zero_grad), and the inputs need a gradient only where a trained module made them
    (`input_grad`), not where they are the data."""
    def step():
        model.zero_grad(set_to_none=True)
        leaves = [x.detach().requires_grad_(input_grad) if x.is_floating_point() else x for x in inputs]
        out = fn(*leaves)
        sum(o.float().sum() for o in _tensors(out) if o.requires_grad).backward()
    return step


def forward_only(fn, *inputs):
    """A part with no parameters on the data (the front end): the step runs its forward only."""
    def step():
        with torch.no_grad():
            fn(*inputs)
    return step


def unitse_outputs(unitse, x, mask):
    """The streams and the per-task aux losses, which a step backpropagates too."""
    streams, stats = unitse(x, mask)
    return streams, [s.aux_loss for s in stats]


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _tensors(y)


def build_trainer(args, flags: list[str], work: str):
    """A one-process CPU Trainer on a small `mmolre synthetic --like` file in `work` (a temporary directory), as
    launch.py builds it, with no logging or checkpoint inside the timed steps."""
    from mmolre import preemption
    from mmolre.data.schema import write_dataset
    from mmolre.data.synthetic import generate_like
    from mmolre.distributed import fill_env
    from mmolre.train import Trainer
    os.environ["DS_ACCELERATOR"] = "cpu"   # the model's step runs on the CPU: so does the trainer's
    fill_env()
    data = os.path.join(work, f"synthetic_{args.like}.pkl")
    write_dataset(generate_like(args.like, 0.1, 0), data)
    cfg = parse_args(["--ds_config", "ds_configs/zero2.json", "--dataset", "mmsa", "--data_path", data,
                      "--batch_size", str(args.batch_size), "--log_every", "1000000", "--save_every", "0",
                      "--output_dir", work, "--run_name", "trainer", "--cache_dir", os.path.join(work, "cache"),
                      "--memory_check", "false", *flags], world_size=1)
    trainer = Trainer(cfg)
    for s in preemption.STOP_SIGNALS:   # the trainer's handlers only set a flag this benchmark never reads
        signal.signal(s, signal.SIG_DFL)
    return trainer


def close_trainer(trainer) -> None:
    from mmolre import distributed
    trainer.monitor.close()
    distributed.shutdown(trainer.info)


def main(argv=None) -> dict:
    p = passthrough_parser(__doc__)
    p.add_argument("--like", default="mosi-unaligned", choices=sorted(LIKE))
    p.add_argument("--batch_size", type=int, default=32, help="the micro batch of ds_configs/zero2.json")
    p.add_argument("--threads", type=int, default=1, help="1: as each of the 2 processes of a 2-core run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--trainer", action="store_true", help="also time the trainer's own step, side by side")
    p.add_argument("--out", help="writes OUT.json and OUT.md")
    args, rest = p.parse_known_args(argv)
    cfg = parse_args(rest, world_size=1).model   # launch.py's model flags: --d_model 128 --temporal_steps 10 ...
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes, features, masks = batch(args.like, args.batch_size, torch.Generator().manual_seed(1))
    work = tempfile.mkdtemp(prefix="profile_step_")
    trainer = build_trainer(args, rest, work) if args.trainer else None
    if trainer is not None:   # the trainer's batch and weights, so both steps compute the same thing
        window = [next(iter(trainer.loader))]
        features, masks = dict(window[0].features), dict(window[0].masks)
    model = MMoLRE(cfg, trainer.data.shapes if trainer else shapes, ep_size=1)
    model.init_shared_experts(seed=trainer.cfg.train.seed if trainer else 1, ep_rank=0)   # as build_model does
    if trainer is not None:   # the trainer's other weights (its module holds process groups: no deepcopy)
        missing, unexpected = model.load_state_dict(trainer.model.state_dict(), strict=False)
        assert not missing and not unexpected, (missing, unexpected)
    model.train()
    banks = [t for _, bank in model.expert_banks() for t in bank.tensors.values()]
    optimizer = torch.optim.AdamW([*model.parameters(), *banks], lr=1e-4)
    rows = []

    def timed(name: str, fn):
        rows.append({"part": name, "ms": median_ms(fn, args.warmup, args.repeats)})

    # the inputs each part sees in a real step, computed once
    pooled, encoded = {}, {}
    with torch.no_grad():
        for m in model.modalities:
            x, mask = features[m], masks[m]
            if m in model.frontends:
                x, mask = model.frontends[m](x, mask)
            pooled[m], masks[m + "/after"] = x, mask
            encoded[m] = model.encoders[m](x)
        streams = {m: model.unitse[m](encoded[m], masks[m + "/after"])[0] for m in model.modalities}
    for m in model.modalities:
        if m in model.frontends:
            timed(f"{m}: front end ({shapes[m][0]} -> {pooled[m].shape[1]} steps; forward only)",
                  forward_only(model.frontends[m], features[m], masks[m]))
        timed(f"{m}: encoder", fwd_bwd(model, model.encoders[m], pooled[m], input_grad=False))
        timed(f"{m}: UniTSE ({cfg.blocks} block{'s' if cfg.blocks > 1 else ''}, MoE + task experts, aux loss)",
              fwd_bwd(model, lambda x, mk=masks[m + "/after"], u=model.unitse[m]: unitse_outputs(u, x, mk),
                      encoded[m]))

    def fusion_and_heads(*flat):
        per_stream = [dict(zip(model.modalities, flat[i::model.num_streams])) for i in range(model.num_streams)]
        after = {m: masks[m + "/after"] for m in model.modalities}
        z = [fusion(s, after)[0] for fusion, s in zip(model.fusion, per_stream)]
        return model.sentiment_head(z[0]), model.emotion_head(z[-1])
    timed("fusion + heads", fwd_bwd(model, fusion_and_heads, *[streams[m][i] for m in model.modalities
                                                         for i in range(model.num_streams)]))

    def whole():
        optimizer.zero_grad(set_to_none=True)   # (the banks' sparse gradients too)
        out = model(features, {m: masks[m] for m in model.modalities})
        (out.sentiment.square().mean() + out.emotion_logits.square().mean() + out.aux_loss.sum()).backward()
        for t in banks:   # the experts' gradients come back sparse (their rows); AdamW over every expert, as
            if t.grad is not None and t.grad.is_sparse:   # the trainer's default dense expert optimizer
                t.grad = t.grad.to_dense()
        optimizer.step()
    whole()
    timed("AdamW step", optimizer.step)
    timed("the model's whole step (forward, backward, torch AdamW; no DeepSpeed engine)", whole)
    total = rows[-1]["ms"]
    parts = sum(r["ms"] for r in rows[:-1])
    ratio = None
    if trainer is not None:
        timed("the trainer's step (Trainer.train_step: DeepSpeed engine, guards, nudges, metrics)",
              lambda: trainer.train_step(window, None))
        ratio = rows[-1]["ms"] / total
        close_trainer(trainer)
    shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        r["share"] = r["ms"] / total
    flags = " ".join(rest)
    lines = [f"`python bench/profile_step.py --like {args.like}{' --trainer' if args.trainer else ''}"
             f"{' ' + flags if flags else ''}` ({args.threads} "
             f"thread{'s' if args.threads > 1 else ''}, micro batch {args.batch_size}, d = {cfg.d_model}, "
             f"--temporal_steps {cfg.temporal_steps}, {cfg.blocks} block{'s' if cfg.blocks > 1 else ''}, "
             f"{cfg.num_experts} experts top-{cfg.top_k}; median of {args.repeats})", "",
             "| part (forward + backward) | ms | share of the whole step |", "|---|---|---|"]
    lines += [f"| {r['part']} | {r['ms']:.1f} | {r['share']:.0%} |" for r in rows]
    lines += ["", f"The parts add up to {parts:.0f} ms against the whole step's {total:.0f} ms: each part timed alone "
              "pays its own gradient reset and backward start, and the whole step has the loss and autograd across "
              "the parts' boundaries."]
    if trainer is not None:
        lines += ["", f"**Trainer overhead (1 process): the trainer's step is {ratio:.2f}x the model's whole step** "
                  "(same batch, weights and thread count, side by side in this run; target at most 1.25)."]
    md = "\n".join(lines)
    print(md)
    report = {"like": args.like, "flags": rest, "threads": args.threads, "batch_size": args.batch_size, "rows": rows,
              "trainer_over_model": ratio}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(md + "\n")
    return report


if __name__ == "__main__":
    main()
