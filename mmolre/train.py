"""The one training loop: data -> DeepSpeed engine -> epochs with validation and checkpoints -> test once.

Every rank runs every forward (MoE all-to-alls need all ranks); rank 0 alone prints, logs and writes files.
Once per micro batch the ranks all-reduce two flags, "this rank's loss is not finite" and "this rank was
asked to stop", so a NaN or a SIGTERM/SIGUSR1 on any rank is acted on by all of them at the same point.

Units: a micro batch is one forward/backward per rank; an optimizer step is one gradient-accumulation
window of `gradient_accumulation_steps` micro batches (DeepSpeed applies the update at the window's
boundary). Step counts (`global_step`, `--max_steps`, `--save_every`, `--log_every`) are optimizer steps;
checkpoints are taken at window boundaries only, so no accumulated gradient is ever lost; the LR schedule
and the data position are measured in samples, so both continue across a change of world size, micro
batch or accumulation.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint, distributed, elastic
from .config import EMOTIONS, ConfigError, RunConfig, saved_model_config
from .data import describe_source, prepare, train_loader
from .data.tokens import TextTokens
from .engine import compute_dtype, initialize, load_ds_config, point_tensorboard
from .evaluate import evaluate, inputs, to_device
from .losses import compute_loss, zero_loss
from .metrics import baselines, choose_single_threshold, choose_thresholds, emotion_baselines, emotion_metrics
from .model import MMoLRE, count_parameters
from .model.frontend import steps_per_modality
from .monitor import Monitor, tensorboard_dir
from .preemption import StopRequest
from .routing_stats import dead_experts, headline
from .report import SYNTHETIC_NOTICE, flatten, format_table, git_commit, versions, write_predictions

# Test hooks: make the loss of the N-th micro batch this process trains on (1-based) NaN on rank
# MMOLRE_FAULT_NAN_RANK (default 0); ask for a graceful stop once optimizer step N is reached.
FAULT_NAN_STEP = "MMOLRE_FAULT_NAN_STEP"
FAULT_STOP_STEP = "MMOLRE_FAULT_STOP_STEP"


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainState:
    """Everything besides the engine's own state that a resumed run needs; saved as client state."""
    epoch: int = 0                 # completed epochs
    epoch_samples: int = 0         # samples of the current epoch's permutation consumed (all ranks)
    global_step: int = 0           # optimizer steps applied
    train_seconds: float = 0.0
    train_samples: int = 0         # samples of the applied optimizer steps: the LR schedule's position
    skipped_nonfinite: int = 0     # micro batches whose loss was not finite (--on_nonfinite skip)
    best_tag: str | None = None
    best_epoch: int = 0
    best_valid_loss: float = float("inf")
    history: list = field(default_factory=list)
    schedule: dict = field(default_factory=dict)   # the LR schedule's state, for a resume without the engine's
    valid_routes: dict | None = None   # the last validation's routes by id, for routing stability
    epoch_load: torch.Tensor | None = None   # rows per expert so far this epoch, all ranks [layers, tasks, N]

    @classmethod
    def from_client_state(cls, saved: dict, marker: dict, micro_batch: int) -> "TrainState":
        saved = dict(saved)
        if "epoch_step" in saved:   # older checkpoints counted the batches of their own world size
            saved["epoch_samples"] = (saved.pop("epoch_step") * marker.get("micro_batch", micro_batch)
                                      * marker["world_size"])
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


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
    """Per-layer/task aux loss, entropy and dropped fraction averaged over ranks (every rank routes the same
    number of rows), expert loads summed over ranks."""
    aux = out.aux_loss.detach().float()
    load = out.expert_load.float()
    entropy = out.router_entropy.float()
    dropped = out.dropped_fraction.float()
    weights = out.modality_weights.float().mean(1)
    packed = torch.cat([aux.flatten(), entropy.flatten(), dropped.flatten(), weights.flatten(), load.flatten()])
    packed = distributed.all_reduce_sum(packed, info).cpu()
    sizes = [aux.numel(), entropy.numel(), dropped.numel(), weights.numel(), load.numel()]
    a, e, d, w, l = torch.split(packed, sizes)
    n = info.world_size
    return ((a / n).view(aux.shape).numpy(), (e / n).view(entropy.shape).numpy(),
            (d / n).view(dropped.shape).numpy(), (w / n).view(weights.shape).numpy(), l.view(load.shape).numpy())


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
        self.device = torch.device(acc.device_name(info.local_rank) if acc.device_name() != "cpu" else "cpu")
        self.ep_size = distributed.choose_ep_size(t.ep_size, info.world_size, m.num_experts, info.local_world_size)
        hosts = distributed.all_gather(socket.gethostname(), info)
        log(info, f"expert-parallel groups (all-to-all): "
                  f"{distributed.describe_expert_parallel_groups(info.world_size, self.ep_size, hosts)}")
        self.run_dir = resolve_run_dir(cfg, info)
        self.ckpt_dir = checkpoint.checkpoint_dir(self.run_dir)
        point_tensorboard(ds_config, tensorboard_dir(self.run_dir))

        self.text_tokens = TextTokens(m.text_encoder, cfg.data.text_max_length) if m.finetune_text else None
        self.data = prepare(cfg.data, builds=info.local_rank == 0, barrier=lambda: distributed.barrier(info),
                            text_tokens=self.text_tokens)
        if self.data.synthetic:
            log(info, SYNTHETIC_NOTICE)
        for name, meta in self.data.sources.items():
            log(info, describe_source(name, meta, self.data.modalities, m.text_encoder))
        self.record = {"config.json": {**cfg.to_dict(), "ds_config": ds_config},
                       "data_meta.json": {"shapes": {k: list(v) for k, v in self.data.shapes.items()},  # for export
                                          "normalisation": self.data.normalisation,
                                          "sources": {n: meta["source"] for n, meta in self.data.sources.items()},
                                          "synthetic": self.data.synthetic}}
        if info.is_main and not t.resume:
            self._write_record()

        torch.manual_seed(t.seed)
        self.model = MMoLRE(m, self.data.shapes, ep_size=self.ep_size)
        self.model.init_shared_experts(t.seed, distributed.expert_parallel_rank(info.rank, self.ep_size))
        self.params = count_parameters(self.model)
        self.params["expert_bytes_per_rank"] = sum(p.numel() * p.element_size() for _, b in self.model.moe_blocks()
                                                   for p in b.shared_experts.parameters())
        self.micro = ds_config["train_micro_batch_size_per_gpu"]
        self.grad_accum = ds_config["gradient_accumulation_steps"]
        self.loader = train_loader(self.data.splits["train"], self.micro, info.rank, info.world_size, t.seed,
                                   self.grad_accum)
        self.samples_per_micro = self.micro * info.world_size          # one micro batch on every rank
        self.samples_per_step = self.samples_per_micro * self.grad_accum  # one optimizer step
        self.steps_per_epoch = self.loader.sampler.batches() // self.grad_accum
        self.engine = initialize(self.model, t, ds_config, self.steps_per_epoch * self.samples_per_step,
                                 self.samples_per_step, info)
        torch.manual_seed(t.seed * 1000 + info.rank + 1)  # dropout differs per rank; weights were broadcast
        self.dtype = compute_dtype(self.engine)
        self.monitor = Monitor(tensorboard_dir(self.run_dir) if info.is_main else None)
        self.state = TrainState()
        self.aux_weight = t.aux_loss_weight if m.balance == "aux" else 0.0
        # a dataset without emotion labels has no emotion loss to show (its BCE term is an exact -0.0)
        self.has_emotions = bool(np.asarray(self.data.splits["train"].hf["has_emotion"], bool).any())
        check_tasks(t, self.data)
        self.pos_weight = self._emotion_pos_weight() if t.emotion_pos_weight == "prevalence" else None
        self.biased_gates = [b.moe.deepspeed_moe.gate for _, b in self.model.moe_blocks()
                             if b.moe is not None and m.balance == "aux_free"]
        self.epoch_load = None   # rows each expert received this epoch on this rank since the last save
        accumulation = f" x {self.grad_accum} accumulated" if self.grad_accum > 1 else ""
        log(info, f"run: {self.run_dir} | world {info.world_size} | expert parallel {self.ep_size} | "
                  f"{m.num_experts} experts, top-{m.top_k}, rank {m.expert_rank} | params "
                  f"{self.params['total']:,} (experts {self.params['expert']:,}) | micro batch {self.micro}"
                  f"{accumulation}, {self.steps_per_epoch} optimizer steps/epoch x {t.epochs} epochs")

    # ---- checkpoints -------------------------------------------------------------------------------
    def save(self) -> str:
        """A checkpoint of every rank's state; only ever called at an accumulation boundary."""
        tag = checkpoint.tag_for(self.state.global_step)
        self.state.schedule = self.engine.lr_scheduler.state_dict()
        # the epoch's loads so far, whole in the checkpoint (any topology); collective on every rank, also where
        # only rank 0 holds them (a save right after a resume: a reshard)
        self.state.epoch_load = self._take_epoch_load()
        if self.state.epoch_load is not None and self.info.is_main:
            self.epoch_load = self.state.epoch_load.to(self.device)
        marker = {"format": checkpoint.FORMAT, "step": self.state.global_step, "epoch": self.state.epoch,
                  "epoch_samples": self.state.epoch_samples, "world_size": self.info.world_size,
                  "ep_size": self.ep_size, "micro_batch": self.micro, "grad_accum": self.grad_accum,
                  "dtype": str(self.dtype).replace("torch.", ""), **self._layout()}
        checkpoint.save(self.engine, self.ckpt_dir, tag, {"train_state": asdict(self.state)}, self.info,
                        self.ep_size, marker)
        if self.info.local_rank == 0:
            checkpoint.prune(self.ckpt_dir, self.cfg.train.keep_checkpoints, protect={self.state.best_tag})
        return tag

    def _emotion_pos_weight(self) -> torch.Tensor | None:
        """(1 - p) / p per emotion from the train split's prevalence p (clipped to [0.01, 100])."""
        train = self.data.splits["train"].hf
        rows = np.asarray(train["has_emotion"], bool)
        if not rows.any():
            return None
        p = (np.asarray(train["emotions"])[rows] > 0).mean(0)
        weight = np.clip((1 - p) / np.maximum(p, 1e-6), 0.01, 100.0)
        log(self.info, "emotion BCE: present cases weighted by (1 - prevalence) / prevalence: "
                       + ", ".join(f"{e} {w:.2f}" for e, w in zip(EMOTIONS, weight)))
        return torch.tensor(weight, dtype=torch.float32, device=self.device)

    def _layout(self) -> dict:
        """Settings that change what a checkpoint holds (the gates' bias buffers, the optimizer's groups)."""
        return {"balance": self.cfg.model.balance, "router_groups": self.cfg.train.router_lr_scale != 1.0,
                "text_encoder": self.cfg.model.text_encoder,
                "text_tokens": self.text_tokens.key() if self.text_tokens else None,
                "steps": steps_per_modality(self.data.shapes, self.cfg.model.temporal_steps)}

    def resume(self) -> None:
        if self.info.is_main:
            checkpoint.recover_aside(self.ckpt_dir)
        distributed.barrier(self.info)
        tag = checkpoint.latest_complete(self.ckpt_dir, warn=self.info.is_main)
        if tag is None:
            raise ConfigError(f"--resume: no complete checkpoint in {self.ckpt_dir}")
        marker = checkpoint.read_marker(self.ckpt_dir, tag)
        if marker.get("format", 1) > checkpoint.FORMAT:
            raise ConfigError(f"--resume: {self.ckpt_dir}/{tag} was written by a newer version of the trainer "
                              f"(checkpoint format {marker['format']}, this one reads {checkpoint.FORMAT})")
        saved = {k: marker.get(k, default) for k, default in (("balance", "aux"), ("router_groups", False),
                                                              ("text_encoder", None), ("text_tokens", None))}
        if saved["text_tokens"] and self.text_tokens and saved["text_tokens"] != self.text_tokens.key():
            raise ConfigError(f"--resume: {self.ckpt_dir}/{tag} was trained on transcripts tokenized by "
                              f"--text_encoder {saved['text_encoder']} with another tokenizer or --text_max_length "
                              f"than this run's ({self.cfg.model.text_encoder}, {self.cfg.data.text_max_length}); the "
                              f"model's inputs would change, so resume with the same ones or start a new run")
        if bool(saved["text_encoder"]) != self.cfg.model.finetune_text:
            raise ConfigError(f"--resume: {self.ckpt_dir}/{tag} was saved "
                              + (f"with --text_encoder {saved['text_encoder']} --finetune_text" if saved["text_encoder"]
                                 else "without --finetune_text")
                              + "; this run " + ("has it" if self.cfg.model.finetune_text else "has not")
                              + ". The text encoder is part of the model and has optimizer groups of its own, so "
                                "switching it on or off needs a new run")
        if (saved["balance"] == "aux_free") != (self.cfg.model.balance == "aux_free") or \
                saved["router_groups"] != self._layout()["router_groups"]:
            raise ConfigError(f"--resume: {self.ckpt_dir}/{tag} was saved with --balance {saved['balance']} and "
                              f"{'a' if saved['router_groups'] else 'no'} --router_lr_scale other than 1; this run "
                              f"has --balance {self.cfg.model.balance}, --router_lr_scale "
                              f"{self.cfg.train.router_lr_scale}. aux_free keeps selection biases in the model and a "
                              f"router LR scale gives the routers their own optimizer groups, so switching either "
                              f"on or off needs a new run")
        steps = self._layout()["steps"]
        saved_steps = marker.get("steps") or self._recorded_steps()
        if saved_steps != steps:
            raise ConfigError(f"--resume: {self.ckpt_dir}/{tag} was trained on {saved_steps} time steps per modality, "
                              f"this run has {steps} (--modalities, --text_max_length and --temporal_steps decide "
                              f"them); resume with the ones it was trained with (--temporal_steps 0 for runs from "
                              f"before that flag)")
        current = marker.get("format") == checkpoint.FORMAT
        same = current and marker["world_size"] == self.info.world_size and marker["ep_size"] == self.ep_size
        client = checkpoint.load(self.engine, self.ckpt_dir, tag, self.info.rank, weights_only=not same)
        self.state = TrainState.from_client_state(client["train_state"], marker, self.micro)
        if self.state.epoch_load is not None and self.info.is_main:   # counted once, on rank 0
            self.epoch_load = self.state.epoch_load.to(self.device)
        if same:
            # DeepSpeed loads the optimizer state after the scheduler's, and with it the saved LR; a resume
            # with other --epochs re-plans the schedule, so its LR must be the optimizer's again.
            self.engine.lr_scheduler.apply_lr()
            log(self.info, f"resumed from {self.ckpt_dir}/{tag}: epoch {self.state.epoch}, step "
                           f"{self.state.global_step}")
            return
        # DeepSpeed's files hold ZeRO partitions laid out for the old world; the checkpoint's topology-free
        # state (elastic.py) holds every parameter per global expert id. The schedule and the data order are
        # positions in samples, so both continue where they were.
        restored = current and elastic.restore(self.engine, os.path.join(self.ckpt_dir, tag), marker["ep_size"],
                                               self.ep_size,
                                               distributed.expert_parallel_rank(self.info.rank, self.ep_size))
        if self.cfg.train.reshard_only and restored != "weights and optimizer":
            raise ConfigError(f"--reshard_only: {self.ckpt_dir}/{tag} holds no topology-free optimizer state (written "
                              f"by an earlier version, or before the first step); resharding would reset the "
                              f"optimizer, so nothing was written. Resume it with --resume instead")
        self.engine.lr_scheduler.load_state_dict(self.state.schedule or {   # earlier versions saved no plan
            "samples": self.state.train_samples, "last_epoch": self.state.global_step})
        why = (f"saved with world size {marker['world_size']} / expert parallel {marker['ep_size']}, now "
               f"{self.info.world_size} / {self.ep_size}" if current else "written by an earlier version")
        what = ("the weights, AdamW moments and step of every parameter were carried over, regrouped by global "
                "expert id" if restored == "weights and optimizer" else "WEIGHTS ONLY: the optimizer state was reset")
        log(self.info, f"resumed from {self.ckpt_dir}/{tag} under another topology ({why}): {what}; the LR "
                       f"schedule continues at sample {self.engine.lr_scheduler.samples:,} (step "
                       f"{self.state.global_step}) and epoch {self.state.epoch + 1} at sample "
                       f"{self.state.epoch_samples:,} of its order")

    def reshard(self) -> None:
        """Save the state just resumed under its own tag, laid out for this topology. The tag's old files are
        moved aside first and moved back if the save fails (or, if a rank died, by the next resume or
        reshard: `checkpoint.recover_aside`), so a failure leaves the checkpoint as it was."""
        tag = checkpoint.tag_for(self.state.global_step)
        original, aside = os.path.join(self.ckpt_dir, tag), os.path.join(self.ckpt_dir, tag + checkpoint.ASIDE)
        distributed.barrier(self.info)   # every rank has finished reading the tag (resume) before it moves
        if self.info.is_main:
            os.replace(original, aside)
        distributed.barrier(self.info)
        try:
            self.save()
        except BaseException:
            if self.info.is_main:
                shutil.rmtree(original, ignore_errors=True)
                os.replace(aside, original)
            raise
        if self.info.is_main:
            kept = os.path.join(aside, checkpoint.THRESHOLDS)   # the emotion decisions chosen for this checkpoint
            if os.path.isfile(kept):
                shutil.copy2(kept, os.path.join(original, checkpoint.THRESHOLDS))
            shutil.rmtree(aside)
        log(self.info, f"resharded {original} for world size {self.info.world_size} / expert parallel "
                       f"{self.ep_size}: resume with that topology to continue with DeepSpeed's own full load")

    def _done(self) -> bool:
        """--max_steps reached: its sample budget (the same steps under the first start's batch size)."""
        return bool(self.cfg.train.max_steps) and self.state.train_samples >= self.engine.lr_scheduler.max_samples

    # ---- one micro batch ---------------------------------------------------------------------------
    def _flags(self, loss) -> tuple[bool, bool]:
        """(some rank's loss is not finite, some rank was asked to stop), the same on every rank."""
        flags = torch.stack([(~torch.isfinite(loss.detach())).float(),
                             torch.tensor(float(self.stop.requested), device=loss.device)])
        flags = distributed.all_reduce_sum(flags, self.info).cpu()
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def _nonfinite(self, loss, batch) -> None:
        bad = [] if torch.isfinite(loss.detach()).item() else [i for i, v in zip(batch.ids, batch.valid) if v]
        ids = sum(distributed.all_gather(bad, self.info), [])
        where = f"step {self.state.global_step + 1} (epoch {self.state.epoch + 1}, micro batch " \
                f"{self.state.epoch_samples // self.samples_per_micro + 1})"
        if self.cfg.train.on_nonfinite == "stop":
            raise NonFiniteLoss(f"non-finite loss at {where}; the weights were not updated. Samples of the "
                                f"batch: {ids[:20]}{' ...' if len(ids) > 20 else ''}. Use --on_nonfinite skip "
                                f"to skip such micro batches instead")
        self.state.skipped_nonfinite += 1
        log(self.info, f"warning: skipped a non-finite loss at {where}; samples {ids[:10]}")

    def _backward(self, loss, nonfinite: bool) -> None:
        """Backward and step one micro batch. A skipped non-finite micro batch contributes no gradient: with
        no accumulation its optimizer step is skipped whole; inside an accumulation window it backpropagates
        an exact zero instead, so every rank still runs the window's gradient reductions and DeepSpeed's
        window stays aligned with the epoch."""
        if nonfinite and self.grad_accum == 1:
            return
        self.engine.backward(zero_loss(self.engine.module) if nonfinite else loss)
        self.engine.step()

    def _log_step(self, window_losses, count, out, lr, steps, seconds, bar) -> None:
        """TensorBoard scalars of this step (losses averaged over its micro batches and the ranks; routing
        of its last micro batch) and throughput since the last log."""
        info, state = self.info, self.state
        losses = (distributed.all_reduce_sum(window_losses, info) / (info.world_size * count)).cpu()
        aux, entropy, dropped, weights, load = _routing_summary(out, info)
        self.monitor.scalars({"loss/total": losses[0], "loss/sentiment": losses[1],
                              **({"loss/emotion": losses[2]} if self.has_emotions else {}),
                              "loss/aux": losses[3], "loss/router_z": losses[4], **lr,
                              "train/samples": state.train_samples,
                              "train/samples_per_s": self.samples_per_step * steps / max(seconds, 1e-9),
                              "train/epoch": state.epoch}, state.global_step)
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            self.monitor.scalars({"train/grad_norm": norm}, state.global_step)
        self.monitor.routing(out.layer_names, aux, load, entropy, dropped, state.global_step)
        self.monitor.fusion(self.model.modalities, weights, state.global_step)
        bar.set_postfix(loss=f"{losses[0]:.3f}", mae=f"{losses[1]:.3f}",
                        **({"bce": f"{losses[2]:.3f}"} if self.has_emotions else {}))

    def _learning_rates(self) -> dict[str, float]:
        """The model's LR and, with --finetune_text, the text encoder's (its own groups, warm-up and peak)."""
        groups = self.engine.lr_scheduler.optimizer.param_groups
        out = {"train/lr": groups[0]["lr"]}
        text = [g["lr"] for g in groups if str(g.get("name", "")).startswith("text_")]
        if text:
            out["train/lr_text"] = text[0]
        return out

    def _nudge_selection_biases(self, stepped: bool) -> None:
        """--balance aux_free: after an applied optimizer step, every gate's bias moves against its tasks' load
        error over the step's routes, summed over all ranks in one all-reduce (so the replicas stay equal).
        A step that was not applied leaves the biases as they were."""
        if not self.biased_gates:
            return
        pending = [g.pending_counts for g in self.biased_gates]
        for g in self.biased_gates:
            g.pending_counts = None
        if not stepped or any(p is None for p in pending):
            return
        counts = distributed.all_reduce_sum(torch.stack(pending), self.info)
        for gate, c in zip(self.biased_gates, counts):
            gate.nudge_selection_bias(c)

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict | None:
        """Train, validate and test; returns results.json's content on rank 0, None elsewhere or when a
        stop signal ended the run early (after saving a checkpoint)."""
        try:
            result = self._run()
        finally:
            self.monitor.close()
            deepspeed_tb = getattr(getattr(self.engine.monitor, "tb_monitor", None), "summary_writer", None)
            if deepspeed_tb is not None:   # DeepSpeed's own events: the process may leave without teardown
                deepspeed_tb.flush()
        # Only after a run that ended well: a rank that raised alone must exit at once (the launcher then
        # ends the others), not wait in a barrier its peers never reach.
        distributed.shutdown(self.info)
        return result

    def _recorded_steps(self) -> dict:
        """Steps per modality of a checkpoint whose marker does not say: from the run's recorded config (still
        the one it was trained with: a resume rewrites it only after these checks)."""
        try:
            with open(os.path.join(self.run_dir, "config.json")) as f:
                pooled = saved_model_config(json.load(f)["model"]).temporal_steps
        except (OSError, ValueError, KeyError):
            pooled = 0
        return steps_per_modality(self.data.shapes, pooled)

    def _write_record(self) -> None:
        """The run's config.json and data_meta.json (what export and predict read)."""
        os.makedirs(self.run_dir, exist_ok=True)
        for name, content in self.record.items():
            with open(os.path.join(self.run_dir, name), "w") as f:
                json.dump(content, f, indent=1)

    def _run(self) -> dict | None:
        t, info = self.cfg.train, self.info
        if t.resume:
            self.resume()   # a resume that is refused leaves the run's record as it was
            if info.is_main and not t.reshard_only:   # a reshard keeps the run's own record
                self._write_record()
        if t.reshard_only:
            self.reshard()
            return None
        state = self.state
        fault_step = int(os.environ.get(FAULT_NAN_STEP, 0))
        fault_rank = int(os.environ.get("MMOLRE_FAULT_NAN_RANK", 0))
        fault_stop = int(os.environ.get(FAULT_STOP_STEP, 0))
        micro_batches_here, stop = 0, False
        window_losses, window_count, step_seconds = None, 0, 0.0
        log_seconds, log_steps = 0.0, 0
        done = self._done()
        while state.epoch < t.epochs and not done:
            sampler = self.loader.sampler
            sampler.start_at(state.epoch, state.epoch_samples)
            first = sampler.batches() - sampler.batches(state.epoch_samples)
            bar = tqdm(self.loader, desc=f"epoch {state.epoch + 1}/{t.epochs}", disable=not info.is_main,
                       dynamic_ncols=True, leave=False, initial=first, total=sampler.batches())
            for batch in bar:
                start = time.perf_counter()
                batch = to_device(batch, self.device, self.dtype)
                out = self.engine(*inputs(batch))
                loss = compute_loss(out, batch, self.aux_weight, t.emotion_loss_weight, t.tasks, t.router_z_loss,
                                    self.pos_weight)
                load = out.expert_load.detach().float()
                self.epoch_load = load if self.epoch_load is None else self.epoch_load + load
                micro_batches_here += 1
                if fault_step == micro_batches_here and info.rank == fault_rank:
                    loss.total = loss.total * float("nan")
                if fault_stop and state.global_step + 1 >= fault_stop and info.is_main:
                    self.stop.signal_name = self.stop.signal_name or FAULT_STOP_STEP
                nonfinite, stop_now = self._flags(loss.total)
                stop = stop or stop_now
                if nonfinite:
                    self._nonfinite(loss.total, batch)
                boundary = self.engine.is_gradient_accumulation_boundary()   # asked before step() moves it
                lr = self._learning_rates()   # the LRs this step applies (the scheduler moves on in step())
                self._backward(loss.total, nonfinite)
                state.epoch_samples += self.samples_per_micro
                parts = torch.stack([loss.total, loss.sentiment, loss.emotion, loss.aux, loss.z]).detach().float()
                if not nonfinite:
                    window_losses = parts if window_losses is None else window_losses + parts
                    window_count += 1
                step_seconds += time.perf_counter() - start
                if not boundary:
                    continue
                stepped = not (nonfinite and self.grad_accum == 1)
                if stepped and not self.engine.was_step_applied():   # fp16 overflow: DeepSpeed skipped it
                    stepped = False
                    log(info, f"warning: DeepSpeed skipped optimizer step {state.global_step + 1} (gradient "
                              f"overflow)")
                self._nudge_selection_biases(stepped)
                if stepped:
                    state.global_step += 1
                    state.train_samples += self.samples_per_step
                    state.train_seconds += step_seconds
                    log_seconds, log_steps = log_seconds + step_seconds, log_steps + 1
                    if state.global_step % t.log_every == 0 and window_count:
                        self._log_step(window_losses, window_count, out, lr, log_steps, log_seconds, bar)
                        log_seconds, log_steps = 0.0, 0
                    done = self._done()
                    mid_epoch = sampler.batches(state.epoch_samples) > 0
                    if t.save_every and state.global_step % t.save_every == 0 and mid_epoch and not done and not stop:
                        self.save()
                window_losses, window_count, step_seconds = None, 0, 0.0
                if stop:
                    tag = self.save()
                    bar.close()
                    log(info, f"stop requested ({self.stop.signal_name or 'on another rank'}): saved "
                              f"{self.ckpt_dir}/{tag} at step {state.global_step}; continue with --resume")
                    return None
                if done:
                    break
            bar.close()
            self._end_epoch()
        return self._test()

    def _end_epoch(self) -> None:
        info, state = self.info, self.state
        state.epoch += 1
        state.epoch_samples = 0
        before = state.valid_routes and {"ids": state.valid_routes["ids"],
                                         "routes": state.valid_routes["routes"].numpy().astype(np.int64)}
        valid = evaluate(self.engine, self.data, "valid", self.cfg, info, self.device, self.dtype, before)
        routing = self._routing_record(valid, state.epoch)
        state.history.append({"epoch": state.epoch, "step": state.global_step, "valid_loss": valid.loss,
                              "valid": valid.metrics, **routing})
        self.monitor.scalars(flatten("valid", valid.metrics), state.global_step)
        self.monitor.scalars(flatten("routing", {**(routing.get("routing") or {}),
                                                 "dead_experts": routing.get("dead_experts", {})}), state.global_step)
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

    def _take_epoch_load(self) -> torch.Tensor | None:
        """The epoch's expert loads summed over ranks (every rank calls it; each rank's share is then spent)."""
        have = distributed.all_reduce_sum(torch.tensor([float(self.epoch_load is not None)]), self.info)
        if not have.item():
            return None
        local = self.epoch_load if self.epoch_load is not None else torch.zeros(self._load_shape(), device=self.device)
        self.epoch_load = None
        return distributed.all_reduce_sum(local, self.info).cpu()

    def _load_shape(self) -> tuple[int, ...]:
        blocks = list(self.model.moe_blocks())
        return (len(blocks), self.model.num_streams, self.cfg.model.num_experts if blocks[0][1].moe is not None else 0)

    def _routing_record(self, valid, epoch: int) -> dict:
        """This epoch's routing record (rank 0; {} elsewhere): validation's specialisation statistics
        (routing_stats) and the dead experts of each layer over the epoch's training steps, with a warning."""
        load = self._take_epoch_load()
        self.state.epoch_load = None
        load = load.numpy() if load is not None else None
        if not self.info.is_main:
            return {}
        record = {"routing": valid.routing} if valid.routing else {}
        if valid.routing:   # for the next epoch's stability; int16 keeps checkpoints small
            routes = valid.predictions["routes"]
            self.state.valid_routes = {"ids": list(valid.predictions["ids"]), "routes": torch.from_numpy(
                routes.astype(np.int16 if self.cfg.model.num_experts < 2 ** 15 else np.int32))}
        if load is not None and load.shape[-1]:
            dead = dict(zip(self.model.moe_layer_names(), dead_experts(load).tolist()))
            record["dead_experts"] = dead
            if any(dead.values()):
                log(self.info, f"warning: epoch {epoch}: shared experts that received no row: "
                               + ", ".join(f"{layer} {n} of {self.cfg.model.num_experts}"
                                           for layer, n in dead.items() if n))
        return record

    def _emotion_decisions(self, valid: dict, test: dict) -> dict:
        """Per-emotion thresholds (and one shared threshold) chosen on the validation predictions of the selected
        checkpoint, stored beside it (`emotion_thresholds.json`, read by export/predict), the test metrics under
        them, and the trivial predictors beside them (metrics.emotion_baselines)."""
        hv, ht = valid["has_emotion"].astype(bool), test["has_emotion"].astype(bool)
        per = choose_thresholds(valid["emotion_prob"][hv], valid["emotion_true"][hv])
        single = choose_single_threshold(valid["emotion_prob"][hv], valid["emotion_true"][hv])
        thresholds = dict(zip(EMOTIONS, per))
        with open(os.path.join(self.ckpt_dir, self.state.best_tag, checkpoint.THRESHOLDS), "w") as f:
            json.dump({"thresholds": thresholds, "single_threshold": single, "chosen_on": "valid"}, f, indent=1)
        train = self.data.splits["train"].hf
        emo_rows = np.asarray(train["has_emotion"], bool)
        return {"chosen_on": "valid", "thresholds": thresholds, "single_threshold": single,
                "test_per_emotion_thresholds": emotion_metrics(test["emotion_prob"][ht], test["emotion_true"][ht],
                                                               np.asarray(per)),
                "test_single_threshold": emotion_metrics(test["emotion_prob"][ht], test["emotion_true"][ht], single),
                "baselines": emotion_baselines(np.asarray(train["emotions"])[emo_rows], valid["emotion_true"][hv],
                                               test["emotion_true"][ht])}

    def _test(self) -> dict | None:
        """The test split is evaluated once, with the checkpoint that validation selected."""
        info, state, m = self.info, self.state, self.cfg.model
        checkpoint.load(self.engine, self.ckpt_dir, state.best_tag, info.rank, weights_only=True)
        # the emotion thresholds are chosen on the validation split's predictions of the selected checkpoint
        decide = (self.has_emotions and self.cfg.train.tasks != "sentiment"
                  and bool(np.asarray(self.data.splits["valid"].hf["has_emotion"], bool).any()))
        valid = evaluate(self.engine, self.data, "valid", self.cfg, info, self.device, self.dtype) if decide else None
        test = evaluate(self.engine, self.data, "test", self.cfg, info, self.device, self.dtype)
        self.monitor.scalars(flatten("test", test.metrics), state.global_step)
        if not info.is_main:
            return None
        decisions = self._emotion_decisions(valid.predictions, test.predictions) if decide else None
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
            "routing": {"valid": best.get("routing"), "test": test.routing,
                        "dead_experts": best.get("dead_experts"),
                        "summary": headline(best["routing"], best.get("dead_experts")) if best.get("routing") else None},
            "baselines": baselines(np.asarray(train_split["sentiment"]),
                                   np.asarray(train_split["emotions"])[emo_rows],
                                   test.predictions["sentiment_true"], test.predictions["emotion_true"][has]),
            "emotion_decisions": decisions,
            "history": state.history, "seed": self.cfg.train.seed, "versions": versions(),
            "git_commit": git_commit(),
        }
        write_predictions(os.path.join(self.run_dir, "predictions_test.csv"), test.predictions,
                          decisions and decisions["thresholds"])
        with open(os.path.join(self.run_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(format_table(results), flush=True)
        print(f"\nwrote {self.run_dir}/results.json, predictions_test.csv, tensorboard/, checkpoints/", flush=True)
        return results


def check_tasks(t, data) -> None:
    """What the emotion task needs from the data: labels in train and valid (selection and thresholds use
    valid); --emotion_pos_weight needs them in train."""
    have = {s: bool(np.asarray(data.splits[s].hf["has_emotion"], bool).any()) for s in ("train", "valid")}
    if t.tasks == "emotion" and not all(have.values()):
        missing = [s for s, h in have.items() if not h]
        raise ConfigError(f"--tasks emotion: the {' and '.join(missing)} split(s) of {', '.join(data.names)} have no "
                          f"emotion labels (MOSEI's come from --emotion_labels); there would be nothing to train or "
                          f"select on")
    if t.emotion_pos_weight != "none" and not have["train"]:
        raise ConfigError(f"--emotion_pos_weight {t.emotion_pos_weight}: the train split has no emotion labels")


def train(cfg: RunConfig) -> dict | None:
    return Trainer(cfg).run()
