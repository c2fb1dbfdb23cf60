"""The one training loop: data -> DeepSpeed engine -> epochs with validation and checkpoints -> test once.

Every rank runs every forward (MoE all-to-alls need all ranks); rank 0 alone prints, logs and writes files.
Once per step the ranks all-reduce two flags, "this rank's loss is not finite" and "this rank was asked to
stop", so a NaN or a SIGTERM/SIGUSR1 on any rank is acted on by all of them at the same step.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint, distributed
from .config import ConfigError, RunConfig
from .data import describe_source, prepare, train_loader
from .engine import compute_dtype, initialize, load_ds_config, point_tensorboard
from .evaluate import evaluate, inputs, to_device
from .losses import compute_loss
from .metrics import baselines
from .model import MMoLRE, count_parameters
from .monitor import Monitor, tensorboard_dir
from .preemption import StopRequest
from .report import SYNTHETIC_NOTICE, flatten, format_table, git_commit, versions, write_predictions

# Test hook: make the loss of the N-th batch this process trains on (1-based) NaN on rank
# MMOLRE_FAULT_NAN_RANK (default 0).
FAULT_NAN_STEP = "MMOLRE_FAULT_NAN_STEP"


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainState:
    """Everything besides the engine's own state that a resumed run needs; saved as client state."""
    epoch: int = 0                 # completed epochs
    epoch_step: int = 0            # batches of the current epoch already consumed
    global_step: int = 0           # optimizer steps taken
    train_seconds: float = 0.0
    train_samples: int = 0
    skipped_nonfinite: int = 0
    best_tag: str | None = None
    best_epoch: int = 0
    best_valid_loss: float = float("inf")
    history: list = field(default_factory=list)


def log(info: distributed.DistInfo, *parts) -> None:
    if info.is_main:
        print(*parts, flush=True)


def resolve_run_dir(cfg: RunConfig, info: distributed.DistInfo) -> str:
    t = cfg.train
    name = t.run_name
    if info.is_main:
        if name is None and t.resume:
            candidates = [d for d in os.listdir(t.output_dir)
                          if checkpoint.latest_complete(checkpoint.checkpoint_dir(os.path.join(t.output_dir, d)),
                                                        warn=False)] if os.path.isdir(t.output_dir) else []
            if not candidates:
                raise ConfigError(f"--resume: no run with a checkpoint in {t.output_dir!r}")
            name = max(candidates, key=lambda d: os.path.getmtime(os.path.join(t.output_dir, d)))
        if name is None:
            name = (f"{cfg.data.dataset}-e{cfg.model.num_experts}k{cfg.model.top_k}-"
                    f"{time.strftime('%Y%m%d-%H%M%S')}")
    name = distributed.broadcast_from_main(name, info)
    return os.path.join(t.output_dir, name)


def _routing_summary(out, info) -> tuple[np.ndarray, ...]:
    """Per-layer/task aux loss and entropy averaged over ranks, expert loads summed over ranks."""
    aux = out.aux_loss.detach().float()
    load = out.expert_load.float()
    entropy = out.router_entropy.float()
    dropped = out.dropped_fraction.float()
    weights = out.modality_weights.float().mean(1)
    packed = torch.cat([aux.flatten(), entropy.flatten(), dropped.flatten(), weights.flatten(), load.flatten()])
    packed = distributed.all_reduce_sum(packed.cpu(), info)
    sizes = [aux.numel(), entropy.numel(), dropped.numel(), weights.numel(), load.numel()]
    a, e, d, w, l = torch.split(packed, sizes)
    n = info.world_size
    return ((a / n).view_as(aux).numpy(), (e / n).view_as(entropy).numpy(), (d / n).numpy(),
            (w / n).view_as(weights).numpy(), l.view_as(load).numpy())


