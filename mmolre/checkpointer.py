"""Save, resume and reshard a run through DeepSpeed's engine; `checkpoint.py` keeps the files crash-safe.

A checkpoint is taken at an accumulation boundary only. It holds DeepSpeed's files, the topology-free state
(`topology_free_state.py`), the TrainState and the epoch's expert loads, and a marker with the topology and
the settings that change what a checkpoint holds (`checkpoint_layout`). A resume first checks that layout
against this run (`check_resume_compatible`, a pure function), then loads: with DeepSpeed's own full load on
the same topology, otherwise the weights with DeepSpeed and weights, AdamW moments and step from the
topology-free state, regrouped by global expert id.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict

from . import checkpoint, distributed, expert_state_files, topology_free_state
from .config import ConfigError, RunConfig, saved_model_config
from .model.frontend import steps_per_modality
from .train_state import TrainState


def checkpoint_layout(cfg: RunConfig, text_tokens, shapes: dict) -> dict:
    """Settings that change what a checkpoint holds: the gates' bias buffers, the optimizer's groups, the
    model's inputs."""
    return {"balance": cfg.model.balance, "router_groups": cfg.train.router_lr_scale != 1.0,
            "text_encoder": cfg.model.text_encoder, "text_tokens": text_tokens.key() if text_tokens else None,
            "steps": steps_per_modality(shapes, cfg.model.temporal_steps),
            "expert_store": "banks" if cfg.model.grouped_experts else "deepspeed",
            "expert_optimizer": cfg.train.expert_optimizer if cfg.model.grouped_experts else None}


def check_resume_compatible(marker: dict, layout: dict, cfg: RunConfig, saved_steps: dict, where: str) -> None:
    """Raise ConfigError if the checkpoint at `where` (its marker) cannot continue as this run (its layout and
    config). `saved_steps`: the checkpoint's steps per modality (from its marker, or its run's record)."""
    m = cfg.model
    if marker.get("format", 1) > checkpoint.FORMAT:
        raise ConfigError(f"--resume: {where} was written by a newer version of the trainer (checkpoint format "
                          f"{marker['format']}, this one reads {checkpoint.FORMAT})")
    saved = {k: marker.get(k, default) for k, default in (("balance", "aux"), ("router_groups", False),
                                                          ("text_encoder", None), ("text_tokens", None))}
    if saved["text_tokens"] and layout["text_tokens"] and saved["text_tokens"] != layout["text_tokens"]:
        raise ConfigError(f"--resume: {where} was trained on transcripts tokenized by --text_encoder "
                          f"{saved['text_encoder']} with another tokenizer or --text_max_length than this run's "
                          f"({m.text_encoder}, {cfg.data.text_max_length}); the model's inputs would change, so "
                          f"resume with the same ones or start a new run")
    if bool(saved["text_encoder"]) != m.finetune_text:
        raise ConfigError(f"--resume: {where} was saved "
                          + (f"with --text_encoder {saved['text_encoder']} --finetune_text" if saved["text_encoder"]
                             else "without --finetune_text")
                          + "; this run " + ("has it" if m.finetune_text else "has not")
                          + ". The text encoder is part of the model and has optimizer groups of its own, so "
                            "switching it on or off needs a new run")
    switched_bias = (saved["balance"] == "aux_free") != (m.balance == "aux_free")
    if switched_bias or saved["router_groups"] != layout["router_groups"]:
        raise ConfigError(f"--resume: {where} was saved with --balance {saved['balance']} and "
                          f"{'a' if saved['router_groups'] else 'no'} --router_lr_scale other than 1; this run has "
                          f"--balance {m.balance}, --router_lr_scale {cfg.train.router_lr_scale}. aux_free keeps "
                          f"selection biases in the model and a router LR scale gives the routers their own optimizer "
                          f"groups, so switching either on or off needs a new run")
    stored = marker.get("expert_store")   # absent before format 3: DeepSpeed's files, which both paths read
    if stored and stored != layout["expert_store"]:
        raise ConfigError(f"--resume: {where} keeps its shared experts in "
                          + ("expert banks (--grouped_experts true)" if stored == "banks" else
                             "DeepSpeed's expert parameters (--grouped_experts false)")
                          + f"; this run has --grouped_experts {cfg.model.grouped_experts}. Resume with the setting "
                            f"it was saved with")
    if marker.get("expert_optimizer") == "lazy" and layout["expert_optimizer"] == "dense":
        raise ConfigError(f"--resume: {where} was trained with --expert_optimizer lazy, so its experts have taken "
                          f"different numbers of AdamW steps; dense AdamW steps a bank whole only when they agree. "
                          f"Resume with --expert_optimizer lazy (dense to lazy is allowed: each expert goes on "
                          f"from its own step count)")
    if saved_steps != layout["steps"]:
        raise ConfigError(f"--resume: {where} was trained on {saved_steps} time steps per modality, this run has "
                          f"{layout['steps']} (--modalities, --text_max_length and --temporal_steps decide them); "
                          f"resume with the ones it was trained with (--temporal_steps 0 for runs from before that "
                          f"flag)")


