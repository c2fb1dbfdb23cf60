"""Real-data formats with their quirks, written by the tests themselves: MMSA aligned/unaligned pickles
(-inf audio, bytes ids, lengths), SDK-style HDF5 label files, label tables, the featurizer with a tiny
random encoder, `mmolre data inspect|verify`, dataset mixing, and every malformed case named precisely."""
import json
import os
import re
import pickle

import numpy as np
import pytest

from mmolre.cli import main as mmolre
from mmolre.config import EMOTIONS
from mmolre.data.cache import build_cache
from mmolre.data.emotions import read_emotion_labels
from mmolre.data.schema import DataError, check_dataset
from tests.mmsa_files import SIZES, csd, dump, mmsa, prepared, sdk_labels_for
from tests.tiny_encoder import WORDS


def test_unaligned_mmsa_directory_with_bytes_ids_and_lengths(tmp_path):
    raw = mmsa(aligned=False, bytes_ids=True)
    os.makedirs(tmp_path / "MOSI" / "Processed")
    dump(tmp_path / "MOSI" / "Processed" / "unaligned_50.pkl", raw)
    data = prepared(tmp_path, dataset="mosi", data_path=str(tmp_path / "MOSI"), alignment="unaligned")
    assert data.modalities == ["text", "audio", "vision"]
    # dims and lengths come from the file, not from constants
    assert data.shapes == {"text": (8, 16), "audio": (15, 5), "vision": (20, 20)}
    meta = data.sources["mosi"]
    assert meta["splits"]["train"]["nonfinite_replaced"] == {"audio": 2}
    batch = data.splits["train"].__getitems__(list(range(SIZES["train"])))
    assert batch.ids[0] == "vidtrain0$_$0" and isinstance(batch.ids[0], str)
    np.testing.assert_array_equal(batch.masks["audio"].sum(1).numpy(), raw["train"]["audio_lengths"])
    np.testing.assert_array_equal(batch.masks["vision"].sum(1).numpy(), raw["train"]["vision_lengths"])
    # text: MMSA's attention mask text_bert[:, 1] (the pickle has no text_lengths)
    np.testing.assert_array_equal(batch.masks["text"].numpy(), raw["train"]["text_bert"][:, 1].astype(bool))
    assert not batch.has_emotion.any()
    np.testing.assert_allclose(batch.sentiment.numpy(), raw["train"]["regression_labels"], atol=1e-6)
    # the aligned file is the default pick inside a directory
    with pytest.raises(DataError, match=r"no aligned_50.pkl in it or in its Processed/.*unaligned_50.pkl"):
        prepared(tmp_path, dataset="mosi", data_path=str(tmp_path / "MOSI" / "Processed"))


def test_mosei_emotions_join_from_an_sdk_csd_in_the_sdk_order(tmp_path):
    raw = mmsa()
    skip = str(raw["test"]["id"][-1])    # the last clip of a video: the others keep their positions
    labels = csd(tmp_path / "CMU_MOSEI_Labels.csd", sdk_labels_for(raw, skip=skip))
    data = prepared(tmp_path, dataset="mosei", data_path=dump(tmp_path / "mosei.pkl", raw), emotion_labels=labels)
    join = data.sources["mosei"]["emotion_labels"]
    assert join["matched"] == {"train": 12, "valid": 4, "test": 5}
    assert join["unmatched"] == {"train": [], "valid": [], "test": [skip]}
    assert skip in join["summary"]
    test = data.splits["test"].__getitems__(list(range(SIZES["test"])))
    assert test.has_emotion.tolist() == [True] * 5 + [False]
    clip = int(test.ids[0].split("$_$")[1])
    # column 1 of the CSD is happy, 6 is fear: the order is kept, not alphabetised
    np.testing.assert_allclose(test.emotions[0].numpy(), np.arange(6) / 2 + clip / 10, atol=1e-6)
    assert EMOTIONS == ("happy", "sad", "anger", "surprise", "disgust", "fear")


