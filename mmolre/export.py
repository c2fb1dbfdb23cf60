"""A consolidated model for inference without DeepSpeed's engine, launcher or process group.

`export` reads a run's checkpoint files directly: the dense weights from DeepSpeed's
`mp_rank_00_model_states.pt` (and, as fp32 masters, from the topology-free state, `topology_free_state.py`:
a bf16 run's model files hold bf16 copies), and every shared expert's fp32 weights by global expert id (from
`expert_state_rank<r>.pt`, `expert_state_files.py`; or, for --grouped_experts false and earlier checkpoints,
from DeepSpeed's per-expert files), so the export does not depend on how many ranks trained it. It writes one
fp32 file with the model configuration, the feature shapes and the train-split normalisation. `predict` builds the model with expert
parallelism 1 and runs it on CPU. A model trained with `--finetune_text` holds its text encoder's weights;
`export` and `predict` need the encoder's directory (its architecture and tokenizer) where the run's config
names it (an absolute path).
"""
from __future__ import annotations

import glob
import json
import os
import warnings

import torch

from . import checkpoint, expert_state_files, topology_free_state
from .config import saved_model_config
from .data.cache import build_cache, load_cache
from .data.loader import SplitDataset, eval_batches
from .data.tokens import TextTokens
from .evaluate import predict_batches
from .model import MMoLRE
from .model.grouped import per_expert_key

FORMAT = "mmolre-export-1"


def _tag(run_dir: str, tag: str) -> str:
    ckpt_dir = checkpoint.checkpoint_dir(run_dir)
    if tag == "best":
        path = os.path.join(run_dir, "results.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist; the run has no selected checkpoint yet "
                                    f"(use --tag latest)")
        with open(path) as f:
            return json.load(f)["best_checkpoint"]
    if tag == "latest":
        found = checkpoint.latest_complete(ckpt_dir)
        if found is None:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt_dir}")
        return found
    return tag


def export(run_dir: str, out_path: str, tag: str = "best") -> dict:
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(run_dir, "data_meta.json")) as f:
        data_meta = json.load(f)
    tag = _tag(run_dir, tag)
    tag_dir = os.path.join(checkpoint.checkpoint_dir(run_dir), tag)
    if not checkpoint.is_complete(checkpoint.checkpoint_dir(run_dir), tag):
        raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint")
    state = dict(torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu",
                            weights_only=False)["module"])
    for path in glob.glob(os.path.join(tag_dir, "layer_*_expert_*_mp_rank_00_model_states.pt")):
        state.update(torch.load(path, map_location="cpu", weights_only=False))
    model_cfg = saved_model_config(cfg["model"])
    shapes = {m: tuple(v) for m, v in data_meta["shapes"].items()}
    model = MMoLRE(model_cfg, shapes, ep_size=1)
    model.load_state_dict(state, strict=True)   # global expert ids are the local ids at ep_size 1
    marker = checkpoint.read_marker(checkpoint.checkpoint_dir(run_dir), tag)
    fp32 = _load_fp32_state(model, tag_dir, marker)
    banks = list(model.expert_banks())
    if banks:   # every expert, by global id, into the ep-1 model's banks
        values, _ = expert_state_files.read_share(tag_dir, [layer for layer, _ in banks], model.cfg.num_experts, 1,
                                                  0, marker["ep_size"])
        for layer, bank in banks:
            bank.load_rows({name: values[layer][f"{name}/weight"] for name in bank.tensors})
    if not fp32 and marker.get("dtype", "float32") != "float32":
        warnings.warn(f"{tag_dir} was trained in {marker['dtype']} and holds no fp32 master weights; the export "
                      f"takes the {marker['dtype']} module weights", stacklevel=2)
    decisions = os.path.join(tag_dir, checkpoint.THRESHOLDS)   # chosen on valid for this checkpoint, if selected
    thresholds = None
    if os.path.isfile(decisions):
        with open(decisions) as f:
            thresholds = json.load(f)["thresholds"]
    payload = {"format": FORMAT, "model_config": cfg["model"], "shapes": data_meta["shapes"],
               "emotion_thresholds": thresholds,
               "normalisation": data_meta["normalisation"], "synthetic": data_meta["synthetic"],
               "source_run": os.path.abspath(run_dir), "checkpoint": tag,
               "state_dict": {k: v.float() for k, v in full_state_dict(model).items()}}
    torch.save(payload, out_path)
    return payload