def recorded_steps(run_dir: str, shapes: dict) -> dict:
    """Steps per modality of a checkpoint whose marker does not say: from the run's recorded config (still the
    one it was trained with: a resume rewrites it only after the checks)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            pooled = saved_model_config(json.load(f)["model"]).temporal_steps
    except (OSError, ValueError, KeyError):
        pooled = 0
    return steps_per_modality(shapes, pooled)


# AdamW's per-group settings that come from this run's flags (--weight_decay; AdamW's defaults otherwise), as
# opposed to its state (moments, step) that a checkpoint carries.
HYPERPARAMETERS = ("weight_decay", "betas", "eps")


def _identity(group: dict) -> tuple:
    """What tells a group apart: DeepSpeed's name ("ep_size_2" for both expert groups), our own ("group"; absent
    in checkpoints written before it was added), whether it holds experts."""
    return group.get("name"), group.get("group"), bool(group.get("moe"))


def optimizer_hyperparameters(engine) -> list[dict]:
    """Each optimizer group's identity and HYPERPARAMETERS (of the torch optimizer the schedule and DeepSpeed
    step: `engine.lr_scheduler.optimizer`, the one DeepSpeed's ZeRO and bf16 optimizers wrap)."""
    return [{"identity": _identity(g), **{k: g[k] for k in HYPERPARAMETERS if k in g}}
            for g in engine.lr_scheduler.optimizer.param_groups]


def apply_hyperparameters(engine, wanted: list[dict]) -> None:
    """Put this run's per-group settings and gradient clipping back after DeepSpeed's full load, which restores
    the saved groups (and ZeRO's clip_grad) with the values of the run that saved them."""
    groups = engine.lr_scheduler.optimizer.param_groups
    saved = [_identity(g) for g in groups]
    ours = [w["identity"] for w in wanted]
    same = len(saved) == len(ours) and all(s[0] == o[0] and s[2] == o[2] and (s[1] is None or s[1] == o[1])
                                           for s, o in zip(saved, ours))
    if not same:
        raise ConfigError(f"--resume: the checkpoint's optimizer groups {saved} are not this run's {ours}")
    for group, values in zip(groups, wanted):
        group.update({k: v for k, v in values.items() if k != "identity"})
    if hasattr(engine.optimizer, "clip_grad"):   # ZeRO 1/2 and bf16 restore the saved clipping; ZeRO-0 reads the config
        engine.optimizer.clip_grad = engine.gradient_clipping()