def test_emotion_join_from_a_label_table_and_a_wrong_clip_numbering_is_caught(tmp_path):
    raw = mmsa()
    path = dump(tmp_path / "mosei.pkl", raw)

    def table(name, shift):
        lines = ["video_id,clip_index,sentiment," + ",".join(EMOTIONS)]
        for split in raw:
            for sid, y in zip(raw[split]["id"], raw[split]["regression_labels"]):
                video, clip = str(sid).split("$_$")
                lines.append(f"{video},{int(clip) + shift},{y}," + ",".join(str(0.5 + i / 10) for i in range(6)))
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        return str(tmp_path / name)

    data = prepared(tmp_path, dataset="mosei", data_path=path, emotion_labels=table("labels.csv", 0))
    assert data.sources["mosei"]["splits"]["train"]["with_emotions"] == 12
    batch = data.splits["valid"].__getitems__([0])
    np.testing.assert_allclose(batch.emotions[0].numpy(), 0.5 + np.arange(6) / 10, atol=1e-6)
    # 1-based clips against a 0-based pickle: the sentiments disagree and the join refuses
    with pytest.raises(DataError, match="clip numbering of the two files does not agree"):
        build_cache(path, str(tmp_path / "cache2"), emotion_labels=table("shifted.csv", 1))


def test_an_emotion_join_that_is_partly_wrong_is_refused_naming_the_clips(tmp_path):
    """3 of 22 clips (14 %) carry another clip's labels: far below the old "more than half" rule, and enough
    to train on wrong emotions. Refused with the ids; accepted only when the fraction is stated; a cache
    joined under a higher tolerance does not satisfy a lower one."""
    raw = mmsa()
    path = dump(tmp_path / "mosei.pkl", raw)
    lines, wrong = ["video_id,clip_index,sentiment," + ",".join(EMOTIONS)], []
    for split in raw:
        for n, (sid, y) in enumerate(zip(raw[split]["id"], raw[split]["regression_labels"])):
            video, clip = str(sid).split("$_$")
            if split == "train" and n < 3:   # these rows hold a different clip's sentiment (and emotions)
                y, wrong = y + 1.0, wrong + [str(sid)]
            lines.append(f"{video},{clip},{y}," + ",".join(["1"] * 6))
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    labels = str(tmp_path / "labels.csv")
    with pytest.raises(DataError, match=r"3 of 22 samples \(13.6%\).*tolerated 1.0%") as err:
        build_cache(path, str(tmp_path / "cache"), emotion_labels=labels)
    assert all(w in str(err.value) for w in wrong) and "--emotion_join_tolerance 0.137" in str(err.value)
    # the value the message suggests is accepted (rounded up: 3/22 = 0.13636...)
    target = build_cache(path, str(tmp_path / "cache"), emotion_labels=labels, join_tolerance=0.137)
    with open(os.path.join(target, "meta.json")) as f:
        join = json.load(f)["emotion_labels"]
    assert join["sentiment_mismatches"] == 3 and join["compared"] == 22 and len(join["disagreeing"]) == 3
    with pytest.raises(DataError, match="3 of 22 samples"):   # the same cache, the default tolerance
        build_cache(path, str(tmp_path / "cache"), emotion_labels=labels)


@pytest.mark.parametrize("aligned", [True, False])
def test_the_masks_are_mmsas_text_attention_mask(tmp_path, aligned):
    """MMSA pickles carry no text_lengths: the text's valid steps are text_bert[:, 1]; in an aligned file audio
    and vision follow the same mask, in an unaligned one their own lengths. Normalisation counts valid steps
    only, and the batch masks equal the mask of the file."""
    raw = mmsa(aligned=aligned)
    data = prepared(tmp_path, dataset="mmsa", data_path=dump(tmp_path / "m.pkl", raw))
    meta = data.sources["mmsa"]
    assert meta["splits"]["train"]["lengths_from"]["text"].startswith("text_bert[:, 1]")
    test = data.splits["test"].__getitems__(list(range(SIZES["test"])))
    mask = raw["test"]["text_bert"][:, 1].astype(bool)
    np.testing.assert_array_equal(test.masks["text"].numpy(), mask)
    for m in ("audio", "vision"):
        expected = mask if aligned else np.arange(raw["test"][m].shape[1]) < raw["test"][f"{m}_lengths"][:, None]
        np.testing.assert_array_equal(test.masks[m].numpy(), expected)
    train = raw["train"]
    valid = train["text_bert"][:, 1].astype(bool)
    np.testing.assert_allclose(meta["normalisation"]["text"]["mean"], train["text"][valid].mean(0), atol=1e-5)
    assert meta["normalisation"]["text"]["count"] == valid.sum() < train["text"].shape[0] * train["text"].shape[1]


