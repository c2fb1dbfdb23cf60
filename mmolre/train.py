"""The one training loop: data -> DeepSpeed engine -> epochs with validation and checkpoints -> test once.

Every rank runs every forward (MoE all-to-alls need all ranks); rank 0 alone prints, logs and writes files.
The Trainer is built by named steps, then `train` runs epochs of `train_step`s (one accumulation window
each), `validate` ends each epoch and `test` evaluates the checkpoint validation selected. Everything else is
delegated: checkpoints to `checkpointer`, the epoch's expert loads and aux_free nudges to `expert_loads`,
losses/timing/TensorBoard to `step_metrics`, stop requests and non-finite losses to `step_guards`, emotion
thresholds to `emotion_decisions`, and results.json to `results`.

Units: a micro batch is one forward/backward per rank; an optimizer step is one gradient-accumulation
window of `gradient_accumulation_steps` micro batches (DeepSpeed applies the update at the window's
boundary). Step counts (`global_step`, `--max_steps`, `--save_every`, `--log_every`) are optimizer steps;
checkpoints are taken at window boundaries only, so no accumulated gradient is ever lost.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from typing import NamedTuple

import torch
from tqdm import tqdm

from . import checkpoint, distributed
from .distributed import print_main
from .build import BatchGeometry, build_model, check_memory, emotion_pos_weight, load_data, rank_device
from .checkpointer import Checkpointer, checkpoint_layout
from .config import RunConfig
from .data import train_loader
from .emotion_decisions import (check_tasks, choose_decisions, decides_thresholds, has_emotion_labels,
                                labelled_emotions, write_thresholds)
from .engine import compute_dtype, initialize, load_ds_config
from .evaluate import evaluate, inputs, to_device
from .expert_loads import EpochExpertLoads, SelectionBiasNudges, epoch_load_record, routing_record, routing_scalars
from .host_memory import keep_freed_host_memory
from .losses import compute_loss, zero_loss
from .monitor import Monitor, flatten, tensorboard_dir
from .tensorboard_tags import EPOCH_SECONDS, TEST, VALID
from .results import (assemble_results, epoch_line, hparams_record, provenance, resolve_run_dir, run_records,
                      stops_early, write_records, write_results)
from .step_guards import NonFiniteLoss, StepGuards
from .step_metrics import StepMetrics, learning_rates
from .train_state import TrainState

__all__ = ["NonFiniteLoss", "Trainer", "train"]


class StepOutcome(NamedTuple):
    stepped: bool     # the optimizer step was applied
    stop: bool        # some rank asked to stop


class Trainer:
    def __init__(self, cfg: RunConfig):
        """The build steps, in order: everything that can be checked without a process group first."""
        if os.environ.get("MMOLRE_DS_LOG", "warning").lower() != "info":
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.cfg, t = cfg, cfg.train
        on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"
        ds_config = load_ds_config(t, int(os.environ.get("WORLD_SIZE") or 1), on_gpu)
        self.guards = StepGuards(t.on_nonfinite)   # signal handlers before the (slow) start-up
        self.info = distributed.init(t.dist_timeout)
        self.device = rank_device(self.info)
        if self.device.type == "cpu":   # a CPU step's large temporaries reuse pages instead of faulting them in
            keep_freed_host_memory()
        self.ep_size = self.build_expert_parallelism()
        self.run_dir = resolve_run_dir(cfg, self.info)
        text_tokens, self.data = load_data(cfg, self.info)
        self.memory_estimate = check_memory(cfg, self.data.shapes, self.ep_size, ds_config, self.info, self.device)
        self.records = run_records(cfg, ds_config, self.data)
        if self.info.is_main and not t.resume:
            write_records(self.run_dir, self.records)
        self.model, self.params = build_model(cfg, self.data, self.ep_size, self.info)
        self.build_engine(ds_config)
        self.build_step_parts()
        self.checkpointer = Checkpointer(self.engine, self.run_dir, cfg, self.info, self.ep_size,
                                         checkpoint_layout(cfg, text_tokens, self.data.shapes), self.data.shapes,
                                         self.geometry.micro, self.geometry.grad_accum, self.dtype)
        self.state = TrainState()
        self.announce()

    def build_expert_parallelism(self) -> int:
        """The expert-parallel size (DESIGN.md §4), and which ranks exchange rows on which hosts."""
        t, info = self.cfg.train, self.info
        ep_size = distributed.choose_ep_size(t.ep_size, info.world_size, self.cfg.model.num_experts,
                                             info.local_world_size)
        hosts = distributed.all_gather(socket.gethostname(), info)
        print_main(info, f"expert-parallel groups (all-to-all): "
                  f"{distributed.describe_expert_parallel_groups(info.world_size, ep_size, hosts)}")
        return ep_size

    def build_engine(self, ds_config: dict) -> None:
        """The training data loader, and the DeepSpeed engine with its schedule planned in samples."""
        t, info = self.cfg.train, self.info
        self.geometry = BatchGeometry(ds_config["train_micro_batch_size_per_gpu"],
                                      ds_config["gradient_accumulation_steps"], info.world_size)
        self.loader = train_loader(self.data.splits["train"], self.geometry.micro, info.rank, info.world_size, t.seed,
                                   self.geometry.grad_accum)
        self.steps_per_epoch = self.loader.sampler.batches() // self.geometry.grad_accum
        sps = self.geometry.samples_per_step
        self.engine = initialize(self.model, t, ds_config, self.steps_per_epoch * sps, sps, info, self.ep_size)
        torch.manual_seed(t.seed * 1000 + info.rank + 1)  # dropout differs per rank; weights were broadcast
        self.dtype = compute_dtype(self.engine)

    def build_step_parts(self) -> None:
        """What each step needs besides the engine: the loss weights, metrics, expert loads and nudges."""
        cfg, info = self.cfg, self.info
        self.aux_weight = cfg.train.aux_loss_weight if cfg.model.balance == "aux" else 0.0
        # a dataset without emotion labels has no emotion loss to show (its BCE term is an exact -0.0)
        has_emotions = has_emotion_labels(self.data.splits["train"])
        check_tasks(cfg.train, self.data)
        self.pos_weight = emotion_pos_weight(cfg, self.data, self.device, info)
        self.monitor = Monitor(tensorboard_dir(self.run_dir) if info.is_main else None)
        self.metrics = StepMetrics(self.monitor, info, self.geometry.samples_per_step, has_emotions,
                                   self.model.modalities)
        blocks = list(self.model.moe_blocks())
        shape = (len(blocks), self.model.num_streams, cfg.model.num_experts if blocks[0][1].moe is not None else 0)
        self.loads = EpochExpertLoads(shape, self.device, info)
        self.nudges = SelectionBiasNudges(self.model, cfg.model.balance, info)

    def announce(self) -> None:
        m, g = self.cfg.model, self.geometry
        accumulation = f" x {g.grad_accum} accumulated" if g.grad_accum > 1 else ""
        print_main(self.info, f"run: {self.run_dir} | world {self.info.world_size} | expert parallel {self.ep_size} "
                              f"| {m.num_experts} experts, top-{m.top_k}, rank {m.expert_rank} | params "
                              f"{self.params['total']:,} (experts {self.params['expert']:,}) | micro batch {g.micro}"
                              f"{accumulation}, {self.steps_per_epoch} optimizer steps/epoch x "
                              f"{self.cfg.train.epochs} epochs")

    # ---- the run -----------------------------------------------------------------------------------
    def run(self) -> dict | None:
        """Train, validate and test; returns results.json's content on rank 0, None elsewhere or when a stop
        request ended the run early (after saving a checkpoint)."""
        try:
            result = self._run()
        finally:
            self.monitor.close()   # (DeepSpeed's own TensorBoard monitor is off: engine.deepspeed_monitors_off)
        # Only after a run that ended well: a rank that raised alone must exit at once (the launcher then
        # ends the others), not wait in a barrier its peers never reach.
        distributed.shutdown(self.info)
        return result

    def _run(self) -> dict | None:
        t = self.cfg.train
        if t.resume:
            self.state = self.checkpointer.resume(self.loads)   # a refused resume leaves the record as it was
            if self.info.is_main and not t.reshard_only:          # a reshard keeps the run's own record
                write_records(self.run_dir, self.records)
        if t.reshard_only:
            self.checkpointer.reshard(self.state, self.loads)
            return None
        return self.test() if self.train() else None

    def done(self) -> bool:
        """--max_steps reached (its sample budget: the same steps under the first start's batch size), or
        --patience epochs without a better validation loss (every rank has the same losses)."""
        t, s = self.cfg.train, self.state
        return (bool(t.max_steps) and s.train_samples >= self.engine.lr_scheduler.max_samples) or stops_early(s, t)

    def train(self) -> bool:
        """Epochs of optimizer steps, each epoch ended by `validate`; False if a stop request ended it early
        (after a checkpoint)."""
        t, state, sampler = self.cfg.train, self.state, self.loader.sampler
        while state.epoch < t.epochs and not self.done():
            sampler.start_at(state.epoch, state.epoch_samples)
            started = time.perf_counter()
            first = sampler.batches() - sampler.batches(state.epoch_samples)
            bar = tqdm(self.loader, desc=f"epoch {state.epoch + 1}/{t.epochs}", disable=not self.info.is_main,
                       dynamic_ncols=True, leave=False, initial=first, total=sampler.batches())
            micro_batches = iter(bar)
            for _ in range(sampler.batches(state.epoch_samples) // self.geometry.grad_accum):
                stepped, stop = self.train_step([next(micro_batches) for _ in range(self.geometry.grad_accum)], bar)
                if stop:
                    tag = self.checkpointer.save(state, self.loads)
                    bar.close()
                    print_main(self.info, f"stop requested ({self.guards.stop_reason}): saved "
                                          f"{self.checkpointer.ckpt_dir}/{tag} at step {state.global_step}; "
                                          f"continue with --resume")
                    return False
                if self.done():
                    break
                mid_epoch = sampler.batches(state.epoch_samples) > 0
                if stepped and t.save_every and state.global_step % t.save_every == 0 and mid_epoch:
                    self.checkpointer.save(state, self.loads)
            bar.close()
            self.validate(time.perf_counter() - started)
        return True

    def train_step(self, window: list, bar) -> StepOutcome:
        """One optimizer step: forward/backward of the window's micro batches, DeepSpeed's update at its
        boundary, then the aux_free nudges and the step's metrics."""
        state, info, stop = self.state, self.info, False
        for position, batch in enumerate(window):
            start = time.perf_counter()
            batch = to_device(batch, self.device, self.dtype)
            self.nudges.before_micro_batch()
            out = self.engine(*inputs(batch))
            t = self.cfg.train
            loss = compute_loss(out, batch, self.aux_weight, t.emotion_loss_weight, t.tasks, t.router_z_loss,
                                self.pos_weight)
            loss.total = self.guards.inject_faults(loss.total, info, state.global_step)
            nonfinite, stop_now = self.guards.agree(loss.total, info)
            stop = stop or stop_now
            if nonfinite:   # skipped: no gradient, and its routes count neither for the epoch nor for aux_free
                self.guards.nonfinite(loss.total, batch, info, self.position())
                state.skipped_nonfinite += 1
                self.nudges.drop_micro_batch()
            else:
                self.loads.add(out.expert_load)
            if position == len(window) - 1:    # DeepSpeed applies the window's update in this micro batch's step()
                assert self.engine.is_gradient_accumulation_boundary(), "windows out of step with DeepSpeed's"
                lr = learning_rates(self.engine)   # the LRs this step applies (the scheduler moves on in step())
            self.backward(loss.total, nonfinite)
            state.epoch_samples += self.geometry.samples_per_micro
            self.metrics.micro_batch(loss, not nonfinite, time.perf_counter() - start)
        stepped = not (nonfinite and self.geometry.grad_accum == 1)
        if stepped and not self.engine.was_step_applied():   # fp16 overflow: DeepSpeed skipped it
            stepped = False
            print_main(info, f"warning: DeepSpeed skipped optimizer step {state.global_step + 1} (gradient overflow)")
        self.nudges.after_step(stepped)
        seconds = self.metrics.close_window(stepped)
        if stepped:
            state.global_step += 1
            state.train_samples += self.geometry.samples_per_step
            state.train_seconds += seconds
            if self.metrics.due(state.global_step, self.cfg.train.log_every):
                self.metrics.log(state.global_step, state, out, lr, self.engine.get_global_grad_norm(), bar)
        return StepOutcome(stepped, stop)

    def position(self) -> str:
        s = self.state
        return (f"step {s.global_step + 1} (epoch {s.epoch + 1}, micro batch "
                f"{s.epoch_samples // self.geometry.samples_per_micro + 1})")

    def backward(self, loss: torch.Tensor, nonfinite: bool) -> None:
        """Backward and step one micro batch. A skipped non-finite micro batch contributes no gradient: with
        no accumulation its optimizer step is skipped whole; inside an accumulation window it backpropagates
        an exact zero instead, so every rank still runs the window's gradient reductions and DeepSpeed's
        window stays aligned with the epoch."""
        if nonfinite and self.geometry.grad_accum == 1:
            return
        self.engine.backward(zero_loss(self.engine.module) if nonfinite else loss)
        self.engine.step()

    def validate(self, trained_s: float) -> None:
        """End the epoch: evaluate the validation split, record its routing and dead experts, select the checkpoint
        by the validation loss, save; record `trained_s` (the epoch's training) beside what these cost."""
        info, state, clock = self.info, self.state, time.perf_counter()
        state.epoch += 1
        state.epoch_samples = 0
        valid = evaluate(self.engine, self.data, "valid", self.cfg, info, self.device, self.dtype,
                         state.previous_valid_routes())
        loads = epoch_load_record(self.loads.end_epoch(), self.model.moe_layer_names())
        routing = {}
        if info.is_main:
            routing, routes, warning = routing_record(valid, loads, self.cfg.model.num_experts, state.epoch)
            state.valid_routes = routes or state.valid_routes   # for the next epoch's stability
            if warning:
                print_main(info, warning)
        state.history.append({"epoch": state.epoch, "step": state.global_step, "valid_loss": valid.loss,
                              "valid": valid.metrics, **routing})
        self.monitor.scalars({**flatten(VALID, valid.metrics), **routing_scalars(routing)}, state.global_step)
        state.record_validation(checkpoint.tag_for(state.global_step), valid.loss)
        seconds = {"train": trained_s, "validate": time.perf_counter() - clock}
        state.epoch_seconds.append({"epoch": state.epoch, **seconds})   # the save's own seconds come after it
        saving = time.perf_counter()
        self.checkpointer.save(state, self.loads)
        seconds["checkpoint"] = state.epoch_seconds[-1]["checkpoint"] = time.perf_counter() - saving
        self.monitor.scalars(flatten(EPOCH_SECONDS, seconds), state.global_step)
        print_main(info, epoch_line(state, valid, self.cfg.train))
        self.monitor.flush()

    def test(self) -> dict | None:
        """The test split, evaluated once with the checkpoint that validation selected; the emotion thresholds
        are chosen on that checkpoint's validation predictions."""
        info, state = self.info, self.state
        self.checkpointer.load_weights(state.best_tag)
        decide = decides_thresholds(self.cfg.train, self.data)
        valid = evaluate(self.engine, self.data, "valid", self.cfg, info, self.device, self.dtype) if decide else None
        test = evaluate(self.engine, self.data, "test", self.cfg, info, self.device, self.dtype)
        self.monitor.scalars(flatten(TEST, test.metrics), state.global_step)
        if not info.is_main:
            return None
        decisions = None
        if decide:
            decisions = choose_decisions(valid.predictions, test.predictions,
                                         labelled_emotions(self.data.splits["train"]))
            write_thresholds(os.path.join(self.checkpointer.ckpt_dir, state.best_tag), decisions)
        results = assemble_results(self.cfg, self.data, world_size=info.world_size, ep_size=self.ep_size,
                                   params=self.params, state=state, test=test, decisions=decisions,
                                   made_by=provenance())
        write_results(self.run_dir, results, test.predictions, decisions and decisions["thresholds"])
        self.monitor.hparams(*hparams_record(self.cfg, results), state.global_step)
        return results


def train(cfg: RunConfig) -> dict | None:
    return Trainer(cfg).run()
