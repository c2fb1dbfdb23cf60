"""--expert_optimizer lazy in real runs through the launcher: its per-expert step counts survive a reshard to
another topology exactly, and the resharded checkpoint trains on (the 2-process parity with one process is in
test_distributed.py)."""
import subprocess
import sys

import torch

from tests.launcher import ROOT, complete_tags, environment, results, run_deepspeed
from tests.system.test_configurations import saved_expert_rows

LAZY = ["--num_experts", "16", "--top_k", "1", "--expert_optimizer", "lazy", "--dropout", "0"]


def test_a_lazy_run_reshards_with_every_experts_own_step_count_and_trains_on(tmp_path):
    run_deepspeed(tmp_path, "--run_name", "lazy", "--epochs", "1", *LAZY)
    run = tmp_path / "runs" / "lazy"
    before = saved_expert_rows(run, 1, 0)   # every expert, by global id
    steps = torch.cat([v["step"] for v in before.values()])
    assert results(run)["global_step"] == 20 and steps.max() <= 20 and steps.min() < steps.max()   # some waited
    proc = subprocess.run([sys.executable, "-m", "mmolre.cli", "reshard", str(run), "--world_size", "1",
                           "--ep_size", "1"], cwd=ROOT, env=environment(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = saved_expert_rows(run, 1, 0)
    tag = complete_tags(run)[-1]
    assert [p.name for p in sorted((run / "checkpoints" / tag).glob("expert_state_rank*.pt"))] == \
        ["expert_state_rank0.pt"]   # laid out for one rank now
    for layer, values in before.items():
        for key, value in values.items():
            assert torch.equal(after[layer][key], value), (layer, key)
    (run / "results.json").unlink()
    more = run_deepspeed(tmp_path, "--run_name", "lazy", "--epochs", "2", *LAZY, "--resume", procs=1)
    assert f"resumed from {run}/checkpoints/{tag}: epoch 1, step 20" in more.stdout
    final = saved_expert_rows(run, 1, 0)
    grown = torch.cat([v["step"] for v in final.values()]) - steps
    assert results(run)["global_step"] == 20 + 40 and 0 < grown.max() <= 40 and grown.min() >= 0
