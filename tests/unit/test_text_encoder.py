"""`--text_encoder DIR --finetune_text`: transcripts tokenized once into the Arrow cache, a tiny Hugging Face
encoder trained end to end inside the DeepSpeed engine under 2 processes with expert parallelism 2, with
its own learning rate and warm-up; its checkpoints resume exactly and its export predicts like the trainer."""
import glob
import pickle
import re

import pytest
import torch

from mmolre.config import ConfigError, DataConfig, parse_args
from mmolre.data import prepare
from mmolre.data.schema import DataError
from mmolre.data.tokens import TextTokens
from tests.tiny_encoder import MAX_LENGTH, save_tiny_encoder, transcripts_pickle


def test_transcripts_only_then_the_cache_holds_the_tokenizers_ids(tmp_path, tiny_encoder):
    import transformers
    source = transcripts_pickle(tmp_path)
    with open(source, "rb") as f:
        raw = pickle.load(f)
    assert "text" not in raw["train"] and len(raw["train"]["raw_text"]) == 32   # no encoder ran
    data = prepare(DataConfig(dataset="mosi", data_path=source, cache_dir=str(tmp_path / "cache")), builds=True,
                   barrier=lambda: None, text_tokens=TextTokens(tiny_encoder, MAX_LENGTH))
    assert data.shapes == {"text": (MAX_LENGTH, 12)}   # (tokens, the encoder's width)
    tok = transformers.AutoTokenizer.from_pretrained(tiny_encoder)
    test = data.splits["test"]
    batch = test.__getitems__(list(range(len(test))))
    texts = list(raw["test"]["raw_text"])
    expected = tok(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    assert batch.features["text"].dtype == torch.int64
    assert torch.equal(batch.features["text"], expected["input_ids"])
    assert torch.equal(batch.masks["text"], expected["attention_mask"].bool())
    meta = data.sources["mosi"]["text_tokens"]
    too_long = sum(len(tok(t)["input_ids"]) > MAX_LENGTH for t in texts)
    assert too_long > 0 and meta["truncated"]["test"] == too_long      # counted, and said in the log
    assert "text_ids" in test.hf.column_names and "text" not in test.hf.column_names


def test_the_tokenizer_is_part_of_the_cache_key_and_the_width_is_the_encoders(tmp_path, tiny_encoder):
    source = transcripts_pickle(tmp_path)
    (tmp_path / "wider").mkdir()
    wider = save_tiny_encoder(tmp_path / "wider", hidden_size=16)   # the same tokenizer, another width
    cfg = DataConfig(dataset="mosi", data_path=source, cache_dir=str(tmp_path / "cache"))
    a = prepare(cfg, builds=True, barrier=lambda: None, text_tokens=TextTokens(tiny_encoder, MAX_LENGTH))
    b = prepare(cfg, builds=True, barrier=lambda: None, text_tokens=TextTokens(tiny_encoder, MAX_LENGTH + 4))
    c = prepare(cfg, builds=True, barrier=lambda: None, text_tokens=TextTokens(wider, MAX_LENGTH))
    assert a.shapes["text"] == (MAX_LENGTH, 12) and b.shapes["text"] == (MAX_LENGTH + 4, 12)
    assert c.shapes["text"] == (MAX_LENGTH, 16)
    assert len(glob.glob(str(tmp_path / "cache" / "arrow" / "*-tok*"))) == 2   # a and c share their token ids
    with pytest.raises(DataError, match="--text_max_length 100 is longer than .* can encode \\(64 positions\\)"):
        prepare(cfg, builds=True, barrier=lambda: None, text_tokens=TextTokens(tiny_encoder, 100))


def test_a_tokenizer_saved_with_truncation_builds_and_finds_its_cache_in_one_run(tmp_path):
    """Tokenizing changes a tokenizer's truncation/padding state, which is part of its spec: the cache key
    must not move between building the cache and loading it (a first run failed with FileNotFoundError)."""
    source = transcripts_pickle(tmp_path)
    (tmp_path / "saved").mkdir()
    encoder = save_tiny_encoder(tmp_path / "saved", saved_truncation=True)
    tokens = TextTokens(encoder, MAX_LENGTH)
    key = tokens.key()
    data = prepare(DataConfig(dataset="mosi", data_path=source, cache_dir=str(tmp_path / "cache")), builds=True,
                   barrier=lambda: None, text_tokens=tokens)
    assert data.shapes["text"] == (MAX_LENGTH, 12) and tokens.key() == key


def test_a_missing_or_empty_transcript_is_refused_naming_file_split_key_and_sample(tmp_path, tiny_encoder):
    source = transcripts_pickle(tmp_path)
    with open(source, "rb") as f:
        raw = pickle.load(f)
    raw["valid"]["raw_text"][3] = "  "
    with open(tmp_path / "empty.pkl", "wb") as f:
        pickle.dump(raw, f)
    raw["valid"]["raw_text"][3] = "good"
    del raw["test"]["raw_text"]
    with open(tmp_path / "none.pkl", "wb") as f:
        pickle.dump(raw, f)
    tokens = TextTokens(tiny_encoder, MAX_LENGTH)
    sample = raw["valid"]["id"][3]
    with pytest.raises(DataError, match=re.escape(f"empty.pkl [split 'valid', key 'raw_text', sample '{sample}']: empty")):
        prepare(DataConfig(dataset="mosi", data_path=str(tmp_path / "empty.pkl"), cache_dir=str(tmp_path / "c")),
                builds=True, barrier=lambda: None, text_tokens=tokens)
    with pytest.raises(DataError, match=r"none.pkl \[split 'test', key 'raw_text'\]: missing.*--transcripts_only"):
        prepare(DataConfig(dataset="mosi", data_path=str(tmp_path / "none.pkl"), cache_dir=str(tmp_path / "c")),
                builds=True, barrier=lambda: None, text_tokens=tokens)


def test_the_flags_go_together():
    with pytest.raises(ConfigError, match="go together"):
        parse_args(["--text_encoder", "somewhere"])
    with pytest.raises(ConfigError, match="go together"):
        parse_args(["--finetune_text"])
    with pytest.raises(ConfigError, match="leaves out the text"):
        parse_args(["--text_encoder", "x", "--finetune_text", "--modalities", "audio"])
    with pytest.raises(ConfigError, match="synthetic dataset has no transcripts"):
        parse_args(["--text_encoder", "x", "--finetune_text"])


def test_the_text_encoder_has_its_own_groups_learning_rate_and_warm_up():
    from mmolre.engine import optimizer_groups
    from mmolre.lr_schedule import SchedulePlan, WarmupCosineBySamples

    model = torch.nn.Module()
    model.head = torch.nn.Linear(4, 4)
    model.text_backbone = torch.nn.Module()
    model.text_backbone.model = torch.nn.Linear(4, 4)
    groups = optimizer_groups(model, 0.01, lr=1e-3, text_lr=1e-5)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay", "text_decay", "text_no_decay"}
    assert by_name["text_decay"]["params"] == [model.text_backbone.model.weight]
    assert by_name["text_no_decay"]["params"] == [model.text_backbone.model.bias]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    # 100 samples in steps of 10: 10 warm-up samples for the model, 50 for the text encoder
    sched = WarmupCosineBySamples(opt, SchedulePlan(1, 0, 0.1, 100, 10, text_warmup_ratio=0.5))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["decay"] == pytest.approx(1e-3) and lrs["text_decay"] == pytest.approx(1e-5 * 10 / 50)
    for _ in range(4):
        sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["text_decay"] == pytest.approx(1e-5)          # the 5th step ends its warm-up
    assert sched.factor() < 1.0 and lrs["decay"] == pytest.approx(1e-3 * sched.factor())   # already decaying


def test_the_text_encoders_cosine_starts_at_the_end_of_its_own_warm_up_as_documented():
    """The docs once said the encoder's groups follow "the same cosine" as the model after their warm-up; they
    follow one of their own, from the end of their warm-up to the same end. Code and docs say the same."""
    import math
    import os

    from mmolre.config import TrainConfig, build_parser
    from mmolre.lr_schedule import FLOOR, SchedulePlan, WarmupCosineBySamples
    groups = [{"name": "decay", "params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-3},
              {"name": "text_decay", "params": [torch.nn.Parameter(torch.zeros(1))], "lr": 1e-5}]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = WarmupCosineBySamples(opt, SchedulePlan(1, 0, 0.1, 100, 10, text_warmup_ratio=0.5))
    for _ in range(6):
        sched.step()                     # the 7th step trains samples 60-70; warm-ups end at 10 and 50
    own = FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * (60 - 50) / (100 - 50)))
    model = FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * (60 - 10) / (100 - 10)))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["text_decay"] == pytest.approx(1e-5 * own) and lrs["decay"] == pytest.approx(1e-3 * model)
    assert abs(own - model) > 0.1      # not the model's cosine
    for _ in range(3):
        sched.step()
    at_90 = FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * (90 - 50) / (100 - 50)))   # samples 90-100
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-5 * at_90)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    help_text = next(a.help for a in build_parser()._actions if a.dest == "text_warmup_ratio")
    with open(os.path.join(root, "docs", "flags.md")) as f:
        row = next(line for line in f if line.startswith("| `--text_warmup_ratio` |"))
    with open(os.path.join(root, "docs", "data.md")) as f:
        data_page = f.read()
    for text in (help_text, row, data_page):
        assert "same cosine" not in text and "its own cosine" in text.replace("a cosine of its own", "its own cosine")
    assert TrainConfig().text_warmup_ratio == 0.1


# ---- 2 processes, expert parallelism 2, through the deepspeed launcher ------------------------------------