def test_aligned_features_that_are_not_zero_padded_keep_every_step_and_say_so(tmp_path):
    """Same steps as the text is not proof of alignment: without zero padding past the tokens the text's mask
    is not applied to audio and vision (nothing is masked that might be signal), and the record says why."""
    raw = mmsa()
    raw["train"]["audio"] += 1.0
    data = prepared(tmp_path, dataset="mmsa", data_path=dump(tmp_path / "m.pkl", raw))
    how = data.sources["mmsa"]["splits"]["train"]["lengths_from"]
    assert how["audio"].startswith("none: every step counts") and "not zero padding" in how["audio"]
    assert how["vision"].startswith("text_bert[:, 1]")
    batch = data.splits["train"].__getitems__(list(range(SIZES["train"])))
    assert batch.masks["audio"].all() and not batch.masks["vision"].all()


def test_a_text_mask_with_holes_is_refused_naming_the_sample(tmp_path):
    raw = mmsa()
    raw["valid"]["text_bert"][1, 1] = 0
    raw["valid"]["text_bert"][1, 1, 0] = raw["valid"]["text_bert"][1, 1, 2] = 1   # 1 0 1 0 ...
    sid = str(raw["valid"]["id"][1])
    with pytest.raises(DataError, match=rf"split 'valid', key 'text_bert', sample '{re.escape(sid)}'.*1s for the "
                                        "first tokens then 0s"):
        prepared(tmp_path, dataset="mmsa", data_path=dump(tmp_path / "m.pkl", raw))


def test_clip_ids_match_as_integers_or_as_written(tmp_path):
    raw = mmsa()
    raw["train"]["id"] = np.array([f"v{i}$_${i}{'_5' if i % 2 else ''}" for i in range(12)], dtype=object)
    lines = ["video_id,clip_id,label," + ",".join(EMOTIONS)]
    for i, y in enumerate(raw["train"]["regression_labels"]):
        clip = f"{i}_5" if i % 2 else f"0{i}"      # '82_7645'-style clip ids, and zero-padded numbers
        lines.append(f"v{i},{clip},{y}," + ",".join(["1"] * 6))
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    path = build_cache(dump(tmp_path / "p.pkl", raw), str(tmp_path / "cache"), emotion_labels=str(tmp_path / "t.csv"))
    with open(os.path.join(path, "meta.json")) as f:
        assert json.load(f)["emotion_labels"]["matched"] == {"train": 12, "valid": 0, "test": 0}


@pytest.mark.parametrize("content, message", [
    ("video_id,clip_index,happy\nv,0,1\n", r"missing column\(s\) \['sad', 'anger'"),
    ("video_id,clip_index," + ",".join(EMOTIONS) + "\nv,0,1,1,1,1,1,3.5\n",
     r"line 2, sample 'v, clip 0'.*outside \[0, 3\]"),
    ("video_id,clip_index," + ",".join(EMOTIONS) + "\nv,0,1,1,1,1,1,1\nv,0,1,1,1,1,1,1\n", r"line 3.*duplicate"),
])
def test_bad_label_tables_name_file_line_and_sample(tmp_path, content, message):
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        read_emotion_labels(str(tmp_path / "t.csv"))


def test_bad_sdk_file_names_the_video(tmp_path):
    path = csd(tmp_path / "bad.csd", {"vidA": np.ones((2, 5))})
    with pytest.raises(DataError, match=r"All Labels/data/vidA/features\]: expected \[segments, 7\]"):
        read_emotion_labels(path)


def test_a_text_only_dataset_trains_on_what_it_has_and_modalities_name_the_missing(tmp_path):
    raw = mmsa()
    for split in raw.values():
        del split["audio"], split["vision"]
    path = dump(tmp_path / "text_only.pkl", raw)
    data = prepared(tmp_path, dataset="mmsa", data_path=path)
    assert data.modalities == ["text"] and list(data.shapes) == ["text"]
    with pytest.raises(DataError, match=r"asks for 'audio', which mmsa lack\(s\).*has \['text'\]"):
        prepared(tmp_path, dataset="mmsa", data_path=path, modalities="text,audio")
    full = dump(tmp_path / "full.pkl", mmsa())
    assert prepared(tmp_path, dataset="mmsa", data_path=full, modalities="vision,text").modalities == ["text", "vision"]


