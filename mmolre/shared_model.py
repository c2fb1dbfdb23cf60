"""A trained model as people share it: a directory that opens without running code, and the Python API.

`mmolre export RUN_DIR OUT_DIR` writes (no pickle anywhere; `huggingface_hub` uploads the directory as it is):

    model.safetensors   every weight in fp32 (DeepSpeed's per-expert keys for the shared experts)
    config.json         the model configuration, feature shapes and train-split normalisation, the emotion
                        thresholds chosen on valid, the text encoder (name and tokenizer hash) where the model
                        fine-tuned one, the versions, the source run and checkpoint
    README.md           a model card: the data it was trained on and its test table

From Python (`mmolre predict OUT_DIR data.pkl` is the same call):

    from mmolre import load_model
    model = load_model("OUT_DIR")
    out = model.predict({"text": x, "audio": a, "vision": v})   # arrays [N, T, F], optional "<m>_lengths"
    out = model.predict("data_dir/", split="test")             # a dataset `mmolre data convert` wrote
    out = model.predict("data.pkl", split="test")              # an MMSA-schema file (opening a pickle runs code)
    out["sentiment_pred"], out["emotion_prob"], out.get("emotion_pred")

An export of an earlier version is one torch pickle (`model.pt`); it loads only with `trust_pickle=True`
(`--trust_pickle`), because unpickling a file runs whatever code the file names.
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch

from .config import EMOTIONS, saved_model_config
from .model import MMoLRE
from .model.grouped import per_expert_key

FORMAT = "mmolre-model-2"
PICKLE_FORMAT = "mmolre-export-1"   # one torch pickle, written before the directory
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"


def write(out_dir: str, state_dict: dict[str, torch.Tensor], config: dict, card: str) -> None:
    """The model directory; each file written whole before it replaces an older one."""
    from safetensors.torch import save_file
    if out_dir.endswith(".pt") or os.path.isfile(out_dir):
        raise ValueError(f"{out_dir}: export writes a directory ({WEIGHTS}, {CONFIG}, {CARD}), not one file; "
                         f"give a directory path")
    os.makedirs(out_dir, exist_ok=True)
    tmp = os.path.join(out_dir, f".{WEIGHTS}.tmp{os.getpid()}")
    save_file({k: v.detach().float().contiguous() for k, v in state_dict.items()}, tmp, metadata={"format": FORMAT})
    os.replace(tmp, os.path.join(out_dir, WEIGHTS))
    for name, text in ((CONFIG, json.dumps({"format": FORMAT, **config}, indent=1) + "\n"), (CARD, card)):
        with open(os.path.join(out_dir, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))


def read(path: str, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, config) of a model directory, or of an earlier version's pickle when trusted."""
    if os.path.isdir(path):
        from safetensors.torch import load_file
        for name in (WEIGHTS, CONFIG):
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"{path}: no {name}; not a model directory written by `mmolre export`")
        with open(os.path.join(path, CONFIG)) as f:
            config = json.load(f)
        if config.get("format") != FORMAT:
            raise ValueError(f"{os.path.join(path, CONFIG)} [key 'format']: {config.get('format')!r}, this version "
                             f"reads {FORMAT!r}")
        return load_file(os.path.join(path, WEIGHTS)), config
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such model directory or file")
    if not trust_pickle:
        raise ValueError(f"{path} is a torch pickle (an export of an earlier version): opening it runs any code it "
                         f"names. Re-export the run (`mmolre export RUN_DIR OUT_DIR` writes safetensors), or, only "
                         f"for a file you trust, pass --trust_pickle (Python: trust_pickle=True)")
    warnings.warn(f"{path}: unpickling an earlier version's export (--trust_pickle); this runs any code the file "
                  f"names", stacklevel=2)
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != PICKLE_FORMAT:
        raise ValueError(f"{path}: not an mmolre export (format {getattr(payload, 'get', dict().get)('format')!r})")
    state = payload.pop("state_dict")
    return state, payload


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


