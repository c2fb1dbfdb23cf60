import json
import os
import pickle
import re

import numpy as np
import pytest
import torch

from mmolre.config import EMOTIONS
from mmolre.data.cache import build_cache, load_cache
from mmolre.data.loader import SplitDataset, eval_batches, train_loader
from mmolre.data.schema import DataError, check_dataset
from mmolre.data.synthetic import FEATURE_DIMS, SEQ_LEN, generate, split_sizes

SCALE = 0.01


@pytest.fixture(scope="module")
def synthetic():
    return generate(SCALE)


def test_synthetic_follows_the_mmsa_schema(synthetic):
    assert synthetic["config"]["synthetic"] is True
    sizes = split_sizes(SCALE)
    for split, n in sizes.items():
        d = synthetic[split]
        for m, dim in FEATURE_DIMS.items():
            assert d[m].shape == (n, SEQ_LEN, dim) and d[m].dtype == np.float32
        assert d["regression_labels"].shape == (n,)
        assert d["emotion_labels"].shape == (n, len(EMOTIONS))
        assert all(re.fullmatch(r"synth\w+\$_\$\d+", i) for i in d["id"])
        labels = d["regression_labels"]
        assert labels.min() >= -3 and labels.max() <= 3
        np.testing.assert_allclose(labels * 3, np.round(labels * 3), atol=1e-5)   # three raters' 1/3 grid
        assert (labels == 0).any(), "zero labels make Has0 and Non0 differ"
        assert d["emotion_labels"].min() >= 0 and d["emotion_labels"].max() <= 3
    assert np.isneginf(synthetic["train"]["audio"]).any(), "MMSA audio carries -inf"
    videos = {s: {i.split("$_$")[0] for i in synthetic[s]["id"]} for s in sizes}
    assert not (videos["train"] & videos["test"]) and not (videos["train"] & videos["valid"])
    # the proportions of MOSEI's 16326 / 1871 / 4659
    assert sizes["train"] > sizes["test"] > sizes["valid"]


def test_synthetic_is_deterministic(synthetic):
    again = generate(SCALE)
    assert pickle.dumps(again) == pickle.dumps(synthetic)
    assert not np.array_equal(generate(SCALE, seed=1)["train"]["text"], synthetic["train"]["text"])


def test_synthetic_signal_is_planted_strongest_in_text():
    """A linear fit on time-averaged features, trained on train and scored on test, per modality."""
    data = generate(0.05)

    def design(split, m):
        x = np.nan_to_num(data[split][m], neginf=0.0).mean(1)
        return np.c_[x, np.ones(len(x))]

    corr = {}
    for m in FEATURE_DIMS:
        coef, *_ = np.linalg.lstsq(design("train", m), data["train"]["regression_labels"], rcond=None)
        corr[m] = np.corrcoef(design("test", m) @ coef, data["test"]["regression_labels"])[0, 1]
    assert corr["text"] > corr["audio"] > 0.2 and corr["text"] > corr["vision"] > 0.2, corr


def _write(tmp_path, data, name="d.pkl"):
    path = tmp_path / name
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return str(path)


def test_cache_is_built_once_and_reports_replaced_values(tmp_path, synthetic):
    src = _write(tmp_path, synthetic)
    target = build_cache(src, str(tmp_path / "cache"))
    stamp = os.path.getmtime(os.path.join(target, "meta.json"))
    assert build_cache(src, str(tmp_path / "cache")) == target
    assert os.path.getmtime(os.path.join(target, "meta.json")) == stamp
    hf, meta = load_cache(target)
    assert meta["splits"]["train"]["nonfinite_replaced"]["audio"] == int(np.isneginf(synthetic["train"]["audio"]).sum())
    assert meta["shapes"]["text"] == [SEQ_LEN, FEATURE_DIMS["text"]]
    assert len(hf["test"]) == len(synthetic["test"]["id"])
    # memory-mapped Arrow files, not an in-memory copy
    assert all(f["filename"].endswith(".arrow") for f in hf["train"].cache_files)
    json.dumps(meta)


