"""`mmolre data convert`: a pickle-free dataset that trains on exactly what its pickle gives, and that is
checked again when opened, since a shared directory can be damaged or edited."""
import json
import os
import pickle
import re

import datasets
import numpy as np
import pytest
from datasets.arrow_writer import ArrowWriter

from mmolre.cli import main
from mmolre.config import DataConfig
from mmolre.data import prepare, train_loader
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


def _prepared(path, cache_dir):
    return prepare(DataConfig(dataset="mmsa", data_path=path, cache_dir=cache_dir), builds=True, barrier=lambda: None)


def test_a_converted_dataset_gives_the_trainer_what_its_pickle_gives(tmp_path, pickled, converted):
    assert sorted(os.listdir(converted)) == ["meta.json", "test.arrow", "train.arrow", "valid.arrow"]
    for name in os.listdir(converted):   # nothing in it unpickles: JSON and Arrow IPC streams only
        with open(os.path.join(converted, name), "rb") as f:
            assert f.read(1) != b"\x80", name
    from_pickle = _prepared(pickled, str(tmp_path / "cache_a"))
    from_arrow = _prepared(converted, str(tmp_path / "cache_b"))
    assert not os.path.isdir(tmp_path / "cache_b" / "arrow")     # read where it is, never re-converted
    assert from_arrow.normalisation == from_pickle.normalisation
    assert from_arrow.modalities == from_pickle.modalities and from_arrow.shapes == from_pickle.shapes
    meta_a, meta_b = from_pickle.sources["mmsa"], from_arrow.sources["mmsa"]
    assert meta_a["sha256"] == meta_b["sha256"] and meta_a["splits"] == meta_b["splits"]
    for split in ("train", "valid", "test"):
        a = list(train_loader(from_pickle.splits[split], 8, 0, 1, seed=3))
        b = list(train_loader(from_arrow.splits[split], 8, 0, 1, seed=3))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            assert x.ids == y.ids and (x.sentiment == y.sentiment).all() and (x.emotions == y.emotions).all()
            for m in from_pickle.modalities:
                assert (x.features[m] == y.features[m]).all() and (x.masks[m] == y.masks[m]).all()


def test_convert_refuses_to_write_into_a_directory_that_holds_files(tmp_path, pickled, converted, capsys):
    stamp = os.path.getmtime(os.path.join(converted, "meta.json"))
    assert main(["data", "convert", pickled, converted]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert os.path.getmtime(os.path.join(converted, "meta.json")) == stamp


def _rewrite(path, split, change):
    """Write split `split` of a converted dataset again, with `change(columns)` applied."""
    file = os.path.join(path, f"{split}.arrow")
    hf = datasets.Dataset.from_file(file, in_memory=True)
    columns = hf.with_format("numpy")[:]
    change(columns)
    writer = ArrowWriter(features=hf.features, path=file + ".new")
    writer.write_batch(columns)
    writer.finalize()
    os.replace(file + ".new", file)
    return hf["id"]


def test_a_damaged_feature_is_refused_naming_file_key_and_sample(tmp_path, converted):
    def nan_in_row_2(cols):
        cols["vision"][2, 0, 0] = np.nan
    ids = _rewrite(converted, "valid", nan_in_row_2)
    with pytest.raises(DataError, match=rf"valid.arrow \[split 'valid', key 'vision', sample '{re.escape(ids[2])}'\]: "
                                        r"non-finite"):
        open_converted(converted, str(tmp_path / "cache"))


def test_a_length_past_the_sequence_is_refused(tmp_path, converted):
    def long(cols):
        cols["audio_length"][0] = 10_000
    ids = _rewrite(converted, "test", long)
    with pytest.raises(DataError, match=rf"key 'audio_length', sample '{re.escape(ids[0])}'\]: length outside"):
        check_converted(converted)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.__setitem__("format", 1), r"meta.json \[key 'format'\]: 1, this version reads format"),
    (lambda m: m["normalisation"]["text"].__setitem__("std", [0.0] * len(m["normalisation"]["text"]["std"])),
     r"meta.json \[key 'normalisation.text.std'\]"),
    (lambda m: m["splits"]["train"].__setitem__("samples", 1), r"train.arrow \[split 'train', key 'id'\]: \d+ samples"),
])
def test_an_edited_meta_json_is_refused(converted, edit, message):
    file = os.path.join(converted, "meta.json")
    meta = json.load(open(file))
    edit(meta)
    json.dump(meta, open(file, "w"))
    with pytest.raises(DataError, match=message):
        check_converted(converted)


def test_a_truncated_arrow_file_is_refused_naming_the_dataset(converted):
    file = os.path.join(converted, "train.arrow")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 3)
    with pytest.raises(DataError, match=rf"{re.escape(converted)}: an Arrow file cannot be read"):
        check_converted(converted)


def test_the_check_runs_once_per_version_of_the_files(tmp_path, converted, monkeypatch):
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


def test_labels_and_transcripts_cannot_be_added_to_a_converted_dataset(tmp_path, converted):
    with pytest.raises(DataError, match="join --emotion_labels when converting"):
        open_converted(converted, str(tmp_path), emotion_labels="labels.csd")
    with pytest.raises(DataError, match="--finetune_text"):
        open_converted(converted, str(tmp_path), text_tokens=object())
