"""Workers for the multi-process tests (spawned, so they must live in an importable module)."""
import dataclasses
import json
import os

import torch

SHAPES = {"text": (6, 8), "audio": (5, 4)}
BATCH = 8


def setup(rank: int, world: int, port: int, timeout_s: float | None = None):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                      DEEPSPEED_TIMEOUT="2", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from mmolre import distributed
    return distributed.init(timeout_s)


def fixed_batch(seed: int = 0, n: int = BATCH):
    """A deterministic batch with a learnable target; masks cut some sequences short."""
    from mmolre.data.loader import Batch
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(n, t, f, generator=g) for m, (t, f) in SHAPES.items()}
    lengths = {m: torch.randint(2, t + 1, (n,), generator=g) for m, (t, f) in SHAPES.items()}
    masks = {m: torch.arange(t)[None, :] < lengths[m][:, None] for m, (t, _) in SHAPES.items()}
    sentiment = (feats["text"][:, :2, 0].mean(1) * 2).clamp(-3, 3)
    emotions = torch.stack([(sentiment > 0).float(), (sentiment < 0).float()] + [torch.zeros(n)] * 4, 1)
    has_emotion = torch.ones(n, dtype=torch.bool)
    has_emotion[1] = False
    return Batch([f"s{i}" for i in range(n)], feats, masks, sentiment, emotions, has_emotion,
                 torch.ones(n, dtype=torch.bool))


def slice_batch(b, lo, hi):
    from mmolre.data.loader import Batch
    return Batch(b.ids[lo:hi], {m: x[lo:hi] for m, x in b.features.items()},
                 {m: x[lo:hi] for m, x in b.masks.items()}, b.sentiment[lo:hi], b.emotions[lo:hi],
                 b.has_emotion[lo:hi], b.valid[lo:hi])