def test_eval_batches_cover_every_sample_once_with_equal_batches_per_rank(tmp_path, synthetic):
    hf, meta = load_cache(build_cache(_write(tmp_path, synthetic), str(tmp_path / "cache")))
    ds = SplitDataset(hf["valid"], ["text", "audio"], meta["normalisation"])
    world, bs = 3, 4
    per_rank = [list(eval_batches(ds, bs, r, world)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1
    ids = [i for batches in per_rank for b in batches for i, v in zip(b.ids, b.valid) if v]
    assert sorted(ids) == sorted(synthetic["valid"]["id"])
    for batches in per_rank:
        for b in batches:
            assert b.features["text"].shape == (bs, SEQ_LEN, FEATURE_DIMS["text"])
            assert not b.valid.all() or len(b.ids) == bs
            assert np.isfinite(b.features["audio"].numpy()).all()
    loader = train_loader(SplitDataset(hf["train"], ["text"], meta["normalisation"]), bs, 0, 2, seed=0)
    assert all(b.valid.all() and len(b.ids) == bs for b in loader)


def _tiny():
    d = generate(0.002)
    return {s: d[s] for s in ("train", "valid", "test")}


@pytest.mark.parametrize("break_it, message", [
    (lambda d: d["train"].pop("audio"), r"split 'train', key 'audio'\]: missing"),
    (lambda d: d["valid"]["regression_labels"].__setitem__(1, 3.5), r"split 'valid', key 'regression_labels', sample"),
    (lambda d: d["test"]["id"].__setitem__(1, d["test"]["id"][0]), r"key 'id', sample '.*'\]: duplicate id"),
    (lambda d: d["train"]["emotion_labels"].__setitem__((0, 2), 4.0), r"key 'emotion_labels', sample"),
    (lambda d: d.pop("valid"), r"missing split\(s\) \['valid'\]"),
    (lambda d: d["train"].__setitem__("text", d["train"]["text"][:-1]), r"key 'text'\]: \d+ samples but 'id' has"),
])
def test_bad_input_names_file_split_key_and_sample(tmp_path, break_it, message):
    data = _tiny()
    break_it(data)
    with pytest.raises(DataError, match=message):
        check_dataset("bad.pkl", data, ["text", "audio", "vision"])


def test_the_source_hash_is_remembered_and_a_changed_file_gets_a_new_cache(tmp_path, synthetic, monkeypatch):
    from mmolre.data import cache
    src = _write(tmp_path, synthetic)
    target = build_cache(src, str(tmp_path / "cache"))

    def no_rehash(path):
        raise AssertionError(f"{path} hashed again")
    monkeypatch.setattr(cache, "file_sha256", no_rehash)
    assert cache.cache_path_for(src, str(tmp_path / "cache")) == target   # other ranks read the memo
    monkeypatch.undo()
    changed = {s: dict(d) for s, d in synthetic.items()}
    changed["train"]["regression_labels"] = np.clip(changed["train"]["regression_labels"] + 1 / 3, -3, 3)
    _write(tmp_path, changed)
    os.utime(src, ns=(1, 1))   # even with an old mtime: the size or mtime differs from the memo's
    assert build_cache(src, str(tmp_path / "cache")) != target


def test_batches_read_from_the_arrow_buffers_equal_those_datasets_formats(tmp_path, synthetic, monkeypatch):
    """The loader's features come from numpy views onto the Arrow buffers (FeatureRows); they must equal what
    `datasets`' own numpy formatting gives, for a memory-mapped cache, two caches concatenated (a mixed run),
    an in-memory split, and batches padded with dummy rows."""
    import datasets
    from mmolre.data import loader
    from mmolre.data.cache import in_memory_split
    hf, meta = load_cache(build_cache(_write(tmp_path, synthetic), str(tmp_path / "cache")))
    other = {s: {k: v for k, v in d.items()} for s, d in generate(SCALE, seed=5).items()}
    hf2, _ = load_cache(build_cache(_write(tmp_path, other, "e.pkl"), str(tmp_path / "cache")))
    mods = ["text", "audio", "vision"]
    test = synthetic["test"]
    splits = {"cache": hf["train"], "concatenated": datasets.concatenate_datasets([hf["train"], hf2["train"]]),
              "in memory": in_memory_split({m: test[m] for m in mods}, mods)}
    rng = np.random.default_rng(0)
    for name, split in splits.items():
        fast = SplitDataset(split, mods, meta["normalisation"])
        assert set(fast.feature_rows) == set(mods), name          # the views were taken, not the fallback
        with monkeypatch.context() as m:
            m.setattr(loader.FeatureRows, "of", classmethod(lambda cls, *a: None))
            slow = SplitDataset(split, mods, meta["normalisation"])
        assert not slow.feature_rows
        for _ in range(5):
            idx = rng.choice(len(split), 7, replace=False).tolist() + [loader.DUMMY]
            a, b = fast.__getitems__(idx), slow.__getitems__(idx)
            assert a.ids == b.ids and torch.equal(a.sentiment, b.sentiment) and torch.equal(a.valid, b.valid)
            for m in mods:
                assert torch.equal(a.features[m], b.features[m]) and torch.equal(a.masks[m], b.masks[m]), (name, m)


def test_an_evaluation_batch_size_changes_no_prediction(tmp_path, synthetic):
    """--eval_batch_size only regroups the forwards: without an evaluation capacity, every prediction and route is
    the same in batches of 3 (padded) as in one batch of the whole split."""
    from mmolre.config import ModelConfig
    from mmolre.evaluate import predict_batches
    from mmolre.model import MMoLRE
    hf, meta = load_cache(build_cache(_write(tmp_path, synthetic), str(tmp_path / "cache")))
    ds = SplitDataset(hf["valid"], ["text", "audio"], meta["normalisation"])
    torch.manual_seed(0)
    model = MMoLRE(ModelConfig(d_model=16, num_experts=8, expert_rank=4),
                   {m: (SEQ_LEN, FEATURE_DIMS[m]) for m in ("text", "audio")}).eval()
    forward = lambda b: model(b.features, b.masks, b.valid)   # noqa: E731
    small, whole = (predict_batches(forward, eval_batches(ds, size, 0, 1)) for size in (3, len(ds)))
    assert len(ds) % 3 and small["ids"] == whole["ids"] == list(synthetic["valid"]["id"])
    np.testing.assert_allclose(small["sentiment_pred"], whole["sentiment_pred"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(small["emotion_prob"], whole["emotion_prob"], rtol=1e-5, atol=1e-6)
    assert np.array_equal(small["routes"], whole["routes"])