class Trainer:
    def __init__(self, cfg: RunConfig):
        if os.environ.get("MMOLRE_DS_LOG", "warning").lower() != "info":
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.cfg = cfg
        m, t = cfg.model, cfg.train
        # Everything that can be checked without a process group is checked first.
        on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
        world = int(os.environ.get("WORLD_SIZE") or 1)
        ds_config = load_ds_config(t, world, on_gpu)
        self.stop = StopRequest().install()

        info = self.info = distributed.init(t.dist_timeout)
        from deepspeed.accelerator import get_accelerator
        acc = get_accelerator()
        on_gpu = acc.device_name() != "cpu"
        self.device = torch.device(acc.device_name(info.local_rank) if on_gpu else "cpu")
        if on_gpu:
            acc.set_device(info.local_rank)
        self.ep_size = distributed.choose_ep_size(t.ep_size, info.world_size, m.num_experts, info.local_world_size)
        self.run_dir = resolve_run_dir(cfg, info)
        self.ckpt_dir = checkpoint.checkpoint_dir(self.run_dir)
        point_tensorboard(ds_config, tensorboard_dir(self.run_dir))

        self.data = prepare(cfg.data, builds=info.local_rank == 0, barrier=lambda: distributed.barrier(info))
        if self.data.synthetic:
            log(info, SYNTHETIC_NOTICE)
        for name, meta in self.data.sources.items():
            log(info, describe_source(name, meta, self.data.modalities))
        if info.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.json"), "w") as f:
                json.dump({**cfg.to_dict(), "ds_config": ds_config}, f, indent=1)
            with open(os.path.join(self.run_dir, "data_meta.json"), "w") as f:  # what export/predict need
                json.dump({"shapes": {k: list(v) for k, v in self.data.shapes.items()},
                           "normalisation": self.data.normalisation,
                           "sources": {n: meta["source"] for n, meta in self.data.sources.items()},
                           "synthetic": self.data.synthetic}, f)

        torch.manual_seed(t.seed)
        self.model = MMoLRE(m, self.data.shapes, ep_size=self.ep_size)
        self.model.init_shared_experts(t.seed, distributed.expert_parallel_rank(info.rank, self.ep_size))
        self.params = count_parameters(self.model)
        self.params["expert_bytes_per_rank"] = sum(p.numel() * p.element_size() for _, b in self.model.moe_blocks()
                                                   for p in b.shared_experts.parameters())
        self.micro = ds_config["train_micro_batch_size_per_gpu"]
        self.loader = train_loader(self.data.splits["train"], self.micro, info.rank, info.world_size, t.seed)
        self.steps_per_epoch = len(self.loader)
        total_steps = min(self.steps_per_epoch * t.epochs, t.max_steps or 10**12)
        self.engine = initialize(self.model, t, ds_config, total_steps)
        torch.manual_seed(t.seed * 1000 + info.rank + 1)  # dropout differs per rank; weights were broadcast
        self.dtype = compute_dtype(self.engine)
        self.monitor = Monitor(tensorboard_dir(self.run_dir) if info.is_main else None)
        self.state = TrainState()
        log(info, f"run: {self.run_dir} | world {info.world_size} | expert parallel {self.ep_size} | "
                  f"{m.num_experts} experts, top-{m.top_k}, rank {m.expert_rank} | params "
                  f"{self.params['total']:,} (experts {self.params['expert']:,}) | {self.steps_per_epoch} "
                  f"steps/epoch x {t.epochs} epochs")

    # ---- checkpoints -------------------------------------------------------------------------------
    def save(self) -> str:
        tag = checkpoint.tag_for(self.state.global_step)
        marker = {"step": self.state.global_step, "epoch": self.state.epoch, "epoch_step": self.state.epoch_step,
                  "world_size": self.info.world_size, "ep_size": self.ep_size}
        checkpoint.save(self.engine, self.ckpt_dir, tag, {"train_state": asdict(self.state)}, self.info.rank,
                        lambda: distributed.barrier(self.info), marker)
        if self.info.local_rank == 0:
            checkpoint.prune(self.ckpt_dir, self.cfg.train.keep_checkpoints, protect={self.state.best_tag})
        return tag

    def resume(self) -> None:
        tag = checkpoint.latest_complete(self.ckpt_dir, warn=self.info.is_main)
        if tag is None:
            raise ConfigError(f"--resume: no complete checkpoint in {self.ckpt_dir}")
        marker = checkpoint.read_marker(self.ckpt_dir, tag)
        same = marker["world_size"] == self.info.world_size and marker["ep_size"] == self.ep_size
        client = checkpoint.load(self.engine, self.ckpt_dir, tag, self.info.rank, weights_only=not same)
        self.state = TrainState(**client["train_state"])
        if same:
            log(self.info, f"resumed from {self.ckpt_dir}/{tag}: epoch {self.state.epoch}, step "
                           f"{self.state.global_step}")
            return
        # Experts are stored per global id, so the weights load under any expert-parallel size; ZeRO's
        # optimizer shards are laid out for the old world and cannot be.
        sched = self.engine.lr_scheduler
        sched.last_epoch = self.state.global_step - 1
        sched.step()
        self.state.epoch_step = 0
        log(self.info, f"resumed WEIGHTS ONLY from {self.ckpt_dir}/{tag}, saved with world size "
                       f"{marker['world_size']} / expert parallel {marker['ep_size']}, now {self.info.world_size} / "
                       f"{self.ep_size}: the optimizer state was reset (the LR schedule continues at step "
                       f"{self.state.global_step}), and epoch {self.state.epoch + 1} restarts from its first batch")

    # ---- one step ----------------------------------------------------------------------------------
    def _flags(self, loss) -> tuple[bool, bool]:
        """(some rank's loss is not finite, some rank was asked to stop), the same on every rank."""
        flags = torch.tensor([float(not torch.isfinite(loss.detach()).item()), float(self.stop.requested)])
        flags = distributed.all_reduce_sum(flags, self.info)
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def _nonfinite(self, loss, batch) -> None:
        bad = [] if torch.isfinite(loss.detach()).item() else [i for i, v in zip(batch.ids, batch.valid) if v]
        ids = sum(distributed.all_gather(bad, self.info), [])
        where = f"step {self.state.global_step + 1} (epoch {self.state.epoch + 1}, batch {self.state.epoch_step + 1})"
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteLoss(f"non-finite loss at {where}; the weights were not updated. Samples of the "
                                f"batch: {ids[:20]}{' ...' if len(ids) > 20 else ''}. Use --on_nonfinite skip "
                                f"to skip such steps instead")
        self.state.skipped_nonfinite += 1
        log(self.info, f"warning: skipped a non-finite loss at {where}; samples {ids[:10]}")

    def _log_step(self, loss, out, tick, window_samples, bar) -> None:
        info, state = self.info, self.state
        losses = distributed.all_reduce_sum(torch.stack(
            [loss.total.detach(), loss.sentiment.detach(), loss.emotion.detach(), loss.aux.detach()]).float().cpu(),
            info) / info.world_size
        aux, entropy, dropped, weights, load = _routing_summary(out, info)
        self.monitor.scalars({"loss/total": losses[0], "loss/sentiment": losses[1], "loss/emotion": losses[2],
                              "loss/aux": losses[3], "train/lr": self.engine.get_lr()[0],
                              "train/samples_per_s": window_samples / (time.perf_counter() - tick),
                              "train/epoch": state.epoch}, state.global_step)
        self.monitor.routing(out.layer_names, aux, load, entropy, dropped, state.global_step)
        self.monitor.fusion(self.model.modalities, weights, state.global_step)
        bar.set_postfix(loss=f"{losses[0]:.3f}", mae=f"{losses[1]:.3f}", bce=f"{losses[2]:.3f}")

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict | None:
        """Train, validate and test; returns results.json's content on rank 0, None elsewhere or when a
        stop signal ended the run early (after saving a checkpoint)."""
        t, info = self.cfg.train, self.info
        if t.resume:
            self.resume()
        state = self.state
        fault_step = int(os.environ.get(FAULT_NAN_STEP, 0))
        fault_rank = int(os.environ.get("MMOLRE_FAULT_NAN_RANK", 0))
        global_batch = self.micro * info.world_size
        batches_here = 0
        done = bool(t.max_steps) and state.global_step >= t.max_steps
        while state.epoch < t.epochs and not done:
            self.loader.sampler.start_at(state.epoch, state.epoch_step * self.micro)
            bar = tqdm(self.loader, desc=f"epoch {state.epoch + 1}/{t.epochs}", disable=not info.is_main,
                       dynamic_ncols=True, leave=False, initial=state.epoch_step, total=self.steps_per_epoch)
            tick, window_samples = time.perf_counter(), 0
            for batch in bar:
                step_start = time.perf_counter()
                batch = to_device(batch, self.device, self.dtype)
                out = self.engine(*inputs(batch))
                loss = compute_loss(out, batch, t.aux_loss_weight, t.emotion_loss_weight, t.tasks)
                batches_here += 1
                if fault_step == batches_here and info.rank == fault_rank:
                    loss.total = loss.total * float("nan")
                nonfinite, stop = self._flags(loss.total)
                if nonfinite:
                    self._nonfinite(loss.total, batch)
                state.epoch_step += 1
                if not nonfinite:
                    self.engine.backward(loss.total)
                    self.engine.step()
                    state.global_step += 1
                    state.train_samples += global_batch
                    state.train_seconds += time.perf_counter() - step_start
                    window_samples += global_batch
                    if state.global_step % t.log_every == 0:
                        self._log_step(loss, out, tick, window_samples, bar)
                        tick, window_samples = time.perf_counter(), 0
                    done = bool(t.max_steps) and state.global_step >= t.max_steps
                if stop:
                    tag = self.save()
                    bar.close()
                    log(info, f"stop requested ({self.stop.signal_name or 'on another rank'}): saved "
                              f"{self.ckpt_dir}/{tag} at step {state.global_step}; continue with --resume")
                    self.monitor.close()
                    return None
                mid_epoch = state.epoch_step < self.steps_per_epoch
                if t.save_every and state.global_step % t.save_every == 0 and mid_epoch and not done and not nonfinite:
                    self.save()
                if done:
                    break
            bar.close()
            self._end_epoch()
        return self._test()

    def _end_epoch(self) -> None:
        info, state = self.info, self.state
        state.epoch += 1
        state.epoch_step = 0
        valid = evaluate(self.engine, self.data, "valid", self.cfg, info, self.device, self.dtype)
        state.history.append({"epoch": state.epoch, "step": state.global_step, "valid_loss": valid.loss,
                              "valid": valid.metrics})
        self.monitor.scalars(flatten("valid", valid.metrics), state.global_step)
        tag = checkpoint.tag_for(state.global_step)
        if valid.loss < state.best_valid_loss:
            state.best_valid_loss, state.best_tag, state.best_epoch = valid.loss, tag, state.epoch
        self.save()
        v = valid.metrics["sentiment"]
        log(info, f"epoch {state.epoch}: valid loss {valid.loss:.4f} | MAE {v['mae']:.4f} | Non0 Acc-2 "
                  f"{v['non0_acc2']:.4f}" + (f" | emotion micro-F1 {valid.metrics['emotion']['micro_f1']:.4f}"
                                             if "emotion" in valid.metrics else "")
                  + (" (best)" if state.best_tag == tag else ""))
        self.monitor.flush()

    def _test(self) -> dict | None:
        """The test split is evaluated once, with the checkpoint that validation selected."""
        info, state, m = self.info, self.state, self.cfg.model
        checkpoint.load(self.engine, self.ckpt_dir, state.best_tag, info.rank, weights_only=True)
        test = evaluate(self.engine, self.data, "test", self.cfg, info, self.device, self.dtype)
        self.monitor.scalars(flatten("test", test.metrics), state.global_step)
        self.monitor.close()
        if not info.is_main:
            return None
        train_split = self.data.splits["train"].hf
        best = next(h for h in state.history if h["epoch"] == state.best_epoch)
        emo_rows = np.asarray(train_split["has_emotion"], bool)
        has = test.predictions["has_emotion"].astype(bool)
        results = {
            "config": self.cfg.to_dict(), "synthetic": self.data.synthetic, "dataset": self.cfg.data.dataset,
            "world_size": info.world_size, "ep_size": self.ep_size, "num_experts": m.num_experts, "top_k": m.top_k,
            "best_epoch": state.best_epoch, "best_checkpoint": state.best_tag, "global_step": state.global_step,
            "params": self.params,
            "data": {name: {k: meta.get(k) for k in ("source", "sha256", "modalities", "shapes", "splits")}
                     | {"emotion_labels": (meta.get("emotion_labels") or {}).get("summary")}
                     for name, meta in self.data.sources.items()},
            "train": {"seconds": state.train_seconds, "samples": state.train_samples,
                      "samples_per_s": state.train_samples / max(state.train_seconds, 1e-9), "epochs": state.epoch,
                      "skipped_nonfinite": state.skipped_nonfinite},
            "valid": best["valid"], "test": test.metrics,
            "baselines": baselines(np.asarray(train_split["sentiment"]),
                                   np.asarray(train_split["emotions"])[emo_rows],
                                   test.predictions["sentiment_true"], test.predictions["emotion_true"][has]),
            "history": state.history, "seed": self.cfg.train.seed, "versions": versions(),
            "git_commit": git_commit(),
        }
        write_predictions(os.path.join(self.run_dir, "predictions_test.csv"), test.predictions)
        with open(os.path.join(self.run_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(format_table(results), flush=True)
        print(f"\nwrote {self.run_dir}/results.json, predictions_test.csv, tensorboard/, checkpoints/", flush=True)
        return results


def train(cfg: RunConfig) -> dict | None:
    return Trainer(cfg).run()