class Checkpointer:
    def __init__(self, engine, run_dir: str, cfg: RunConfig, info: distributed.DistInfo, ep_size: int,
                 layout: dict, shapes: dict, micro_batch: int, grad_accum: int, dtype):
        self.engine, self.run_dir, self.cfg, self.info, self.ep_size = engine, run_dir, cfg, info, ep_size
        self.ckpt_dir = checkpoint.checkpoint_dir(run_dir)
        self.layout, self.shapes = layout, shapes
        self.marker_settings = {"micro_batch": micro_batch, "grad_accum": grad_accum,
                                "dtype": str(dtype).replace("torch.", "")}

    def save(self, state: TrainState, loads) -> str:
        """Every rank's state under the step's tag; only ever called at an accumulation boundary. A collective."""
        tag = checkpoint.tag_for(state.global_step)
        state.schedule = self.engine.lr_scheduler.state_dict()
        client = {"train_state": {**asdict(state), "epoch_load": loads.collect_for_checkpoint()}}
        marker = {"format": checkpoint.FORMAT, "step": state.global_step, "epoch": state.epoch,
                  "epoch_samples": state.epoch_samples, "world_size": self.info.world_size, "ep_size": self.ep_size,
                  **self.marker_settings, **self.layout}
        checkpoint.save(self.engine, self.ckpt_dir, tag, client, self.info, self.ep_size, marker,
                        self.cfg.model.num_experts)
        if self.info.local_rank == 0:
            checkpoint.prune(self.ckpt_dir, self.cfg.train.keep_checkpoints, protect={state.best_tag})
        return tag

    def load_weights(self, tag: str) -> None:
        """A tag's weights into the engine and the expert banks (the test pass loads the selected checkpoint)."""
        checkpoint.load(self.engine, self.ckpt_dir, tag, self.info.rank, weights_only=True)
        experts = self.engine.expert_optimizer
        if experts:   # the banks are not module parameters: DeepSpeed's load does not see them
            values, _ = self._read_expert_share(tag, checkpoint.read_marker(self.ckpt_dir, tag))
            for layer, bank in experts.banks:
                bank.load_rows({name: values[layer][f"{name}/weight"] for name in bank.tensors})

    def resume(self, loads) -> TrainState:
        """The latest complete checkpoint into the engine; returns its TrainState (the loads go to `loads`)."""
        info = self.info
        if info.is_main:
            checkpoint.recover_aside(self.ckpt_dir)
        distributed.barrier(info)
        tag = checkpoint.latest_complete(self.ckpt_dir, warn=info.is_main)
        if tag is None:
            raise ConfigError(f"--resume: no complete checkpoint in {self.ckpt_dir}")
        marker = checkpoint.read_marker(self.ckpt_dir, tag)
        where = f"{self.ckpt_dir}/{tag}"
        check_resume_compatible(marker, self.layout, self.cfg, marker.get("steps") or
                                recorded_steps(self.run_dir, self.shapes), where)
        fmt = marker.get("format", 1)
        # format 2 kept the experts in DeepSpeed's files: still DeepSpeed's own layout for --grouped_experts false
        layout_as_now = fmt == checkpoint.FORMAT or (fmt == 2 and not self.engine.expert_optimizer)
        same = layout_as_now and marker["world_size"] == info.world_size and marker["ep_size"] == self.ep_size
        this_run = optimizer_hyperparameters(self.engine)
        client = checkpoint.load(self.engine, self.ckpt_dir, tag, info.rank, weights_only=not same,
                                 rng=marker["world_size"] == info.world_size)
        state = TrainState.from_client_state(client["train_state"], marker, self.marker_settings["micro_batch"])
        loads.restore(client["train_state"].get("epoch_load"))
        experts_carried = self._load_experts(tag, marker, fmt)
        if same:
            # DeepSpeed loads the optimizer state after the scheduler's, and with it the saved LR, weight decay and
            # clipping; this run's flags decide them (a resume with other --epochs re-plans the schedule; another
            # --weight_decay or gradient_clipping applies from here on), as they do under another topology.
            apply_hyperparameters(self.engine, this_run)
            self.engine.lr_scheduler.apply_lr()
            distributed.print_main(info, f"resumed from {where}: epoch {state.epoch}, step {state.global_step}")
        else:
            self._restore_other_topology(state, marker, tag, fmt, experts_carried)
        return state

    def _load_experts(self, tag: str, marker: dict, fmt: int) -> bool | None:
        """This rank's share of the experts in banks (weights, and AdamW moments and step counts where the
        checkpoint has them and is of a known format); whether the moments came. None without banks."""
        experts = self.engine.expert_optimizer
        if not experts:
            return None
        values, with_moments = self._read_expert_share(tag, marker)
        with_moments = with_moments and fmt >= 2
        for layer, bank in experts.banks:
            experts.load_layer_state(layer, bank, values[layer], with_moments)
        return with_moments

    def _read_expert_share(self, tag: str, marker: dict) -> tuple[dict, bool]:
        """This rank's experts as the tag holds them (`expert_state_files.read_share`)."""
        layers = [layer for layer, _ in self.engine.expert_optimizer.banks]
        return expert_state_files.read_share(
            os.path.join(self.ckpt_dir, tag), layers, self.cfg.model.num_experts, self.ep_size,
            distributed.expert_parallel_rank(self.info.rank, self.ep_size), marker["ep_size"])

    def _restore_other_topology(self, state: TrainState, marker: dict, tag: str, fmt: int,
                                experts_carried: bool | None) -> None:
        """DeepSpeed's files hold ZeRO partitions laid out for the old world; the topology-free state holds every
        dense parameter (and, before format 3, every expert per global expert id); the experts in banks came in
        `_load_experts`. The schedule and the data order are positions in samples, so both continue where they
        were."""
        info, where = self.info, f"{self.ckpt_dir}/{tag}"
        moved = fmt == 2 and bool(self.engine.expert_optimizer)   # experts from DeepSpeed's files into banks
        restored = fmt >= 2 and topology_free_state.restore(
            self.engine, os.path.join(self.ckpt_dir, tag), marker["ep_size"], self.ep_size,
            distributed.expert_parallel_rank(info.rank, self.ep_size))
        experts_reset = experts_carried is False   # the experts' weights came, their optimizer state did not
        if self.cfg.train.reshard_only and (restored != "weights and optimizer" or experts_reset):
            raise ConfigError(f"--reshard_only: {where} holds no topology-free optimizer state (written by an earlier "
                              f"version, or before the first step); resharding would reset the optimizer, so nothing "
                              f"was written. Resume it with --resume instead")
        self.engine.lr_scheduler.load_state_dict(state.schedule or {   # earlier versions saved no plan
            "samples": state.train_samples, "last_epoch": state.global_step})
        why = ("written by an earlier version" if fmt < 2 else
               "format 2: its experts in DeepSpeed's files, now in expert banks" if moved else
               f"saved with world size {marker['world_size']} / expert parallel {marker['ep_size']}, now "
               f"{info.world_size} / {self.ep_size}")
        what = ("WEIGHTS ONLY: the optimizer state was reset" if restored != "weights and optimizer" else
                "the dense model's weights and AdamW state were carried over, the experts' WEIGHTS ONLY: their "
                "optimizer state was reset" if experts_reset else
                "the weights, AdamW moments and step of every parameter were carried over, regrouped by global "
                "expert id")
        moved_only = moved and marker["world_size"] == info.world_size and marker["ep_size"] == self.ep_size
        how = "" if moved_only else " under another topology"
        distributed.print_main(info, f"resumed from {where}{how} ({why}): {what}; the LR schedule "
                                     f"continues at sample {self.engine.lr_scheduler.samples:,} (step "
                                     f"{state.global_step}) and epoch {state.epoch + 1} at sample "
                                     f"{state.epoch_samples:,} of its order")

    def reshard(self, state: TrainState, loads) -> None:
        """Save the state just resumed under its own tag, laid out for this topology. The tag's old files are
        moved aside first and moved back if the save fails (or, if a rank died, by the next resume or reshard:
        `checkpoint.recover_aside`), so a failure leaves the checkpoint as it was."""
        tag = checkpoint.tag_for(state.global_step)
        original, aside = os.path.join(self.ckpt_dir, tag), os.path.join(self.ckpt_dir, tag + checkpoint.ASIDE)
        distributed.barrier(self.info)   # every rank has finished reading the tag (resume) before it moves
        if self.info.is_main:
            os.replace(original, aside)
        distributed.barrier(self.info)
        try:
            self.save(state, loads)
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
        distributed.print_main(self.info, f"resharded {original} for world size {self.info.world_size} / expert "
                                          f"parallel {self.ep_size}: resume with that topology to continue with "
                                          f"DeepSpeed's own full load")
