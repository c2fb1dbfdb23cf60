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
