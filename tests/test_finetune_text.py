"""`--text_encoder DIR --finetune_text`: transcripts tokenized once into the Arrow cache, a tiny Hugging Face
encoder trained end to end inside the DeepSpeed engine under 2 processes with expert parallelism 2, with
its own learning rate and warm-up; its checkpoints resume exactly and its export predicts like the trainer."""
import glob
import pickle
import re
import shutil

import pytest
import torch

from mmolre.cli import main as mmolre
from mmolre.config import ConfigError, DataConfig, parse_args
from mmolre.data import prepare
from mmolre.data.schema import DataError
from mmolre.data.tokens import TextTokens
from tests.tiny_encoder import WORDS, save_tiny_encoder

MAX_LENGTH = 8


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny_bert"))


def sentence(i: int) -> str:
    """1 to 9 words: with [CLS] and [SEP], every fourth is longer than MAX_LENGTH tokens."""
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 9))


def label_table(path, sizes=(("train", 32), ("dev", 8), ("test", 8))) -> str:
    rows = ["video_id,clip_id,text,label,annotation,mode"]
    i = 0
    for mode, n in sizes:
        for c in range(n):
            rows.append(f"{mode}v{c % 4},{c},{sentence(i)},{(i % 13) / 2 - 3},x,{mode}")
            i += 1
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def transcripts_pickle(tmp_path) -> str:
    out = str(tmp_path / "mosi_text.pkl")
    assert mmolre(["featurize", label_table(tmp_path / "label.csv"), out, "--transcripts_only"]) == 0
    return out


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
    from mmolre.schedule import Flags, WarmupCosineBySamples

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
    sched = WarmupCosineBySamples(opt, Flags(1, 0, 0.1, 100, 10, text_warmup_ratio=0.5))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["decay"] == pytest.approx(1e-3) and lrs["text_decay"] == pytest.approx(1e-5 * 10 / 50)
    for _ in range(4):
        sched.step()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["text_decay"] == pytest.approx(1e-5)          # the 5th step ends its warm-up
    assert sched.factor() < 1.0 and lrs["decay"] == pytest.approx(1e-3 * sched.factor())   # already decaying


# ---- 2 processes, expert parallelism 2, through the deepspeed launcher ------------------------------------

def finetune_args(data: str, encoder: str) -> list[str]:
    return ["--dataset", "mosi", "--data_path", data, "--text_encoder", encoder, "--finetune_text",
            "--text_max_length", str(MAX_LENGTH), "--ep_size", "2", "--batch_size", "4", "--epochs", "2",
            "--save_every", "2", "--keep_checkpoints", "10", "--text_lr", "1e-3", "--text_warmup_ratio", "0.5",
            "--log_every", "1"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_encoder):
    from tests.launcher import run_deepspeed
    tmp = tmp_path_factory.mktemp("finetune")
    data = transcripts_pickle(tmp)
    proc = run_deepspeed(tmp, "--run_name", "ft", *finetune_args(data, tiny_encoder))
    return tmp, data, tmp / "runs" / "ft", proc


def test_two_processes_train_the_encoder_end_to_end(finetuned, tiny_encoder):
    import transformers
    from tests.launcher import final_weights, results
    from tests.test_configurations import scalars
    _, _, run, proc = finetuned
    assert f"transcripts tokenized for {tiny_encoder} (at most {MAX_LENGTH} tokens" in proc.stdout
    r = results(run)
    assert r["world_size"] == 2 and r["ep_size"] == 2 and r["global_step"] == 2 * 4   # 32 / (4 x 2) per epoch
    # the text encoder's own peak LR and warm-up, as the engine applied them: 64 samples in steps of 8, its
    # warm-up half of them (4 steps), the model's 5 % (one step)
    lr, lr_text = dict(scalars(run, "train/lr")), dict(scalars(run, "train/lr_text"))
    assert lr[1] == lr[2] == pytest.approx(2e-3) and lr[3] < 2e-3
    assert [lr_text[s] for s in (1, 2, 3, 4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3]) and lr_text[6] < lr_text[5]
    _, state = final_weights(run)
    pretrained = transformers.AutoModel.from_pretrained(tiny_encoder).state_dict()
    ours = {k[len("text_backbone.model."):]: v for k, v in state.items() if k.startswith("text_backbone.model.")}
    assert set(ours) == {k for k in pretrained if not k.startswith("pooler.")}   # the unused pooler is left out
    for k in ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
              "encoder.layer.0.output.dense.weight"]:
        assert not torch.allclose(ours[k], pretrained[k]), k


def test_a_finetune_run_resumes_from_a_mid_run_checkpoint_bit_identically(finetuned, tiny_encoder):
    from tests.launcher import complete_tags, final_weights, results, run_deepspeed
    tmp, data, ref, _ = finetuned
    run = tmp / "runs" / "resumed"
    shutil.copytree(ref, run)
    tags = complete_tags(run)
    assert "step00000006" in tags
    for tag in tags[tags.index("step00000006") + 1:]:   # back to step 6, mid 2nd epoch, as if it had died there
        shutil.rmtree(run / "checkpoints" / tag)
    (run / "results.json").unlink()
    proc = run_deepspeed(tmp, "--run_name", "resumed", *finetune_args(data, tiny_encoder), "--resume")
    assert "resumed from" in proc.stdout and "step 6" in proc.stdout
    assert results(run)["test"] == results(ref)["test"] and results(run)["history"] == results(ref)["history"]
    (tag_a, a), (tag_b, b) = final_weights(ref), final_weights(run)
    assert tag_a == tag_b and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_export_then_predict_reads_the_transcripts_like_the_trainer(finetuned, tmp_path):
    import csv
    import subprocess
    import sys
    from tests.launcher import ROOT, environment
    tmp, data, run, _ = finetuned
    env = {**environment(tmp_path), "WORLD_SIZE": "", "RANK": ""}
    cli = [sys.executable, "-m", "mmolre.cli"]
    subprocess.run([*cli, "export", str(run), str(tmp_path / "model.pt")], cwd=ROOT, env=env, check=True)
    subprocess.run([*cli, "predict", str(tmp_path / "model.pt"), data, "--out", str(tmp_path / "pred.csv")],
                   cwd=ROOT, env=env, check=True)
    trainer = {r["id"]: r for r in csv.DictReader(open(run / "predictions_test.csv"))}
    exported = {r["id"]: r for r in csv.DictReader(open(tmp_path / "pred.csv"))}
    assert trainer.keys() == exported.keys() and len(trainer) == 8
    for sid, row in trainer.items():
        assert float(exported[sid]["sentiment_pred"]) == pytest.approx(float(row["sentiment_pred"]), abs=1e-4), sid
