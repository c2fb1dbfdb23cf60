"""The shareable model directory (`shared_model.py`): safetensors and JSON only, read back exactly; what is not
one is refused with a reason, and an earlier version's pickle only when trusted."""
import json

import numpy as np
import pytest
import torch

from mmolre import shared_model
from mmolre.config import ModelConfig
from mmolre.shared_model import full_state_dict
from mmolre.model import MMoLRE
from dataclasses import asdict

SHAPES = {"text": (5, 6), "audio": (4, 3)}


def write_model(tmp_path, route_per="utterance"):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=8, blocks=1, num_experts=4, expert_rank=2, dropout=0.0, route_per=route_per)
    model = MMoLRE(cfg, SHAPES).eval()
    norm = {m: {"mean": [0.0] * f, "std": [1.0] * f} for m, (_, f) in SHAPES.items()}
    config = {"model_config": asdict(cfg), "shapes": {m: list(s) for m, s in SHAPES.items()}, "normalisation": norm,
              "emotion_thresholds": {e: 0.4 for e in ("happy", "sad", "anger", "surprise", "disgust", "fear")}}
    shared_model.write(str(tmp_path / "model"), full_state_dict(model), config, "# card\n")
    return model, config


@pytest.mark.parametrize("route_per", ["utterance", "step"])
def test_the_directory_holds_no_pickle_and_loads_back_exactly(tmp_path, route_per):
    model, _ = write_model(tmp_path, route_per)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    raw = (tmp_path / "model" / "model.safetensors").read_bytes()
    header = int.from_bytes(raw[:8], "little")   # safetensors: a JSON header, then raw tensor bytes
    assert json.loads(raw[8:8 + header])["__metadata__"] == {"format": shared_model.FORMAT}
    loaded = shared_model.load_model(str(tmp_path / "model"))
    assert loaded.model.cfg.route_per == route_per
    for k, v in full_state_dict(model).items():   # the experts in banks too, under their per-expert keys
        assert torch.equal(full_state_dict(loaded.model)[k], v.float()), k
    x = {m: np.random.default_rng(1).normal(size=(3, t, f)).astype(np.float32) for m, (t, f) in SHAPES.items()}
    out = loaded.predict(x)
    with torch.no_grad():
        direct = model({m: torch.from_numpy(v) for m, v in x.items()},
                       {m: torch.ones(3, t, dtype=torch.bool) for m, (t, _) in SHAPES.items()})
    np.testing.assert_allclose(out["sentiment_pred"], direct.sentiment.numpy(), rtol=1e-6)
    assert out["emotion_pred"].tolist() == (torch.sigmoid(direct.emotion_logits).numpy() > 0.4).astype(int).tolist()


def test_what_is_not_a_model_directory_is_refused_with_a_reason(tmp_path):
    write_model(tmp_path)
    with pytest.raises(ValueError, match="writes a directory"):
        shared_model.write(str(tmp_path / "model.pt"), {}, {}, "")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    (tmp_path / "model" / "config.json").write_text(json.dumps({**config, "format": "other"}))
    with pytest.raises(ValueError, match=r"config.json \[key 'format'\]: 'other'"):
        shared_model.read(str(tmp_path / "model"))
    torch.save({"format": "mmolre-export-1", "state_dict": {}}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="torch pickle .* --trust_pickle"):
        shared_model.read(str(tmp_path / "old.pt"))
    with pytest.warns(UserWarning, match="unpickling"):
        assert shared_model.read(str(tmp_path / "old.pt"), trust_pickle=True)[0] == {}
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing modalities \['audio'\]"):
        shared_model.load_model(str(tmp_path / "model")).predict({"text": np.zeros((2, 5, 6), np.float32)})


def test_weights_missing_from_the_file_are_refused_not_left_at_their_initialisation(tmp_path):
    from safetensors.torch import load_file, save_file
    write_model(tmp_path)
    weights = tmp_path / "model" / "model.safetensors"
    state = load_file(weights)
    expert_key = next(k for k in state if "deepspeed_experts" in k)
    save_file({k: v for k, v in state.items() if k != expert_key}, weights, metadata={"format": shared_model.FORMAT})
    with pytest.raises(ValueError, match="lacks 1 weight"):
        shared_model.load_model(str(tmp_path / "model"))
    model = MMoLRE(ModelConfig(d_model=8, blocks=1, num_experts=4, expert_rank=2, dropout=0.0), SHAPES)
    with pytest.raises(KeyError, match="per-expert weights incomplete"):   # the bank's own load refuses it too
        model.load_state_dict({k: v for k, v in state.items() if k != expert_key}, strict=False)