def test_mixing_datasets_masks_emotions_prefixes_ids_and_pools_normalisation(tmp_path):
    mosi = mmsa(seed=1)
    mosei = mmsa(seed=2, emotions=True)
    data = prepared(tmp_path, dataset="mosi+mosei",
                    data_path=f"{dump(tmp_path / 'a.pkl', mosi)},{dump(tmp_path / 'b.pkl', mosei)}")
    assert data.names == ["mosi", "mosei"]
    train = data.splits["train"]
    assert len(train) == 24
    batch = train.__getitems__(list(range(24)))
    assert all(i.startswith("mosi/") for i in batch.ids[:12])
    assert all(i.startswith("mosei/") for i in batch.ids[12:])
    assert batch.has_emotion.tolist() == [False] * 12 + [True] * 12
    # one normalisation over both train splits (valid time steps only: text_bert's mask), -inf counted as 0
    text = np.concatenate([d["train"]["text"][d["train"]["text_bert"][:, 1].astype(bool)] for d in (mosi, mosei)])
    np.testing.assert_allclose(data.normalisation["text"]["mean"], text.mean(0), atol=1e-5)
    np.testing.assert_allclose(data.normalisation["text"]["std"], text.std(0), atol=1e-5)
    # a modality whose shape differs between the datasets cannot be mixed; --modalities can leave it out
    other = mmsa(seed=3, aligned=False)
    with pytest.raises(DataError, match=r"modality 'audio' has a different \[time, features\] shape per dataset"):
        prepared(tmp_path, dataset="mosi+mosei", data_path=f"{tmp_path / 'a.pkl'},{dump(tmp_path / 'c.pkl', other)}")
    mixed = prepared(tmp_path, dataset="mosi+mosei", modalities="text",
                     data_path=f"{tmp_path / 'a.pkl'},{tmp_path / 'c.pkl'}")
    assert mixed.modalities == ["text"]
    with pytest.raises(DataError, match=r"2 dataset\(s\) need a path"):
        prepared(tmp_path, dataset="mosi+mosei", data_path=str(tmp_path / "a.pkl"))


def _malformed():
    def wrong_rank(d):
        d["train"]["vision"] = d["train"]["vision"][:, 0]

    def dims_differ(d):
        d["test"]["audio"] = d["test"]["audio"][:, :, :3]

    def empty(d):
        d["valid"] = {k: v[:0] for k, v in d["valid"].items()}

    def lengths(d):
        d["train"]["audio_lengths"] = d["train"]["audio_lengths"].copy()
        d["train"]["audio_lengths"][2] = 99

    def partial_nan(d):
        d["train"]["emotion_labels"][3, 1] = np.nan

    def wide_labels(d):
        d["test"]["regression_labels"] = np.c_[d["test"]["regression_labels"], d["test"]["regression_labels"]]

    return [
        (lambda d: d.pop("test"), r"bad.pkl: missing split\(s\) \['test'\]"),
        (lambda d: d["valid"].pop("regression_labels"),
         r"bad.pkl \[split 'valid', key 'regression_labels'\]: missing"),
        (lambda d: d["train"].__setitem__("id", d["train"]["id"][:-1]),
         r"\[split 'train', key 'regression_labels'\]: 12 samples but 'id' has 11"),
        (wrong_rank, r"\[split 'train', key 'vision'\]: expected \[samples, time, features\]"),
        (dims_differ, r"\[key 'audio'\]: \[time, features\] differ across splits"),
        (lambda d: d["test"]["regression_labels"].__setitem__(2, -3.2),
         r"\[split 'test', key 'regression_labels', sample 'vidtest2\$_\$0'\]: sentiment -3.2"),
        (lambda d: d["valid"]["emotion_labels"].__setitem__((1, 0), -0.5),
         r"\[split 'valid', key 'emotion_labels', sample 'vidvalid1\$_\$0'\]"),
        (lambda d: d["train"]["id"].__setitem__(4, b"vidtrain0$_$0"),
         r"\[split 'train', key 'id', sample 'vidtrain0\$_\$0'\]: duplicate id \(rows 0 and 4\)"),
        (empty, r"\[split 'valid', key 'id'\]: the split is empty"),
        (lengths, r"\[split 'train', key 'audio_lengths', sample 'vidtrain2\$_\$0'\]: length 99 outside \[1, 15\]"),
        (partial_nan, r"\[split 'train', key 'emotion_labels', sample 'vidtrain0\$_\$1'\]: some but not all"),
        (wide_labels, r"\[split 'test', key 'regression_labels'\]: expected one sentiment per sample"),
    ]


@pytest.mark.parametrize("break_it, message", _malformed())
def test_every_malformed_case_names_file_split_key_and_sample(tmp_path, break_it, message):
    raw = mmsa(aligned=False, bytes_ids=True, emotions=True)
    break_it(raw)
    path = dump(tmp_path / "bad.pkl", raw)
    with pytest.raises(DataError, match=message):
        build_cache(path, str(tmp_path / "cache"))
    assert not os.path.exists(tmp_path / "cache" / "arrow") or not os.listdir(tmp_path / "cache" / "arrow")


