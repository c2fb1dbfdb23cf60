"""A pretrained Hugging Face text encoder inside the model (`--finetune_text`): token ids -> hidden states.

It is an ordinary dense module of the MMoLRE model, so the DeepSpeed engine trains it with everything
else: its gradients are all-reduced over the data-parallel ranks, ZeRO partitions its optimizer state, and
its weights are in every checkpoint. Its parameters get their own learning rate and warm-up
(engine.optimizer_groups). Every rank loads the same pretrained weights, and DeepSpeed broadcasts rank 0's.
Its dropout is its own configuration's (hidden and attention dropout), not --dropout.
"""
from __future__ import annotations

import os

import torch
from torch import nn

PREFIX = "text_backbone."   # the module's name in MMoLRE: its parameters' names start with this


class PretrainedTextEncoder(nn.Module):
    def __init__(self, name_or_dir: str):
        super().__init__()
        try:
            from transformers import AutoModel
        except ImportError:
            raise ImportError("--text_encoder needs transformers: pip install 'mmolre[featurize]'") from None
        from transformers.utils import logging as hf_logging
        local = os.path.isdir(name_or_dir)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()   # not a load report per rank listing the pooler weights left out
        try:
            try:   # BERT-style encoders: without the pooler, which no output here uses (it would only decay)
                self.model = AutoModel.from_pretrained(name_or_dir, local_files_only=local, add_pooling_layer=False)
            except TypeError:   # an architecture without that option
                self.model = AutoModel.from_pretrained(name_or_dir, local_files_only=local)
        except (OSError, ValueError) as e:
            hint = "" if local else "; offline, pass a local model directory"
            raise ValueError(f"--text_encoder {name_or_dir!r}: could not load the model ({e}){hint}") from e
        finally:
            hf_logging.set_verbosity(verbosity)
        # fp32 like the rest of the model, whatever dtype it was saved in (the engine casts it for bf16), and in
        # training mode: from_pretrained returns it in eval mode, which would switch its dropout off until the
        # first evaluation puts the engine back in training mode
        self.model.float().train()
        self.hidden_size = int(self.model.config.hidden_size)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask: [B, T] -> last hidden states [B, T, hidden] (the model's dtype)."""
        return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state


def is_text_encoder_param(name: str) -> bool:
    return name.startswith(PREFIX)
