"""`mmolre data convert`: a pickle-free dataset that trains on exactly what its pickle gives, and that is
checked again when opened, since a shared directory can be damaged or edited."""
import json
import os
import pickle
import re

import datasets
import numpy as np
import pyarrow as pa
import pytest
from datasets.arrow_writer import ArrowWriter

from mmolre.cli import main
from mmolre.config import DataConfig
from mmolre.data import prepare, train_loader
from mmolre.data.cache import CACHE_FORMAT, arrow_features
from mmolre.data.converted import check_converted, convert, open_converted
from mmolre.data.schema import DataError
from mmolre.data.synthetic import generate


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    path = tmp_path_factory.mktemp("pickle") / "d.pkl"
    with open(path, "wb") as f:
        pickle.dump(generate(0.01), f)
    return str(path)


@pytest.fixture
def converted(tmp_path, pickled):
    out = tmp_path / "arrow"
    assert main(["data", "convert", pickled, str(out)]) == 0
    return str(out)


def _prepared(path, cache_dir, **kw):
    return prepare(DataConfig(dataset="mmsa", data_path=path, cache_dir=cache_dir, **kw), builds=True,
                   barrier=lambda: None)


def test_a_converted_dataset_gives_the_trainer_what_its_pickle_gives(tmp_path, pickled, converted):
    assert sorted(os.listdir(converted)) == ["meta.json", "test.arrow", "train.arrow", "valid.arrow"]
    meta = json.load(open(os.path.join(converted, "meta.json")))   # JSON, and no path of the converting machine
    assert meta["source"] == "d.pkl" and meta["format"] == CACHE_FORMAT
    expected = arrow_features({m: tuple(meta["shapes"][m]) for m in meta["modalities"]}, None).arrow_schema
    for split in ("train", "valid", "test"):   # Arrow IPC streams of exactly the trainer's columns: data only
        with pa.memory_map(os.path.join(converted, f"{split}.arrow")) as source:
            assert pa.ipc.open_stream(source).schema.remove_metadata() == expected.remove_metadata()
    from_pickle = _prepared(pickled, str(tmp_path / "cache_a"))
    from_arrow = _prepared(converted, str(tmp_path / "cache_b"))
    assert not os.path.isdir(tmp_path / "cache_b" / "arrow")     # read where it is, never re-converted
    assert from_arrow.normalisation == from_pickle.normalisation
    assert from_arrow.modalities == from_pickle.modalities and from_arrow.shapes == from_pickle.shapes
    meta_a, meta_b = from_pickle.sources["mmsa"], from_arrow.sources["mmsa"]
    assert meta_a["splits"] == meta_b["splits"]
    # provenance: what was read (the directory, its files' digest) and what it was converted from
    assert meta_b["source"] == converted and meta_b["converted_from"] == "d.pkl"
    assert meta_b["converted_from_sha256"] == meta_a["sha256"] and len(meta_b["sha256"]) == 64
    assert meta_b["sha256"] != meta_a["sha256"]
    for split in ("train", "valid", "test"):
        a = list(train_loader(from_pickle.splits[split], 8, 0, 1, seed=3))
        b = list(train_loader(from_arrow.splits[split], 8, 0, 1, seed=3))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x.ids == y.ids and (x.sentiment == y.sentiment).all() and (x.emotions == y.emotions).all()
            for m in from_pickle.modalities:
                assert (x.features[m] == y.features[m]).all() and (x.masks[m] == y.masks[m]).all()


def test_convert_refuses_a_directory_that_holds_files_and_fills_an_empty_one_in_place(tmp_path, pickled, converted,
                                                                                       capsys, monkeypatch):
    stamp = os.path.getmtime(os.path.join(converted, "meta.json"))
    assert main(["data", "convert", pickled, converted]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(converted, "meta.json")) == stamp
    here = tmp_path / "here"
    here.mkdir()
    inode = os.stat(here).st_ino
    monkeypatch.chdir(here)   # the current, empty directory: the files move into it, the directory stays
    convert(pickled, ".")
    assert os.stat(here).st_ino == inode and sorted(os.listdir(".")) == sorted(os.listdir(converted))
    assert not [p for p in os.listdir(tmp_path) if "converting" in p]
    check_converted(".")


def _rewrite(path, split, change, features=None):
    """Write split `split` of a converted dataset again, with `change(columns)` applied."""
    file = os.path.join(path, f"{split}.arrow")
    hf = datasets.Dataset.from_file(file, in_memory=True)
    columns = hf.with_format("numpy")[:]
    change(columns)
    writer = ArrowWriter(features=features or hf.features, path=file + ".new")
    writer.write_batch(columns)
    writer.finalize()
    os.replace(file + ".new", file)
    return hf["id"]


@pytest.mark.parametrize("split, key, change, message", [
    ("valid", "vision", lambda c: c["vision"].__setitem__((2, 0, 0), np.nan), "non-finite feature values"),
    ("test", "audio_length", lambda c: c["audio_length"].__setitem__(2, 10_000), "length 10000 outside"),
    ("train", "sentiment", lambda c: c["sentiment"].__setitem__(2, 4.0), "sentiment 4.0 outside"),
    ("train", "emotions", lambda c: c["emotions"].__setitem__((2, 1), -1.0), "emotion intensities outside"),
])
def test_a_damaged_value_is_refused_naming_file_key_and_sample(tmp_path, converted, split, key, change, message):
    ids = _rewrite(converted, split, change)
    with pytest.raises(DataError, match=rf"{split}.arrow \[split '{split}', key '{key}', sample "
                                        rf"'{re.escape(ids[2])}'\]: {message}"):
        open_converted(converted, str(tmp_path / "cache"))


