"""The baselines and ablations train under two processes with expert parallelism (mp.spawn workers)."""
import pytest
import torch
import torch.multiprocessing as mp

from mmolre.distributed import free_port
from tests import dist_helpers as h


@pytest.mark.parametrize("variant", ["hard_sharing", "mmoe", "no_routers"])
def test_baselines_train_under_two_processes(variant, tmp_path):
    kw = {"no_routers": {"routers": False}}.get(variant, {"model": variant})
    mp.spawn(h.variant_training_worker, args=(2, free_port(), str(tmp_path / "out.pt"), kw), nprocs=2, join=True)
    losses = torch.load(tmp_path / "out.pt", weights_only=False)[0]["losses"]
    # batches alternate between two fixed ones: compare windows holding both equally often
    assert sum(losses[-4:]) < sum(losses[:4]), losses
