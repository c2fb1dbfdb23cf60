"""Long sequences: the length-aware temporal front end, and synthetic data shaped like MMSA's files."""
import pickle

import numpy as np
import pytest
import torch

from mmolre.cli import main as mmolre
from mmolre.config import MODALITIES, DataConfig, ModelConfig
from mmolre.data import prepare
from mmolre.model import MMoLRE
from mmolre.model.frontend import LengthAwarePool


def test_pooling_averages_equal_parts_of_the_valid_steps_and_keeps_short_ones():
    x = torch.arange(10.0).view(1, 10, 1).repeat(3, 1, 1)
    mask = torch.arange(10)[None] < torch.tensor([[10], [3], [6]])
    pooled, out_mask = LengthAwarePool(4)(x, mask)
    assert pooled[0, :, 0].tolist() == [1.0, 3.5, 6.0, 8.5]        # steps 0-2, 3-4, 5-7, 8-9
    assert pooled[2, :, 0].tolist() == [0.5, 2.0, 3.5, 5.0]        # 6 steps: 0-1, 2, 3-4, 5
    assert pooled[1, :3, 0].tolist() == [0.0, 1.0, 2.0]            # 3 <= 4 steps: kept as they are
    assert out_mask.tolist() == [[True] * 4, [True, True, True, False], [True] * 4]


def test_padding_never_enters_the_pooled_steps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 50, 3, generator=g)
    mask = torch.arange(50)[None] < torch.tensor([[50], [37], [5], [1]])
    noisy = x.masked_fill(~mask[..., None], 1e6)
    a, ma = LengthAwarePool(8)(x, mask)
    b, mb = LengthAwarePool(8)(noisy, mask)
    torch.testing.assert_close(a[ma], b[mb])
    assert ma.sum(1).tolist() == [8, 8, 5, 1]


def test_the_model_pools_long_modalities_to_temporal_steps_and_ignores_their_padding():
    shapes = {"text": (10, 8), "audio": (120, 5)}
    torch.manual_seed(0)
    model = MMoLRE(ModelConfig(d_model=16, blocks=1, num_experts=4, expert_rank=4, dropout=0.0, temporal_steps=16),
                   shapes).eval()
    model.init_shared_experts(0, 0)
    assert set(model.frontends) == {"audio"}                      # text is short enough already
    assert model.unitse["audio"].blocks[0].seq_len == 16 and model.encoders["audio"].pos.shape[0] == 16
    g = torch.Generator().manual_seed(1)
    features = {"text": torch.randn(3, 10, 8, generator=g), "audio": torch.randn(3, 120, 5, generator=g)}
    masks = {"text": torch.ones(3, 10, dtype=torch.bool),
             "audio": torch.arange(120)[None] < torch.tensor([[120], [40], [9]])}
    out = model(features, masks)
    padded = dict(features, audio=features["audio"].masked_fill(~masks["audio"][..., None], 50.0))
    again = model(padded, masks)
    torch.testing.assert_close(out.sentiment, again.sentiment)
    assert masks["audio"].shape == (3, 120)                       # the caller's masks are left alone


@pytest.mark.parametrize("like", ["mosi-unaligned", "mosi-aligned"])
def test_synthetic_like_has_mmsas_keys_shapes_lengths_and_quirks(tmp_path, like, capsys):
    out = tmp_path / f"{like}.pkl"
    assert mmolre(["synthetic", str(out), "--like", like, "--scale", "0.02"]) == 0
    assert "shaped like MMSA's" in capsys.readouterr().out
    with open(out, "rb") as f:
        data = pickle.load(f)
    train = data["train"]
    steps = {"text": 50, "audio": 375, "vision": 500} if like == "mosi-unaligned" else dict.fromkeys(MODALITIES, 50)
    assert {m: train[m].shape[1:] for m in steps} == {m: (t, d) for (m, t), d in
                                                     zip(steps.items(), (768, 5, 20))}
    assert len(data["train"]["id"]) == round(1284 * 0.02) and train["text_bert"].shape == (len(train["id"]), 3, 50)
    assert np.isneginf(train["audio"]).any()
    text_len = train["text_bert"][:, 1].sum(1)
    if like == "mosi-unaligned":
        for m in ("audio", "vision"):
            past = np.arange(steps[m])[None] >= train[f"{m}_lengths"][:, None]
            assert (train[m][past] == 0).all() and train[f"{m}_lengths"].mean() < 0.5 * steps[m]
    else:
        assert "audio_lengths" not in train
        assert (train["vision"][np.arange(50)[None] >= text_len[:, None]] == 0).all()
    # the trainer reads it with the right masks: the text's from text_bert, audio/vision from their lengths
    # (unaligned) or from the text's (aligned)
    prepared = prepare(DataConfig(dataset="mosi", data_path=str(out), cache_dir=str(tmp_path / "cache")),
                       builds=True, barrier=lambda: None)
    batch = prepared.splits["train"].__getitems__(list(range(4)))
    assert batch.masks["text"].sum(1).tolist() == text_len[:4].tolist()
    expected = train["vision_lengths"][:4] if like == "mosi-unaligned" else text_len[:4]
    assert batch.masks["vision"].sum(1).tolist() == expected.tolist()


def test_pooling_counts_valid_steps_in_order_whatever_the_mask_and_keeps_fp32_means_under_bf16():
    x = torch.arange(12.0).view(1, 12, 1)
    holes = torch.tensor([[True, False] * 6])                         # valid steps 0, 2, 4, 6, 8, 10
    pooled, out_mask = LengthAwarePool(3)(x, holes)
    assert pooled[0, :, 0].tolist() == [1.0, 5.0, 9.0] and out_mask.all()
    g = torch.Generator().manual_seed(0)
    x = 100 + torch.randn(2, 400, 4, generator=g)
    mask = torch.ones(2, 400, dtype=torch.bool)
    low, _ = LengthAwarePool(7)(x.bfloat16(), mask)
    exact, _ = LengthAwarePool(7)(x.bfloat16().float(), mask)
    assert low.dtype == torch.bfloat16
    assert torch.equal(low, exact.bfloat16())   # the fp32 mean, rounded once (a bf16 sum of 57 steps is off by 0.5)


def test_runs_recorded_before_the_front_end_pooled_nothing():
    from mmolre.config import RunConfig
    recorded = RunConfig().to_dict()
    del recorded["model"]["temporal_steps"]
    assert RunConfig.from_dict(recorded).model.temporal_steps == 0