def test_data_inspect_and_verify(tmp_path, capsys, monkeypatch):
    raw = mmsa(emotions=True)
    path = dump(tmp_path / "aligned_50.pkl", raw)
    assert mmolre(["data", "inspect", path]) == 0
    out = capsys.readouterr().out
    assert "train: 12 samples" in out and "test: 6 samples" in out
    tokens = raw["train"]["text_bert"][:, 1].sum(1)   # the valid-length distribution training will use
    assert f"valid text steps (text_bert[:, 1]): min {tokens.min()}," in out
    assert f"valid audio steps (text_bert[:, 1]): min {tokens.min()}," in out and f"max {tokens.max()} of 8" in out
    assert "audio" in out and "(12, 8, 5)" in out and "-inf 2" in out
    assert "emotions: 12 labelled" in out and "sentiment: mean" in out
    assert mmolre(["data", "verify", path]) == 1
    assert "matches none of the files MMSA publishes" in capsys.readouterr().err
    from mmolre.data import inspect as inspect_module
    from mmolre.data.cache import file_sha256
    monkeypatch.setitem(inspect_module.MMSA_SHA256, file_sha256(path), "MOSI/Processed/aligned_50.pkl")
    assert mmolre(["data", "verify", path]) == 0
    assert "is MMSA's MOSI/Processed/aligned_50.pkl" in capsys.readouterr().out
    # the published MOSEI hashes are the README's
    assert inspect_module.MMSA_SHA256["45eccfb748a87c80ecab9bfac29582e7b1466bf6605ff29d3b338a75120bf791"] == \
        "MOSEI/Processed/aligned_50.pkl"


# ---- the featurizer, with a tiny randomly initialised encoder (no download) -------------------------

def mosi_table(path, missing_text=False):
    rows = ["video_id,clip_id,text,label,annotation,mode"]
    for v, mode in (("trA", "train"), ("trB", "train"), ("dvA", "dev"), ("teA", "test")):
        for c in (1, 2, 3):
            missing = missing_text and v == "trB" and c == 2
            text = "" if missing else " ".join(WORDS[(c + i) % 10] for i in range(c + 2))
            rows.append(f"{v},{c},{text},{c - 2.5},x,{mode}")
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def test_featurize_writes_token_features_the_encoder_gives(tmp_path, tiny_encoder):
    import torch
    import transformers
    table = mosi_table(tmp_path / "label.csv")
    out = str(tmp_path / "text.pkl")
    assert mmolre(["featurize", table, out, "--text_encoder", tiny_encoder, "--max_length", "8",
                   "--batch_size", "2"]) == 0
    with open(out, "rb") as f:
        data = pickle.load(f)
    train = data["train"]
    assert train["text"].shape == (6, 8, 12) and train["text"].dtype == np.float32
    assert list(train["id"][:2]) == ["trA$_$1", "trA$_$2"] and len(data["valid"]["id"]) == 3   # dev -> valid
    np.testing.assert_allclose(train["regression_labels"][:3], [-1.5, -0.5, 0.5])
    tok = transformers.AutoTokenizer.from_pretrained(tiny_encoder)
    model = transformers.AutoModel.from_pretrained(tiny_encoder).eval()
    enc = tok([train["raw_text"][2]], return_tensors="pt")
    with torch.no_grad():
        want = model(**enc).last_hidden_state[0].numpy()
    n = enc["input_ids"].shape[1]
    assert train["text_lengths"][2] == n == 7      # [CLS] + 5 words + [SEP]
    np.testing.assert_allclose(train["text"][2, :n], want, atol=1e-4)
    assert (train["text"][2, n:] == 0).all()
    assert data["config"]["featurize"]["text_encoder"] == tiny_encoder
    # the output is a dataset the trainer reads; the text mask follows the lengths
    prep = prepared(tmp_path, dataset="mosi", data_path=out)
    assert prep.modalities == ["text"]
    batch = prep.splits["train"].__getitems__([2])
    assert batch.masks["text"][0].sum() == 7


