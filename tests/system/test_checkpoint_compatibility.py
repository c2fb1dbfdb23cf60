"""A checkpoint written by the trainer before its loop was split into modules (tests/fixtures/run_format2, made
at commit e52a0e8) resumes under today's code through the real launcher, and the run ends exactly where that
commit's own resume of it ended (tests/fixtures/run_format2_resumed_results.json)."""
import json
import os
import shutil

from tests.launcher import ROOT, results, run_deepspeed

FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def test_a_checkpoint_of_the_previous_layout_resumes_and_ends_as_it_did_then(tmp_path):
    run = tmp_path / "runs" / "old"
    shutil.copytree(os.path.join(FIXTURES, "run_format2"), run)
    proc = run_deepspeed(tmp_path, "--run_name", "old", "--epochs", "2", "--save_every", "4", "--resume")
    assert (f"resumed from {run}/checkpoints/step00000006 (format 2: its experts in DeepSpeed's files, now in expert "
            f"banks): the weights, AdamW moments and step of every parameter were carried over") in proc.stdout
    with open(os.path.join(FIXTURES, "run_format2_resumed_results.json")) as f:
        expected = json.load(f)
    r = results(run)
    for key, value in expected.items():
        if key == "train":
            assert {k: r["train"][k] for k in value} == value
        else:
            assert r[key] == value, key