class LoadedModel:
    """An exported model on CPU, in evaluation mode, with the emotion thresholds it was exported with."""

    def __init__(self, model: MMoLRE, config: dict):
        self.model, self.config = model, config
        self.thresholds = config.get("emotion_thresholds")
        self.modalities = list(config["shapes"])

    @torch.no_grad()
    def predict(self, data, split: str = "test", cache_dir: str | None = None, batch_size: int = 64) -> dict:
        """Predictions for `data`: arrays {modality: [N, T, F], optional "<m>_lengths", "id", labels}, a dataset
        `mmolre data convert` wrote or an MMSA-schema file (one `split` of it, through the Arrow cache), or a
        prepared `SplitDataset`. Arrays
        without "<m>_lengths" count every step as valid (pass the lengths of padded sequences). Returns ids,
        sentiment_pred, emotion_prob [N, 6], the labels where given and, with thresholds, emotion_pred [N, 6]
        (0/1) at the thresholds chosen on valid. Under an evaluation capacity (eval_capacity_factor > 0) a
        prediction depends on the rows that share its batch of `batch_size`."""
        from .data.loader import SplitDataset, eval_batches
        from .evaluate import predict_batches
        dataset = data if isinstance(data, SplitDataset) else self._dataset(data, split, cache_dir)
        preds = predict_batches(lambda b: self.model(b.features, b.masks, b.valid),
                                eval_batches(dataset, batch_size, 0, 1))
        if self.thresholds:
            cut = np.array([self.thresholds[e] for e in EMOTIONS])
            preds["emotion_pred"] = (np.asarray(preds["emotion_prob"]) > cut).astype(np.int64)
        return preds

    def _dataset(self, data, split: str, cache_dir: str | None):
        from .data.cache import in_memory_split
        from .data.converted import ensure_arrow, open_arrow
        from .data.loader import SplitDataset
        from .data.tokens import TextTokens
        cfg, shapes = self.model.cfg, self.config["shapes"]
        tokens = TextTokens(cfg.text_encoder, shapes["text"][0]) if cfg.finetune_text else None
        if isinstance(data, dict):
            if tokens:
                raise ValueError("this model has its own text encoder and reads transcripts: pass an MMSA-schema "
                                 "file with raw_text")
            hf, where = in_memory_split(data, self.modalities), "arrays"
            found = {m: list(hf.features[m].shape) for m in self.modalities}
        else:
            if cache_dir is None:
                from .config import default_cache_dir
                cache_dir = default_cache_dir()
            ensure_arrow(str(data), cache_dir, text_tokens=tokens)
            splits, meta = open_arrow(str(data), cache_dir, text_tokens=tokens)
            hf, where, found = splits[split], str(data), meta["shapes"]
        for m in self.modalities:
            expected = list(shapes[m])[:1] if tokens and m == "text" else list(shapes[m])   # token ids: steps only
            if m not in found or list(found[m]) != expected:
                raise ValueError(f"{where}: modality {m!r} has shape {found.get(m)}, the model expects {shapes[m]}")
        return SplitDataset(hf, self.modalities, self.config["normalisation"],
                            text_hidden=shapes["text"][1] if tokens else None)


def load_model(path: str, trust_pickle: bool = False) -> LoadedModel:
    """The model `mmolre export` wrote to `path` (a directory), ready to predict on CPU."""
    state, config = read(path, trust_pickle)
    model = MMoLRE(saved_model_config(config["model_config"]), {m: tuple(v) for m, v in config["shapes"].items()},
                   ep_size=1)
    missing = sorted(set(full_state_dict(model)) - set(state))   # the experts' keys too, which a strict load skips
    if missing:
        raise ValueError(f"{path}: {WEIGHTS} lacks {len(missing)} weight(s) of this model, e.g. {missing[:3]}")
    model.load_state_dict(state)
    encoder = config.get("text_encoder")
    if encoder:   # the tokenizer found under the recorded name must be the one the model was trained with
        from .data.tokens import TextTokens
        found = TextTokens(encoder["name"], encoder["max_length"]).key()
        if found != encoder["tokenizer_sha256_12"]:
            raise ValueError(f"{path}: the tokenizer at {encoder['name']!r} is not the one this model was trained "
                             f"with (hash {found}, config.json [key 'text_encoder'] says "
                             f"{encoder['tokenizer_sha256_12']})")
    return LoadedModel(model.eval(), config)
