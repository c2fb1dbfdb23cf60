"""How the cost of one UniTSE MoE block grows with the expert count (forward + backward).

Reference shape: 64 rows (32 utterances x 2 tasks), T = 50, d = 128, rank 16, top-2, no row dropped.
Measured side by side in one run, after warm-up, median of repeats:
  sparse        the DeepSpeed MoE layer as the trainer builds it (compact dispatch, grouped experts:
                mmolre/model/grouped.py)
  sparse_stock  DeepSpeed's MoE layer as it comes (experts x capacity buffer, one Python call per expert),
                with the same gate
  dense         every expert on every row, mixed by the router's softmax (the MMoE way), computed in the
                fastest dense form we know (all experts' bottlenecks as one wide matmul)
  matmul        one plain matmul with the same useful FLOPs as the sparse block: the machine's limit

    python bench/moe_block.py --json bench/results/moe_block_cpu.json --plot bench/results/moe_block_cpu.png
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cuda" if "--cuda" in sys.argv else "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from mmolre.model.routing import RowRouting  # noqa: E402
from mmolre.model.unitse import UniTSEBlock  # noqa: E402


def timer(device):
    """A callable that times fn() in ms: CUDA events on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
    return run


def median_ms(fn, device, warmup: int, repeats: int) -> float:
    measure = timer(device)
    for _ in range(warmup):
        measure(fn)
    return statistics.median(measure(fn) for _ in range(repeats))


def build_block(experts: int, args, grouped: bool, device, dtype):
    torch.manual_seed(0)
    block = UniTSEBlock(d_model=args.d_model, seq_len=args.seq_len, num_experts=experts, top_k=args.top_k,
                        expert_rank=args.rank, task_rank=args.rank, num_tasks=2, ep_size=1, dropout=0.0,
                        capacity_factor=0.0, router_noise=False, grouped_experts=grouped)
    return block.to(device=device, dtype=dtype)


