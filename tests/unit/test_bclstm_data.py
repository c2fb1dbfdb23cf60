"""`mmolre bclstm`: the bc-LSTM unimodal MOSI features become a trimodal MMSA-schema dataset on poria's split
only (its train divided by video into train and valid), with the label table's real-valued sentiment."""
import csv
import pickle

import numpy as np
import pytest

from mmolre.data.bclstm import convert
from mmolre.data.schema import DataError

VIDEOS = {f"v{i}": ("train" if i < 8 else "test") for i in range(10)}   # 8 poria-train videos, 2 test


def write_inputs(tmp_path, sentiment=None, **changes):
    ids, split, rows = [], [], []
    for video, part in VIDEOS.items():
        for clip in (1, 2, 3):
            ids.append(f"{video}_{clip}")
            split.append(part)
            rows.append({"video_id": video, "clip_id": clip, "text": "x", "mode": "train",
                         "label": (sentiment or {}).get(f"{video}_{clip}", 1.5 if clip != 2 else -0.5)})
    rng = np.random.default_rng(0)
    labels = np.array([r["label"] for r in rows])
    arrays = {"ids": np.array(ids), "poria_split": np.array(split), "binary_label_ge0": (labels >= 0).astype(np.int8),
              **{k: rng.normal(size=(len(ids), 50)).astype(np.float32) for k in ("text", "audio", "video")}}
    arrays.update(changes)
    np.savez(tmp_path / "f.npz", **arrays)
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["video_id", "clip_id", "text", "label", "mode"])
        w.writeheader()
        w.writerows(rows)
    return str(tmp_path / "f.npz"), str(tmp_path / "labels.csv"), arrays


def test_poria_split_with_a_valid_split_carved_by_video_and_real_labels(tmp_path):
    npz, labels, arrays = write_inputs(tmp_path)
    report = convert(npz, labels, str(tmp_path / "out.pkl"), dev_fraction=0.25, split_seed=3)
    data = pickle.load(open(tmp_path / "out.pkl", "rb"))
    videos = {s: {i.split("$_$")[0] for i in data[s]["id"]} for s in ("train", "valid", "test")}
    assert videos["test"] == {"v8", "v9"}                                    # poria's test, as it is
    assert len(videos["valid"]) == 2 and not videos["valid"] & videos["train"]   # a quarter of its train videos
    assert videos["train"] | videos["valid"] == {f"v{i}" for i in range(8)}
    assert report["samples"] == {"train": 18, "valid": 6, "test": 6} and report["valid_videos"] == sorted(videos["valid"])
    row = list(arrays["ids"]).index("v9_2")
    at = list(data["test"]["id"]).index("v9$_$2")
    assert data["test"]["regression_labels"][at] == -0.5                    # the table's value, not the binary one
    for name, key in (("text", "text"), ("audio", "audio"), ("vision", "video")):
        assert data["test"][name].shape == (6, 1, 50) and (data["test"][f"{name}_lengths"] == 1).all()
        assert np.array_equal(data["test"][name][at, 0], arrays[key][row])


@pytest.mark.parametrize("case, message", [
    ("unknown id", r"\[key 'ids', sample 'v0_1'\]: not in the label table"),
    ("binary disagrees", r"\[key 'binary_label_ge0', sample 'v0_2'\]: 0, but the label table's sentiment is 2.0"),
    ("non-finite", r"\[key 'audio', sample 'v0_3'\]: non-finite values"),
    ("object array", r"\[key 'poria_split'\]: Object arrays cannot be loaded"),
    ("video on both sides", r"\[key 'poria_split'\]: videos with clips in both train and test: \['v0'\]"),
])
def test_bad_input_is_refused_naming_file_key_and_sample(tmp_path, case, message):
    if case == "unknown id":
        npz, labels, _ = write_inputs(tmp_path)
        lines = open(labels).read().splitlines()
        open(labels, "w").write("\n".join(lines[:1] + lines[2:]) + "\n")   # the table loses v0_1
    elif case == "binary disagrees":
        npz, labels, _ = write_inputs(tmp_path, sentiment={"v0_2": 2.0})
        arrays = dict(np.load(npz))
        arrays["binary_label_ge0"][1] = 0
        np.savez(npz, **arrays)
    elif case == "non-finite":
        npz, labels, arrays = write_inputs(tmp_path)
        audio = arrays["audio"].copy()
        audio[2, 7] = np.nan
        npz, labels, _ = write_inputs(tmp_path, audio=audio)
    elif case == "object array":
        npz, labels, _ = write_inputs(tmp_path, poria_split=np.array(poria_splits(), dtype=object))
    else:
        split = np.array(poria_splits())
        split[2] = "test"   # v0's third clip
        npz, labels, _ = write_inputs(tmp_path, poria_split=split)
    with pytest.raises(DataError, match=message):
        convert(npz, labels, str(tmp_path / "out.pkl"))
    assert not (tmp_path / "out.pkl").exists()


def poria_splits():
    return [part for part in VIDEOS.values() for _ in range(3)]
