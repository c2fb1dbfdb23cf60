"""Where one training step's time goes, component by component, on MMSA-shaped batches.

Builds the model in this process (1 process, expert parallelism 1, no DeepSpeed engine) at the defaults or
the given flags, and times forward + backward of each part on one micro batch of `mmolre synthetic --like`
shapes: each modality's front end, encoder and UniTSE blocks, the fusion and heads, then the AdamW step
(torch's, as a stand-in for the engine's) and the model's whole step. Not timed here: what the DeepSpeed
engine adds (ZeRO-2 buckets, gradient clipping, the all-to-all and all-reduce across ranks), evaluation,
checkpoints and start-up; the trainer's s/epoch in bench/vs_mmsa.py holds all of them. Median of --repeats
after warm-up, all in one run, so the shares are comparable; the absolute times are this machine's.

    python bench/profile_step.py --like mosi-unaligned --out bench/results/profile_step
    python bench/profile_step.py --like mosi-unaligned --d_model 128 --temporal_steps 10
"""
from __future__ import annotations

import json
import os
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


def main(argv=None) -> dict:
    p = passthrough_parser(__doc__)
    p.add_argument("--like", default="mosi-unaligned", choices=sorted(LIKE))
    p.add_argument("--batch_size", type=int, default=32, help="the micro batch of ds_configs/zero2.json")
    p.add_argument("--threads", type=int, default=1, help="1: as each of the 2 processes of a 2-core run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", help="writes OUT.json and OUT.md")
    args, rest = p.parse_known_args(argv)
    cfg = parse_args(rest, world_size=1).model   # launch.py's model flags: --d_model 128 --temporal_steps 10 ...
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes, features, masks = batch(args.like, args.batch_size, torch.Generator().manual_seed(1))
    model = MMoLRE(cfg, shapes, ep_size=1)
    model.init_shared_experts(seed=1, ep_rank=0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
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
        optimizer.zero_grad(set_to_none=True)
        out = model(features, {m: masks[m] for m in model.modalities})
        (out.sentiment.square().mean() + out.emotion_logits.square().mean() + out.aux_loss.sum()).backward()
        optimizer.step()
    whole()
    timed("AdamW step", optimizer.step)
    timed("the model's whole step (forward, backward, torch AdamW; no DeepSpeed engine)", whole)
    total = rows[-1]["ms"]
    for r in rows:
        r["share"] = r["ms"] / total
    parts = sum(r["ms"] for r in rows[:-1])
    flags = " ".join(rest)
    lines = [f"`python bench/profile_step.py --like {args.like}{' ' + flags if flags else ''}` ({args.threads} "
             f"thread{'s' if args.threads > 1 else ''}, micro batch {args.batch_size}, d = {cfg.d_model}, "
             f"--temporal_steps {cfg.temporal_steps}, {cfg.blocks} block{'s' if cfg.blocks > 1 else ''}, "
             f"{cfg.num_experts} experts top-{cfg.top_k}; median of {args.repeats})", "",
             "| part (forward + backward) | ms | share of the whole step |", "|---|---|---|"]
    lines += [f"| {r['part']} | {r['ms']:.1f} | {r['share']:.0%} |" for r in rows]
    lines += ["", f"The parts add up to {parts:.0f} ms against the whole step's {total:.0f} ms: each part timed alone "
              "pays its own gradient reset and backward start, and the whole step has the loss and autograd across "
              "the parts' boundaries."]
    md = "\n".join(lines)
    print(md)
    report = {"like": args.like, "flags": rest, "threads": args.threads, "batch_size": args.batch_size, "rows": rows}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(md + "\n")
    return report


if __name__ == "__main__":
    main()