def test_a_duplicate_id_and_a_foreign_column_are_refused(tmp_path, converted):
    ids = _rewrite(converted, "valid", lambda c: c["id"].__setitem__(1, c["id"][0]))
    with pytest.raises(DataError, match=rf"key 'id', sample '{re.escape(ids[0])}'\]: duplicate id"):
        check_converted(converted)
    _rewrite(converted, "valid", lambda c: c["id"].__setitem__(1, ids[1]))
    check_converted(converted)
    hf = datasets.Dataset.from_file(os.path.join(converted, "test.arrow"))
    extra = datasets.Features({**hf.features, "picture": datasets.Image()})   # decoding it would open a path
    _rewrite(converted, "test", lambda c: c.__setitem__("picture", [{"path": "/nonexistent.png", "bytes": None}]
                                                        * len(c["id"])), features=extra)
    with pytest.raises(DataError, match=r"test.arrow: its columns .* are not those meta.json's shapes give"):
        check_converted(converted)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.__setitem__("format", 1), r"\[key 'format'\]: 1, this version reads format"),
    (lambda m: m["normalisation"]["text"].__setitem__("std", [0.0] * len(m["normalisation"]["text"]["std"])),
     r"\[key 'normalisation.text.std'\]"),
    (lambda m: m["normalisation"]["audio"].pop("count"), r"\[key 'normalisation.audio.count'\]"),
    (lambda m: m["modalities"].append("smell"), r"\[key 'modalities'\]: .*'smell'"),
    (lambda m: m["shapes"].pop("vision"), r"\[key 'shapes.vision'\]: None"),
    (lambda m: m["splits"]["train"].pop("samples"), r"\[key 'splits.train.samples'\]"),
    (lambda m: m["splits"]["train"].__setitem__("samples", 1), r"train.arrow \[split 'train', key 'id'\]: \d+ samples"),
])
def test_an_edited_meta_json_is_refused_naming_the_key(converted, edit, message):
    file = os.path.join(converted, "meta.json")
    meta = json.load(open(file))
    edit(meta)
    json.dump(meta, open(file, "w"))
    with pytest.raises(DataError, match=message):
        check_converted(converted)


def test_a_truncated_or_missing_file_is_refused_naming_it(tmp_path, converted):
    file = os.path.join(converted, "train.arrow")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 3)
    with pytest.raises(DataError, match=rf"{re.escape(file)}: not a readable Arrow dataset"):
        open_converted(converted, str(tmp_path / "cache"))
    os.remove(os.path.join(converted, "valid.arrow"))
    with pytest.raises(DataError, match=r"valid.arrow: missing \(a converted dataset has meta.json, train.arrow"):
        open_converted(converted, str(tmp_path / "cache"))


def test_the_whole_check_runs_once_per_version_of_the_files(tmp_path, converted, monkeypatch):
    from mmolre.data import converted as module
    cache = str(tmp_path / "cache")
    open_converted(converted, cache)
    calls = []
    monkeypatch.setattr(module, "check_converted", lambda path: calls.append(path))
    open_converted(converted, cache)
    assert calls == []
    os.utime(os.path.join(converted, "test.arrow"), ns=(1, 1))   # a new version of one file
    open_converted(converted, cache)
    assert calls == [converted]
    monkeypatch.setattr(module, "CHECK_VERSION", module.CHECK_VERSION + 1)   # a version that checks more
    open_converted(converted, cache)
    assert calls == [converted] * 2


def test_labels_transcripts_and_a_looser_join_cannot_be_added_to_a_converted_dataset(tmp_path, converted):
    with pytest.raises(DataError, match="join --emotion_labels when converting"):
        open_converted(converted, str(tmp_path), emotion_labels="labels.csd")
    with pytest.raises(DataError, match="--finetune_text"):
        open_converted(converted, str(tmp_path), text_tokens=object())
    file = os.path.join(converted, "meta.json")   # as if converted with --emotion_join_tolerance 0.5
    meta = json.load(open(file))
    meta["emotion_labels"] = {"file": "labels.csv", "sentiment_mismatches": 30, "compared": 100, "disagreeing": [],
                              "summary": "joined"}
    json.dump(meta, open(file, "w"))
    with pytest.raises(DataError, match="more than the tolerated 1.0%"):
        open_converted(converted, str(tmp_path))                   # the default tolerance, checked on every open
    open_converted(converted, str(tmp_path), join_tolerance=0.5)


def test_inspect_checks_a_converted_dataset_without_opening_a_pickle(converted, capsys, monkeypatch):
    from mmolre.data import inspect as module

    def no_pickle(path):
        raise AssertionError(f"{path} unpickled")
    monkeypatch.setattr(module, "load_pickle", no_pickle)
    assert main(["data", "inspect", converted]) == 0
    out = capsys.readouterr().out
    assert "a converted dataset" in out and "every value checked" in out and "train: 163 samples" in out
