"""`mmolre export`: a run's checkpoint -> a model directory people can share (`shared_model.py`).

It reads the checkpoint files directly, without DeepSpeed's engine, launcher or process group: the dense
weights from DeepSpeed's `mp_rank_00_model_states.pt` (and, as fp32 masters, from the topology-free state,
`topology_free_state.py`: a bf16 run's model files hold bf16 copies), and every shared expert's fp32 weights
by global expert id (from `expert_state_rank<r>.pt`, `expert_state_files.py`; or, for --grouped_experts false
and earlier checkpoints, from DeepSpeed's per-expert files), so the export does not depend on how many ranks
trained it. A model trained with `--finetune_text` holds its text encoder's weights; loading it needs the
encoder's directory (its architecture and tokenizer) where the run's config names it (an absolute path), and
the tokenizer's hash in config.json says whether the one found is the one trained with.
"""
from __future__ import annotations

import glob
import json
import os
import warnings

import torch

from . import checkpoint, expert_state_files, shared_model, topology_free_state
from .version import __version__
from .config import saved_model_config
from .model import MMoLRE


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


def export(run_dir: str, out_dir: str, tag: str = "best") -> dict:
    """Write the model directory `out_dir` from checkpoint `tag` (best, latest or a tag); returns its config
    and the fp32 weights (`state_dict`)."""
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
    config = {"model_config": cfg["model"], "shapes": data_meta["shapes"], "normalisation": data_meta["normalisation"],
              "emotion_thresholds": thresholds, "synthetic": data_meta["synthetic"],
              "data": {name: os.path.basename(path) for name, path in data_meta.get("sources", {}).items()},
              "text_encoder": _text_encoder(model_cfg, data_meta), "source_run": os.path.abspath(run_dir),
              "checkpoint": tag, "versions": _versions()}
    state = {k: v.float() for k, v in shared_model.full_state_dict(model).items()}
    shared_model.write(out_dir, state, config, model_card(run_dir, config))
    return {**config, "state_dict": state}


def _text_encoder(model_cfg, data_meta: dict) -> dict | None:
    """The fine-tuned encoder by name and its tokenizer's hash (the cache key of the token ids it reads)."""
    if not model_cfg.finetune_text:
        return None
    from .data.tokens import TextTokens
    tokens = TextTokens(model_cfg.text_encoder, data_meta["shapes"]["text"][0])
    return {"name": model_cfg.text_encoder, "tokenizer_sha256_12": tokens.key(), "max_length": tokens.max_length}


def _versions() -> dict:
    import deepspeed
    return {"mmolre": __version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__}


def model_card(run_dir: str, config: dict) -> str:
    """A short README.md: what the model is, the data it was trained on, its test table, how to load it."""
    path = os.path.join(run_dir, "results.json")
    results = json.load(open(path)) if os.path.isfile(path) else {}
    m = config["model_config"]
    lines = ["# MMoLRE model", "",
             f"Multimodal mixture of low-rank experts (`mmolre` {config['versions']['mmolre']}): sentiment "
             f"regression and six-emotion recognition from {', '.join(config['shapes'])}; {m.get('num_experts')} "
             f"shared experts, top-{m.get('top_k')}, checkpoint `{config['checkpoint']}` of run "
             f"`{os.path.basename(config['source_run'])}`.", ""]
    if config["synthetic"]:
        lines += ["**Trained on synthetic data**: its numbers say nothing about real MOSI/MOSEI.", ""]
    else:
        lines += ["Trained on: " + ", ".join(f"{n} (`{f}`)" for n, f in config["data"].items()) + ".", ""]
    test = results.get("test", {})
    if test.get("sentiment"):
        names = [k for k in ("mae", "corr", "has0_acc2", "non0_acc2", "acc7") if k in test["sentiment"]]
        lines += ["Test split (selected on validation):", "", "| " + " | ".join(names) + " |",
                  "|" + "---|" * len(names), "| " + " | ".join(f"{test['sentiment'][k]:.4f}" for k in names) + " |"]
        if test.get("emotion"):
            lines += ["", f"Emotions (threshold 0.5): micro-F1 {test['emotion']['micro_f1']:.4f}"]
        lines.append("")
    lines += ["```python", "from mmolre import load_model", "model = load_model(\"this directory\")",
              "out = model.predict(\"data_dir/\", split=\"test\")   # `mmolre data convert` output, an MMSA pickle, "
              "or a dict of arrays [N, T, F]", "```", ""]
    return "\n".join(lines)


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