def test_featurize_refuses_rows_without_text_unless_told_and_lists_them(tmp_path, tiny_encoder, capsys):
    table = mosi_table(tmp_path / "label.csv", missing_text=True)
    out = str(tmp_path / "text.pkl")
    assert mmolre(["featurize", table, out, "--text_encoder", tiny_encoder]) == 2
    assert "trB$_$2 (line 6)" in capsys.readouterr().err
    assert mmolre(["featurize", table, out, "--text_encoder", tiny_encoder, "--skip_missing_text"]) == 0
    assert "no transcript (--skip_missing_text): 1 rows (trB$_$2)" in capsys.readouterr().out
    with open(out, "rb") as f:
        assert len(pickle.load(f)["train"]["id"]) == 5


def test_featurize_mosei_table_splits_valid_by_video_and_keeps_emotions(tmp_path, tiny_encoder, capsys):
    rows = ["video_id,clip_index,start,end,sentiment," + ",".join(EMOTIONS) + ",mode,text,asr"]
    for v in range(10):
        mode = "train" if v < 3 else "valid" if v < 8 else "test"
        for c in range(3):
            text = "" if mode == "train" else f"{WORDS[v]} {WORDS[c]}"
            rows.append(f"vid{v},{c},0,1,{(v - 5) / 3:.3f}," + ",".join(str((v + c + i) % 4) for i in range(6))
                        + f",{mode},{text},")
    rows.append("vidX,0,0,1,0.0,0,0,0,0,0,0,none,outside the folds,")
    (tmp_path / "mosei.csv").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "mosei.pkl")
    # train rows have no transcript (as in the public MOSEI tables): refused, with the way out named
    assert mmolre(["featurize", str(tmp_path / "mosei.csv"), out, "--text_encoder", tiny_encoder]) == 2
    err = capsys.readouterr().err
    assert "9 row(s) have no transcript" in err and "--train_from valid" in err
    assert mmolre(["featurize", str(tmp_path / "mosei.csv"), out, "--text_encoder", tiny_encoder,
                   "--train_from", "valid", "--dev_fraction", "0.4"]) == 0
    with open(out, "rb") as f:
        data = pickle.load(f)
    videos = {s: {i.split("$_$")[0] for i in data[s]["id"]} for s in ("train", "valid", "test")}
    assert videos["train"] | videos["valid"] == {f"vid{v}" for v in range(3, 8)}
    assert not videos["train"] & videos["valid"] and len(videos["valid"]) == 2
    assert videos["test"] == {"vid8", "vid9"}
    left = data["config"]["featurize"]["left_out"]
    assert left["mode none (outside the standard folds)"]["ids"] == ["vidX$_$0"]
    assert left["original train split (--train_from valid)"]["count"] == 9
    i = list(data["test"]["id"]).index("vid9$_$1")
    np.testing.assert_allclose(data["test"]["emotion_labels"][i], [(9 + 1 + k) % 4 for k in range(6)])
    json.dumps(data["config"])


def test_featurize_without_a_reachable_encoder_says_how_to_work_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    table = mosi_table(tmp_path / "label.csv")
    assert mmolre(["featurize", table, str(tmp_path / "o.pkl"), "--text_encoder", "no-such-org/no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "could not load" in err and "local model directory" in err


def test_featurize_max_length_must_fit_the_encoder(tmp_path, tiny_encoder, capsys):
    table = mosi_table(tmp_path / "label.csv")
    assert mmolre(["featurize", table, str(tmp_path / "o.pkl"), "--text_encoder", tiny_encoder,
                   "--max_length", "100"]) == 2
    assert "longer than" in capsys.readouterr().err and not (tmp_path / "o.pkl").exists()


def test_check_dataset_accepts_the_quirky_but_valid_file():
    raw = mmsa(aligned=False, bytes_ids=True, emotions=True)
    reports = check_dataset("ok.pkl", raw, ["text", "audio", "vision"])
    assert reports["train"].nonfinite_replaced == {"audio": 2} and reports["test"].with_emotions == 6


def test_featurize_rejects_bad_emotions_in_the_table_with_file_line_and_sample(tmp_path, capsys):
    head = "video_id,clip_index,sentiment," + ",".join(EMOTIONS) + ",mode,text"
    for bad, message in (("x", "could not convert"), ("3.5", "outside [0, 3]")):
        (tmp_path / "t.csv").write_text(f"{head}\nv,0,1.0,{bad},0,0,0,0,0,test,hello\n")
        assert mmolre(["featurize", str(tmp_path / "t.csv"), str(tmp_path / "o.pkl"), "--text_encoder", "unused"]) == 2
        err = capsys.readouterr().err
        assert "t.csv [line 2, key 'emotions', sample 'v$_$0']" in err and message in err