def model_config(**kw):
    from mmolre.config import ModelConfig
    base = dict(d_model=16, blocks=2, num_experts=4, top_k=2, expert_rank=4, dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def build(ep_size: int, ep_rank: int, seed: int = 5, **kw):
    from mmolre.model import MMoLRE
    torch.manual_seed(seed)
    model = MMoLRE(model_config(**kw), SHAPES, ep_size=ep_size)
    model.init_shared_experts(seed, ep_rank)
    return model


def ds_config(stage: int, micro: int = BATCH // 2, clipping: float = 0.0, bf16: bool = False):
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1,
           "gradient_clipping": clipping, "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}}
    if stage:
        cfg["zero_optimization"].update(contiguous_gradients=True, reduce_scatter=True, overlap_comm=False)
    return cfg


def expert_grads(model, ep_size: int, ep_rank: int) -> dict:
    """{(layer, global expert id, param name): grad} for this rank's experts."""
    out = {}
    for layer, block in model.moe_blocks():
        local = block.moe.num_local_experts
        for i in range(local):
            for name, grad in block.shared_expert_grads(i).items():
                out[(layer, ep_rank * local + i, name)] = grad.detach().clone()
    return out


def dense_grads(model) -> dict:
    from deepspeed.moe.utils import is_moe_param
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if not is_moe_param(p)}


def parity_worker(rank: int, world: int, port: int, out_path: str):
    """world=2, ep=2, ZeRO-0: forward one half of the batch per rank, backward, gather everything."""
    from mmolre.engine import build_engine, optimizer_groups
    from mmolre.losses import compute_loss
    info = setup(rank, world, port)
    model = build(ep_size=world, ep_rank=rank)
    opt = torch.optim.AdamW(optimizer_groups(model, 0.0), lr=1e-3)
    engine = build_engine(model, opt, ds_config(0), info, world)
    half = BATCH // world
    batch = slice_batch(fixed_batch(), rank * half, (rank + 1) * half)
    out = engine(batch.features, batch.masks)
    loss = compute_loss(out, batch, aux_weight=0.5, emotion_weight=1.0)
    engine.backward(loss.total)
    record = {"sentiment": out.sentiment.detach(), "emotion": out.emotion_logits.detach(),
              "loss": loss.total.detach(), "aux": out.aux_loss.detach(),
              "experts": expert_grads(model, world, rank), "dense": dense_grads(model)}
    _save_from_main(record, info, out_path)


def reference_single_process(out_path: str):
    """One process, ep=1, no DeepSpeed engine, DeepSpeed's stock per-expert loop: the two halves forwarded
    separately, mean loss. (The 2-process side uses the grouped fast path.)"""
    from mmolre.losses import compute_loss
    model = build(ep_size=1, ep_rank=0, grouped_experts=False)
    batch = fixed_batch()
    records, losses = [], []
    for lo in (0, BATCH // 2):
        half = slice_batch(batch, lo, lo + BATCH // 2)
        out = model(half.features, half.masks)
        loss = compute_loss(out, half, aux_weight=0.5, emotion_weight=1.0)
        losses.append(loss.total)
        records.append({"sentiment": out.sentiment.detach(), "emotion": out.emotion_logits.detach(),
                        "loss": loss.total.detach(), "aux": out.aux_loss.detach()})
    torch.stack(losses).mean().backward()
    torch.save({"halves": records, "experts": expert_grads(model, 1, 0), "dense": dense_grads(model)}, out_path)


def _zero2_steps(rank, world, port, model_kw, steps, batches, lr=3e-3):
    """Train a 2-process, ZeRO-2, expert-parallel model on fixed batches; returns (info, model, record)."""
    from mmolre import distributed
    from mmolre.engine import build_engine, optimizer_groups
    from mmolre.losses import compute_loss
    info = setup(rank, world, port)
    model = build(ep_size=world, ep_rank=rank, **model_kw)
    opt = torch.optim.AdamW(optimizer_groups(model, 0.0), lr=lr)
    engine = build_engine(model, opt, ds_config(2), info, world)
    torch.manual_seed(100 + rank)
    losses = []
    for step in range(steps):
        batch = slice_batch(fixed_batch(seed=step % batches, n=BATCH), rank * 4, rank * 4 + 4)
        out = engine(batch.features, batch.masks)
        loss = compute_loss(out, batch, aux_weight=0.01, emotion_weight=1.0)
        engine.backward(loss.total)
        engine.step()
        losses.append(float(distributed.all_reduce_sum(loss.total.detach().clone(), info)) / world)
    return info, model, {"losses": losses}


def _save_from_main(record, info, out_path):
    import sys
    from mmolre import distributed
    gathered = distributed.gather_to_main(record, info)
    if info.is_main:
        torch.save(gathered, out_path)
    distributed.shutdown(info)
    # The worker's result is saved and its process group destroyed: leave without the interpreter's
    # teardown, where gloo has been seen (about 1 in 20 workers, under load) to abort a finished process
    # ("terminate called without an active exception"), which would fail the test for no fault of the code.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def training_worker(rank: int, world: int, port: int, out_path: str):
    """world=2, ep=2, ZeRO-2: the loss curve and this rank's expert parameter count."""
    info, model, record = _zero2_steps(rank, world, port, {"dropout": 0.1}, steps=40, batches=4)
    record["local_expert_params"] = sum(t.numel() for _, b in model.moe_blocks() for t in b.shared_expert_tensors())
    _save_from_main(record, info, out_path)


def variant_training_worker(rank: int, world: int, port: int, out_path: str, model_kw: dict):
    """A few ZeRO-2 steps of an ablation or baseline with 2 processes (expert parallel where it has experts)."""
    info, _, record = _zero2_steps(rank, world, port, model_kw, steps=20, batches=2)
    _save_from_main(record, info, out_path)


# ---- expert-data parallelism, ZeRO stages, clipping: every (world, ep) against one process ---------------
CLIP = 0.05        # small enough that every step is clipped, so a wrong global norm changes the weights
STEPS = 3
WEIGHT_DECAY = 0.1


def step_batch(step: int, rank: int = 0, world: int = 1):
    """Step `step`'s global batch of BATCH samples, or rank `rank`'s equal slice of it."""
    per_rank = BATCH // world
    return slice_batch(fixed_batch(seed=step), rank * per_rank, (rank + 1) * per_rank)


def global_parameters(model, ep_size: int, ep_rank: int) -> dict:
    """{dense name or (layer, global expert id, param): value} of the parameters this rank holds."""
    from deepspeed.moe.utils import is_moe_param
    out = {n: p.detach().clone() for n, p in model.named_parameters() if not is_moe_param(p)}
    for layer, block in model.moe_blocks():
        local = block.num_local_shared
        for i in range(local):
            for name, value in block.shared_expert(i).items():
                out[(layer, ep_rank * local + i, name)] = value.detach().clone()
    return out


def reference_training(world: int, weight_decay: float = WEIGHT_DECAY, grouped: bool = False,
                       expert_mode: str = "dense", **model_kw) -> dict:
    """One process, no DeepSpeed: each step averages the losses of the `world` slices (what data parallelism
    computes), clips by the global norm and takes an AdamW step: torch's over the trainer's parameter groups, and
    on the fast path (experts in banks) the expert optimizer's over the experts, with the same coefficient."""
    from mmolre.distributed import DistInfo
    from mmolre.engine import optimizer_groups
    from mmolre.expert_optimizer import ExpertOptimizer
    from mmolre.losses import compute_loss
    model = build(ep_size=1, ep_rank=0, grouped_experts=grouped, **model_kw)
    opt = torch.optim.AdamW(optimizer_groups(model, weight_decay), lr=3e-3)
    experts = ExpertOptimizer(model, expert_mode, weight_decay, DistInfo(0, 0, 1, 1), 1)
    record = {"norms": []}
    for step in range(STEPS):
        parts = []
        for r in range(world):
            batch = step_batch(step, r, world)
            out = model(batch.features, batch.masks)
            loss = compute_loss(out, batch, aux_weight=0.5, emotion_weight=1.0)
            parts.append(loss.total)
            if step == 0:
                record.setdefault("outputs", []).append(out.sentiment.detach())
                record.setdefault("losses", []).append(loss.total.detach())
        torch.stack(parts).mean().backward()
        if experts:
            experts.reduce_gradients()   # one process: the sum over no replicas, scaled by 1 / 1
        if step == 0:
            record["experts"], record["dense"] = expert_grads(model, 1, 0), dense_grads(model)
        dense_sq = sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
        norm = (dense_sq + (float(experts.squared_norm()) if experts else 0.0)) ** 0.5
        record["norms"].append(norm)
        coef = CLIP / (norm + 1e-6)   # torch's clip_grad_norm_ rule
        if coef < 1.0:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        opt.step()
        opt.zero_grad()
        if experts:
            experts.apply_update(3e-3, max(1.0, (norm + 1e-6) / CLIP))
            experts.zero_grad()
    record["params"] = global_parameters(model, 1, 0)
    record["expert_steps"] = {layer: experts.state[layer]["step"].clone() for layer, _ in experts.banks}
    return record


RUNS = ((0, False), (1, False), (2, False), (1, True), (2, True))   # (ZeRO stage, bf16)


def ep_training_worker(rank: int, world: int, port: int, out_path: str, ep_size: int, expert_mode: str = "dense",
                       runs=RUNS, model_kw=None):
    """fp32 under ZeRO 0, 1 and 2, then bf16 under ZeRO 1 and 2, in turn (a fresh model and engine each),
    ep_size experts per group, clipping on: the first step's outputs, loss and gradients (fp32 ZeRO-0),
    every step's global norm, the final parameters; and, in the first forward, DeepSpeed's own all-reduces
    and the rows each local expert computed."""
    import deepspeed.comm as ds_comm
    from mmolre.engine import build_engine, optimizer_groups
    from mmolre.losses import compute_loss
    info = setup(rank, world, port)
    ep_rank = rank % ep_size
    record = {}
    for stage, bf16 in runs:
        model = build(ep_size=ep_size, ep_rank=ep_rank, **(model_kw or {}))
        opt = torch.optim.AdamW(optimizer_groups(model, WEIGHT_DECAY), lr=3e-3)
        # what the trainer's engine.initialize does: DeepSpeed's engine, the experts' optimizer, global-norm clipping
        engine = build_engine(model, opt, ds_config(stage, BATCH // world, CLIP, bf16), info, ep_size, expert_mode,
                              WEIGHT_DECAY)
        norms, own = [], []
        for step in range(STEPS):
            batch = step_batch(step, rank, world)
            if bf16:
                batch.features = {m: x.bfloat16() for m, x in batch.features.items()}
            if stage == 0 and step == 0:
                received, calls = _count_expert_rows(model, ep_rank), []
                original = ds_comm.all_reduce
                ds_comm.all_reduce = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
                out = engine(batch.features, batch.masks)
                ds_comm.all_reduce = original
                record.update(deepspeed_all_reduces_in_forward=len(calls), received=dict(received),
                              reported={layer: out.expert_load[i].sum(0) for i, layer in
                                        enumerate(out.layer_names)})
            else:
                out = engine(batch.features, batch.masks)
            loss = compute_loss(out, batch, aux_weight=0.5, emotion_weight=1.0)
            engine.backward(loss.total)
            if bf16:
                own.append(_norm_of_reduced_gradients(model, info, ep_size, engine.expert_optimizer))
            if stage == 0 and step == 0 and not bf16:
                record.update(output=out.sentiment.detach(), loss=loss.total.detach(),
                              experts=expert_grads(model, ep_size, ep_rank), dense=dense_grads(model))
            engine.step()
            norms.append(engine.get_global_grad_norm())
        record[f"{'bf16_' if bf16 else ''}zero{stage}"] = {"norms": [float(n) for n in norms], "own_norms": own,
                                  "params": global_parameters(model, ep_size, ep_rank)}
    _save_from_main(record, info, out_path)


def _norm_of_reduced_gradients(model, info, ep_size: int, expert_optimizer) -> float:
    """The model's gradient norm computed here from the engine's reduced fp32 gradients (right after the
    boundary backward): dense parameters once, experts summed over the expert-parallel group (those in banks
    from their reduced gradients there)."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import groups, safe_get_full_grad
    from mmolre import distributed
    dense, moe = torch.zeros(()), torch.zeros(())
    for p in model.parameters():
        g = safe_get_full_grad(p).float().pow(2).sum()   # a collective over p's data-parallel group
        if is_moe_param(p):
            moe = moe + g
        else:
            dense = dense + g
    for _, bank in (expert_optimizer.banks if expert_optimizer else ()):
        for t in bank.tensors.values():
            if t.grad is not None:
                moe = moe + t.grad.coalesce().values().float().pow(2).sum()
    group = groups._get_expert_parallel_group(f"ep_size_{ep_size}")
    return float((dense + distributed.all_reduce_sum(moe, info, group=group)).sqrt())


def _count_expert_rows(model, ep_rank: int) -> dict:
    """Count, per (layer, global expert id), the real rows the stacked experts compute from now on."""
    counts = {}
    for layer, block in model.moe_blocks():
        experts = block.shared_experts
        original = experts.forward_rows

        def counting(rows, local_ids, layer=layer, original=original, local=block.num_local_shared):
            for i in local_ids[local_ids >= 0].tolist():
                key = (layer, ep_rank * local + i)
                counts[key] = counts.get(key, 0) + 1
            return original(rows, local_ids)
        experts.forward_rows = counting
    return counts


def topology_change_resume_worker(rank: int, world: int, port: int, run_dir: str, out_path: str, ep_size: int,
                          bf16: bool):
    """Load a run's newest checkpoint into ZeRO-1 and ZeRO-2 engines of this topology (world, ep_size),
    weights only as DeepSpeed allows, then restore the topology-free state; report each parameter's fp32
    master as DeepSpeed left it, this rank's state gathered back after the restore, and the module."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from mmolre import checkpoint, expert_state_files, topology_free_state
    from mmolre.config import ModelConfig
    from mmolre.engine import build_engine, optimizer_groups
    from mmolre.model import MMoLRE
    info = setup(rank, world, port)
    cfg = json.load(open(os.path.join(run_dir, "config.json")))
    shapes = {m: tuple(v) for m, v in json.load(open(os.path.join(run_dir, "data_meta.json")))["shapes"].items()}
    ckpt_dir = checkpoint.checkpoint_dir(run_dir)
    tag = checkpoint.latest_complete(ckpt_dir)
    marker = checkpoint.read_marker(ckpt_dir, tag)
    record = {"ep_rank": rank % ep_size}
    for stage in (1, 2):
        model = MMoLRE(ModelConfig(**cfg["model"]), shapes, ep_size=ep_size)
        opt = torch.optim.AdamW(optimizer_groups(model, 0.01), lr=1e-3)
        engine = build_engine(model, opt, {**ds_config(stage, 8), "bf16": {"enabled": bf16}}, info, ep_size)
        checkpoint.load(engine, ckpt_dir, tag, rank, weights_only=True)
        refreshed = {n: safe_get_full_fp32_param(p).cpu().clone() for n, p in model.named_parameters()}
        restored = topology_free_state.restore(engine, os.path.join(ckpt_dir, tag), marker["ep_size"], ep_size, rank % ep_size)
        gathered = topology_free_state.gather(engine, dataclasses.replace(info, rank=0))   # every parameter this rank holds
        # DeepSpeed's own assembly, one collective per parameter and key, which `gather` batches
        per_parameter = {n: {"fp32": safe_get_full_fp32_param(p).cpu().clone(),
                             **{k: safe_get_full_optimizer_state(p, k).cpu().clone()
                                for k in topology_free_state.MOMENTS}}
                         for n, p in model.named_parameters() if p.requires_grad}
        experts = engine.expert_optimizer   # the experts in banks: this rank's share of the expert state files
        values, moments = expert_state_files.read_share(os.path.join(ckpt_dir, tag), [n for n, _ in experts.banks],
                                                        model.cfg.num_experts, ep_size, rank % ep_size,
                                                        marker["ep_size"])
        for layer, bank in experts.banks:
            experts.load_layer_state(layer, bank, values[layer], moments)
        record[stage] = {"restored": restored, "refreshed": refreshed, "state": gathered,
                         "per_parameter": per_parameter,
                         "module": {n: p.detach().cpu().clone() for n, p in model.named_parameters()},
                         "experts": {layer: {k: v.clone() for k, v in experts.layer_state(layer, bank).items()}
                                     for layer, bank in experts.banks}}
    _save_from_main(record, info, out_path)


def selected_checkpoint_worker(rank: int, world: int, port: int, tmp: str, out_path: str):
    """A real Trainer (launch.py's flags, tiny settings): 2 steps, save (tag A), 2 more steps, save (tag B), then
    the test pass's load of tag A. Reports every expert bank as it was at A's save and after the load."""
    from tests.launcher import TINY
    from mmolre.config import parse_args
    from mmolre.train import Trainer
    setup(rank, world, port)
    os.environ["MMOLRE_CACHE"] = os.path.join(tmp, "cache")
    trainer = Trainer(parse_args([*TINY, "--output_dir", os.path.join(tmp, "runs"), "--run_name", "sel",
                                  "--epochs", "1"], world_size=world))
    batches = iter(trainer.loader)

    def banks():
        return {layer: {n: t.detach().clone() for n, t in bank.tensors.items()}
                for layer, bank in trainer.engine.expert_optimizer.banks}

    for _ in range(2):
        trainer.train_step([next(batches)], None)
    trainer.state.global_step = 2
    tag_a, at_a = trainer.checkpointer.save(trainer.state, trainer.loads), banks()
    for _ in range(2):
        trainer.train_step([next(batches)], None)
    trainer.state.global_step = 4
    trainer.checkpointer.save(trainer.state, trainer.loads)
    moved = banks()
    trainer.checkpointer.load_weights(tag_a)
    _save_from_main({"at_a": at_a, "moved": moved, "loaded": banks()}, trainer.info, out_path)


def padded_eval_batch(rank: int):
    """Rank 0: rows 0-3 of the fixed batch; rank 1: rows 4-5 and two padding rows as evaluation pads its last
    batch (zero features, empty masks, valid False)."""
    from mmolre.data.loader import Batch
    b = slice_batch(fixed_batch(), 4 * rank, 4 * rank + 4)
    if rank == 0:
        return b
    real = torch.tensor([True, True, False, False])
    return Batch(b.ids[:2] + ["", ""], {m: x * real.view(-1, *[1] * (x.dim() - 1)) for m, x in b.features.items()},
                 {m: x & real[:, None] for m, x in b.masks.items()}, b.sentiment, b.emotions, b.has_emotion, real)


def eval_padding_worker(rank: int, world: int, port: int, out_path: str, grouped: bool = True):
    """world=2, ep=2, an evaluation capacity: rank 1 holds padding rows, so the ranks' real rows (and their
    capacities) differ; each rank's predictions of its real rows. grouped False: DeepSpeed's MOELayer, whose
    all-to-all buffers [experts, capacity, d] must have one shape on every rank."""
    from mmolre.engine import build_engine, optimizer_groups
    info = setup(rank, world, port)
    model = build(ep_size=world, ep_rank=rank, eval_capacity_factor=0.5, grouped_experts=grouped)
    opt = torch.optim.AdamW(optimizer_groups(model, 0.0), lr=1e-3)
    engine = build_engine(model, opt, ds_config(0), info, world)
    engine.eval()
    batch = padded_eval_batch(rank)
    with torch.no_grad():
        out = engine(batch.features, batch.masks, batch.valid)
    _save_from_main({"sentiment": out.sentiment[batch.valid], "emotion": out.emotion_logits[batch.valid],
                     "dropped": out.dropped_fraction}, info, out_path)


def eval_padding_worker_deepspeed_layer(rank: int, world: int, port: int, out_path: str):
    eval_padding_worker(rank, world, port, out_path, grouped=False)


def eval_padding_reference(out_path: str):
    """One process, ep 1: each rank's real rows evaluated as a batch of their own."""
    model = build(ep_size=1, ep_rank=0, eval_capacity_factor=0.5).eval()
    records = []
    with torch.no_grad():
        for lo, hi in ((0, 4), (4, 6)):
            b = slice_batch(fixed_batch(), lo, hi)
            out = model(b.features, b.masks)
            records.append({"sentiment": out.sentiment, "emotion": out.emotion_logits,
                            "dropped": out.dropped_fraction})
    torch.save(records, out_path)


STEP_STOCK = dict(route_per="step", top_k=1, grouped_experts=False)   # DeepSpeed's own MoE layer, top-1


def step_rows_on_deepspeeds_layer(rank: int, world: int, port: int, out_path: str):
    """world 2, ep 2, --route_per step on DeepSpeed's own MoE layer (its [experts, capacity, d] all-to-all buffers
    must have one shape on every rank), top-1, without and with a training capacity: the ranks route different
    numbers of valid steps. A training forward and backward of each rank's slice, then an evaluation in which
    rank 1's batch is all padding (it routes no row at all)."""
    from mmolre.engine import build_engine, optimizer_groups
    from mmolre.losses import compute_loss
    info = setup(rank, world, port)
    record = {}
    for factor in (0.0, 0.5):
        model = build(ep_size=world, ep_rank=rank, capacity_factor=factor, **STEP_STOCK)
        opt = torch.optim.AdamW(optimizer_groups(model, 0.0), lr=1e-3)
        engine = build_engine(model, opt, ds_config(0), info, world)
        batch = step_batch(0, rank, world)
        torch.manual_seed(7)   # the capacity's random row order, as in the reference
        out = engine(batch.features, batch.masks)
        engine.backward(compute_loss(out, batch, aux_weight=0.5, emotion_weight=1.0).total)
        engine.eval()
        pad = slice_batch(fixed_batch(), 0, 4)
        if rank == 1:
            pad.valid = torch.zeros(4, dtype=torch.bool)
        with torch.no_grad():
            evaluated = engine(pad.features, pad.masks, pad.valid)
        record[factor] = {"train": out.sentiment.detach(), "dropped": out.dropped_fraction.detach(),
                          "valid_steps": int(sum(m.sum() for m in batch.masks.values())),
                          "eval": evaluated.sentiment[pad.valid]}
    _save_from_main(record, info, out_path)


def step_rows_reference(out_path: str):
    """One process, ep 1, the same model: each rank's slice on its own, and rank 0's evaluation batch."""
    record = {}
    for factor in (0.0, 0.5):
        model = build(ep_size=1, ep_rank=0, capacity_factor=factor, **STEP_STOCK)
        train = []
        for rank in range(2):
            batch = step_batch(0, rank, 2)
            torch.manual_seed(7)
            train.append(model(batch.features, batch.masks).sentiment.detach())
        model.eval()
        pad = slice_batch(fixed_batch(), 0, 4)
        with torch.no_grad():
            record[factor] = {"train": train, "eval": model(pad.features, pad.masks).sentiment}
    torch.save(record, out_path)


def assembly_worker(rank: int, world: int, port: int, out_path: str):
    """`topology_free_state.assemble_from_partitions` with parameters in two kinds of data-parallel group at
    once, interleaved: the whole world (each rank holds a slice, as ZeRO partitions a dense parameter) and each
    rank alone (its own whole value, as an expert under expert parallelism = world), in buckets cut small.
    Reports what it assembled and what each parameter's full value is."""
    import types
    import torch.distributed as dist
    from mmolre import topology_free_state
    info = setup(rank, world, port)
    alone = [dist.new_group([r]) for r in range(world)][rank]   # every rank creates every group, in order
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(n, generator=g) for n in (5, 3, 7, 2, 6)]
    groups = [None, alone, None, alone, None]   # None: the default group, every rank
    params, expected = [], []
    for value, group in zip(values, groups):
        value = value if group is None else value + rank   # a rank's own value where it is alone
        lo, hi = (rank * len(value) // world, (rank + 1) * len(value) // world) if group is None else (0, len(value))
        param = torch.zeros_like(value)
        param._dp_group = group
        fragment = value[lo:hi].clone()
        param._hp_mapping = None if hi == lo else types.SimpleNamespace(
            lp_fragment_address=types.SimpleNamespace(start=lo, numel=hi - lo),
            get_hp_fragment=lambda key, f=fragment: f * (3.0 if key == "exp_avg" else 1.0))
        params.append(param)
        expected.append({None: value, "exp_avg": value * 3.0})
    topology_free_state.ASSEMBLY_BUCKET = 8   # buckets [0], [2], [4] in the world's group, [1, 3] alone
    keep = [True, False, True, True, True]
    record = {"assembled": {str(k): topology_free_state.assemble_from_partitions(params, info, keep, k)
                            for k in (None, "exp_avg")},
              "expected": {str(k): {i: e[k] for i, e in enumerate(expected) if keep[i]} for k in (None, "exp_avg")}}
    _save_from_main(record, info, out_path)