def full_state_dict(model: MMoLRE) -> dict[str, torch.Tensor]:
    """The model's state dict with its experts in banks too, under DeepSpeed's per-expert keys (at expert
    parallelism 1 the local ids are the global ones): the form exports have always had."""
    state = dict(model.state_dict())
    for layer, block in model.moe_blocks():
        if block.expert_bank is None:
            continue
        prefix = next(name for name, m in model.named_modules() if m is block.shared_experts) + "."
        for i in range(block.expert_bank.num_local):
            for name, value in block.expert_bank.expert(i).items():
                state[per_expert_key(prefix, i, name)] = value.detach()
    return state


def _load_fp32_state(model: MMoLRE, tag_dir: str, marker: dict) -> bool:
    """Overwrite the model's weights with the fp32 weights of the checkpoint's topology-free state (the
    optimizer's masters for a bf16 run), every expert under its global id. False where it has none."""
    state = topology_free_state.read(tag_dir, marker["ep_size"], model.cfg.num_experts)
    if state is None:
        return False
    missing, unexpected = model.load_state_dict({name: entry["fp32"] for name, entry in state["params"].items()},
                                                strict=False)
    buffers = {name for name, _ in model.named_buffers()}   # e.g. aux_free selection biases: kept from the module
    if unexpected or set(missing) - buffers:
        raise ValueError(f"{tag_dir}: the topology-free state does not match the model: missing "
                         f"{sorted(set(missing) - buffers)[:5]}, unexpected {unexpected[:5]}")
    return True


def load_exported(path: str) -> tuple[MMoLRE, dict]:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not an mmolre export (format {payload.get('format')!r})")
    cfg = saved_model_config(payload["model_config"])
    model = MMoLRE(cfg, {m: tuple(v) for m, v in payload["shapes"].items()}, ep_size=1)
    model.load_state_dict(payload["state_dict"])
    return model.eval(), payload


@torch.no_grad()
def predict(model_path: str, data_path: str, split: str, cache_dir: str, batch_size: int = 64) -> tuple[dict, dict]:
    """Predictions for one split of an MMSA-schema pickle (ids, sentiment, emotion probabilities, labels), and
    the export's payload (its emotion thresholds decide `<emotion>_pred`)."""
    model, payload = load_exported(model_path)
    cfg = model.cfg
    # a model with its own text encoder reads the transcripts, tokenized as in training
    tokens = TextTokens(cfg.text_encoder, payload["shapes"]["text"][0]) if cfg.finetune_text else None
    hf, meta = load_cache(build_cache(data_path, cache_dir, text_tokens=tokens))
    modalities = list(payload["shapes"])
    for m in modalities:
        expected = list(payload["shapes"][m])[:1] if tokens and m == "text" else list(payload["shapes"][m])  # ids
        if m not in meta["shapes"] or meta["shapes"][m] != expected:
            raise ValueError(f"{data_path}: modality {m!r} has shape {meta['shapes'].get(m)}, the model expects "
                             f"{payload['shapes'][m]}")
    ds = SplitDataset(hf[split], modalities, payload["normalisation"],
                      text_hidden=payload["shapes"]["text"][1] if tokens else None)
    preds = predict_batches(lambda batch: model(batch.features, batch.masks, batch.valid), eval_batches(ds, batch_size, 0, 1))
    return preds, payload