def inputs(args, device, dtype):
    g = torch.Generator().manual_seed(1)
    seqs = torch.randn(args.rows, args.seq_len, args.d_model, generator=g)
    rows = seqs.reshape(args.rows, -1).to(device, dtype).requires_grad_()
    tasks = torch.arange(2).repeat_interleave(args.rows // 2).to(device)
    mask = torch.ones(args.rows, args.seq_len, dtype=torch.bool, device=device)
    return rows, RowRouting(tasks, mask)


def sparse_step(block, rows, routing):
    def step():
        block.zero_grad(set_to_none=True)   # as an optimizer step would, so nothing accumulates
        rows.grad = None
        out, aux, _ = block.moe(rows, routing)
        (out.float().square().mean() + aux.sum()).backward()
    return step


def dense_step(block, rows, routing, args):
    """All experts on all rows, weighted by the full softmax: sum_e p_e * up_e(gelu(down_e(x)))."""
    experts = [block.shared_expert(i) for i in range(block.moe.num_local_experts)]
    w_down = torch.cat([e["down.weight"].permute(1, 2, 0).reshape(3 * args.d_model, -1) for e in experts], 1)
    b_down = torch.cat([e["down.bias"] for e in experts])
    w_up = torch.cat([e["up.weight"][:, :, 0].t() for e in experts], 0)       # [E*r, d]
    b_up = torch.stack([e["up.bias"] for e in experts])                        # [E, d]
    gate = block.moe.deepspeed_moe.gate
    w_down, b_down, w_up, b_up = (t.detach().requires_grad_() for t in (w_down, b_down, w_up, b_up))
    n, e, r = args.rows, len(experts), args.rank

    def step():
        for t in (rows, w_down, b_down, w_up, b_up):
            t.grad = None
        gate.zero_grad(set_to_none=True)
        probs = F.softmax(gate.route_logits(rows, routing), dim=1).to(rows.dtype)     # [n, E]
        x = rows.view(n, args.seq_len, args.d_model)
        windows = F.pad(x, (0, 0, 1, 1)).unfold(1, 3, 1).flatten(2)                    # [n, T, 3d] (d-major)
        h = F.gelu(windows @ w_down + b_down)                                          # [n, T, E*r]
        h = (h.view(n, args.seq_len, e, r) * probs[:, None, :, None]).flatten(2)
        out = h @ w_up + (probs @ b_up)[:, None, :]
        out.float().square().mean().backward()
    return step


def dense_loop_step(block, rows, routing, args):
    """The naive dense mixture: every expert module called on every row, one call per expert."""
    from mmolre.model.experts import LowRankExpert
    experts = []
    for i in range(block.moe.num_local_experts):
        e = LowRankExpert(args.d_model, args.rank, args.seq_len).to(rows.device, rows.dtype)
        for name, p in e.named_parameters():
            p.data.copy_(block.shared_expert(i)[name].detach())
        experts.append(e)
    gate = block.moe.deepspeed_moe.gate
    x = rows.view(args.rows, args.seq_len, args.d_model)

    def step():
        rows.grad = None
        for e in experts:
            e.zero_grad(set_to_none=True)
        probs = F.softmax(gate.route_logits(rows, routing), dim=1).to(rows.dtype)
        out = sum(probs[:, i, None, None] * e.forward_sequences(x) for i, e in enumerate(experts))
        out.float().square().mean().backward()
    return step


def matmul_step(useful_flops: float, device, dtype):
    k = n = 512
    m = max(1, int(useful_flops / (2 * k * n)))
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * m * k * n


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", default="8,32,128,512")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--seq_len", type=int, default=50)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--dense_max_experts", type=int, default=128, help="skip the dense mixture above this")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--cuda", action="store_true", help="run on the GPU (CUDA events, bf16)")
    p.add_argument("--json", help="write the measurements here")
    p.add_argument("--plot", help="write a PNG of time vs expert count here (needs matplotlib)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.cuda else "cpu")
    dtype = torch.bfloat16 if args.cuda else torch.float32
    experts = [int(x) for x in args.experts.split(",")]

    # Useful work: each row visits k experts; conv k=3 (3d*r MACs per step) + conv k=1 (r*d), x2 FLOPs per
    # MAC, and backward ~ 2x forward.
    useful_flops = args.rows * args.top_k * args.seq_len * 2 * (3 * args.d_model * args.rank
                                                                  + args.rank * args.d_model) * 3
    mm, mm_flops = matmul_step(useful_flops, device, dtype)
    matmul_ms = median_ms(mm, device, args.warmup, args.repeats * 3)
    peak = mm_flops / matmul_ms / 1e6

    # The first configuration measured in a process pays one-off costs (lazy kernel set-up, allocator
    # growth); burn them on a throwaway block so every point is measured alike. On CPU, glibc serves
    # buffers of a few MB with fresh mmap'd pages (a page fault per 4 KB) until a large block has been
    # freed once, which raises its dynamic mmap threshold; a long training run is in that state after
    # its first steps, so the benchmark starts there too.
    if device.type == "cpu":
        scratch = torch.ones(8 << 20)   # 32 MB, touched, then freed
        del scratch
    rows, routing = inputs(args, device, dtype)
    median_ms(sparse_step(build_block(experts[0], args, True, device, dtype), rows, routing), device,
              args.warmup * 3, 1)
    sparse, stock, dense, dense_loop = [], [], [], []
    for e in experts:
        rows, routing = inputs(args, device, dtype)
        sparse.append(median_ms(sparse_step(build_block(e, args, True, device, dtype), rows, routing),
                                device, args.warmup, args.repeats))
        stock.append(median_ms(sparse_step(build_block(e, args, False, device, dtype), rows, routing),
                               device, args.warmup, args.repeats))
        dense.append(median_ms(dense_step(build_block(e, args, True, device, dtype), rows, routing, args),
                               device, args.warmup, args.repeats) if e <= args.dense_max_experts else None)
        dense_loop.append(median_ms(dense_loop_step(build_block(e, args, True, device, dtype), rows, routing, args),
                                    device, args.warmup, args.repeats) if e <= args.dense_max_experts else None)
        nan = float("nan")
        print(f"  {e:5d} experts: sparse {sparse[-1]:8.2f} ms | stock DeepSpeed {stock[-1]:8.2f} ms | "
              f"dense {dense[-1] or nan:8.2f} ms | dense loop {dense_loop[-1] or nan:8.2f} ms", flush=True)

    at = {e: i for i, e in enumerate(experts)}
    result = {
        "device": torch.cuda.get_device_name() if args.cuda else f"cpu ({platform.processor() or platform.machine()}, "
                                                                 f"{torch.get_num_threads()} threads)",
        "shape": {k: getattr(args, k) for k in ("rows", "seq_len", "d_model", "rank", "top_k")},
        "experts": experts, "sparse_ms": sparse, "sparse_stock_ms": stock, "dense_ms": dense,
        "dense_loop_ms": dense_loop,
        "useful_gflop": useful_flops / 1e9, "matmul_ms": matmul_ms, "matmul_gflops_peak": peak,
    }
    if 8 in at:
        if 128 in at:
            result["flat_128_vs_8"] = sparse[at[128]] / sparse[at[8]]
            result["stock_flat_128_vs_8"] = stock[at[128]] / stock[at[8]]
        if 512 in at:
            result["flat_512_vs_8"] = sparse[at[512]] / sparse[at[8]]
            result["stock_flat_512_vs_8"] = stock[at[512]] / stock[at[8]]
    if 128 in at and dense[at[128]] is not None:
        result["speedup_vs_dense_128"] = dense[at[128]] / sparse[at[128]]
        result["stock_speedup_vs_dense_128"] = dense[at[128]] / stock[at[128]]
        result["speedup_vs_dense_loop_128"] = dense_loop[at[128]] / sparse[at[128]]
    if 128 in at:
        result["fraction_of_peak_128"] = (useful_flops / sparse[at[128]] / 1e6) / peak

    print(f"\nreference shape {result['shape']} on {result['device']}")
    print(f"useful work {result['useful_gflop']:.3f} GFLOP; plain matmul of that size {matmul_ms:.2f} ms "
          f"({peak:.1f} GFLOP/s)")
    print("| experts | sparse (ours) ms | DeepSpeed MoE as it comes ms | dense, one wide matmul ms | "
          "dense, loop over experts ms | ideal (matmul) ms |")
    print("|---|---|---|---|---|---|")
    fmt = lambda v: f"{v:.2f}" if v is not None else "—"  # noqa: E731
    for i, e in enumerate(experts):
        print(f"| {e} | {sparse[i]:.2f} | {stock[i]:.2f} | {fmt(dense[i])} | {fmt(dense_loop[i])} | {matmul_ms:.2f} |")
    for k in ("flat_128_vs_8", "flat_512_vs_8", "speedup_vs_dense_128", "fraction_of_peak_128",
              "speedup_vs_dense_loop_128", "stock_flat_128_vs_8", "stock_flat_512_vs_8",
              "stock_speedup_vs_dense_128"):
        if k in result:
            print(f"{k}: {result[k]:.3f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
    return result


def plot(result: dict, path: str) -> None:
    """Time vs expert count: sparse (ours), DeepSpeed as it comes, dense, and the matmul limit."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    e = result["experts"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(e, result["sparse_ms"], "o-", label="sparse, compact dispatch + stacked experts (ours)")
    ax.plot(e, result["sparse_stock_ms"], "s--", label="sparse, DeepSpeed MoE as it comes")
    for key, label, style in (("dense_ms", "dense mixture, one wide matmul", "^-"),
                              ("dense_loop_ms", "dense mixture, loop over experts", "v:")):
        pts = [(x, y) for x, y in zip(e, result[key]) if y is not None]
        ax.plot(*zip(*pts), style, label=label)
    ax.axhline(result["matmul_ms"], color="k", lw=1, label="ideal: matmul with the same useful FLOPs")
    ax.set(xscale="log", yscale="log", xlabel="shared experts per MoE layer", ylabel="forward + backward, ms",
           title=f"one MoE block, {result['device']}")
    ax.set_xticks(e, [str(x) for x in e])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
