"""The crash-safe checkpoint files (mmolre/checkpoint.py): withdrawing a tag, settling an interrupted reshard."""
import pytest


def test_saving_a_tag_again_first_withdraws_it_whole(tmp_path):
    """Before a tag is re-saved (a stop at an epoch's last step, then the epoch-end save; a reshard), it
    stops counting as complete and its files go, so none of another topology's outlives the new save."""
    from mmolre import checkpoint
    tag = tmp_path / "step00000010"
    tag.mkdir()
    for name in ("mmolre_complete.json", "elastic_rank0.pt", "elastic_rank1.pt", "zero_pp_rank_3_mp_rank_00_optim_states.pt"):
        (tag / name).write_text("x")
    assert checkpoint.is_complete(str(tmp_path), "step00000010")
    checkpoint.withdraw(str(tmp_path), "step00000010")
    assert not tag.exists() and not checkpoint.is_complete(str(tmp_path), "step00000010")


@pytest.mark.parametrize("new_tag_complete", [False, True])
def test_what_an_interrupted_reshard_left_is_settled_before_a_tag_is_chosen(tmp_path, new_tag_complete):
    """A reshard moves the tag aside while it writes the new one; if a rank died in between, the next
    resume (or reshard) brings the old tag back, or drops it where the new one was completed."""
    from mmolre import checkpoint
    aside = tmp_path / ("step00000040" + checkpoint.ASIDE)
    aside.mkdir()
    (aside / "mmolre_complete.json").write_text("{}")
    (aside / "old.pt").write_text("old")
    new = tmp_path / "step00000040"
    new.mkdir()
    (new / "new.pt").write_text("new")
    if new_tag_complete:
        (new / "mmolre_complete.json").write_text("{}")
    restored = checkpoint.recover_aside(str(tmp_path))
    assert not aside.exists()
    assert restored == ([] if new_tag_complete else ["step00000040"])
    assert (new / ("new.pt" if new_tag_complete else "old.pt")).exists()
    assert checkpoint.latest_complete(str(tmp_path)) == "step00000040"


def test_a_format_2_state_saved_before_the_first_step_gives_expert_weights_without_moments(tmp_path):
    """A topology-free state written before any optimizer step has weights and no AdamW moments: the experts'
    share says so (a resume then resets their optimizer state instead of failing on the missing moments)."""
    import torch
    from mmolre import expert_state_files
    from mmolre.model.expert_bank import PARAMS
    from mmolre.model.grouped import per_expert_key
    prefix = "unitse.text.blocks.0.moe.deepspeed_moe.experts."
    params = {per_expert_key(prefix, g, name): {"fp32": torch.full((2,), float(g))} for g in range(2) for name in PARAMS}
    torch.save({"step": 0, "params": params}, tmp_path / "elastic_rank0.pt")
    values, with_moments = expert_state_files.read_share(str(tmp_path), ["text.0"], 2, 1, 0, 1)
    assert with_moments is False
    assert torch.equal(values["text.0"]["down.weight/weight"], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    params = {k: {**v, "exp_avg": v["fp32"] * 0, "exp_avg_sq": v["fp32"] * 0} for k, v in params.items()}
    torch.save({"step": 3, "params": params}, tmp_path / "elastic_rank0.pt")
    assert expert_state_files.read_share(str(tmp_path), ["text.0"], 2, 1, 0, 1)[1] is True


def test_the_state_assembly_cuts_its_collectives_into_buckets_in_parameter_order(monkeypatch):
    """A save assembles every parameter with one all_reduce per bucket: buckets keep the parameters' order, stay
    within the bound and put a parameter larger than the bound alone."""
    from mmolre import topology_free_state
    monkeypatch.setattr(topology_free_state, "ASSEMBLY_BUCKET", 6)
    assert list(topology_free_state._buckets([4, 7, 9, 11, 12], [3, 3, 1, 10, 6])) == [[4, 7], [9], [11], [12]]
    assert list(topology_free_state._buckets([], [])) == []
