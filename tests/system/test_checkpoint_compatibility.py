"""A checkpoint written by the trainer before its loop was split into modules (tests/fixtures/run_format2, made
at commit e52a0e8) resumes under today's code through the real launcher, and the run ends where that commit's
own resume of it ended (tests/fixtures/run_format2_resumed_results.json): every count exactly, every metric to
1e-6 relative. Exactly, to the last bit, until the gate started computing the router's softmax once for its
routes and its balance loss (the same function; the sum of two softmax backwards became one, which rounds
differently in the last bit); a wrong resume (moments or step reset, experts misplaced) moves the metrics by
orders of magnitude more. The routing statistics' chance levels (and so their excesses) are left out: they
became the mean of 20 label shuffles instead of one (issue 23), a change of the statistic, not of the run. Records
added since (ADDED) may appear beside the fixture's; every key the fixture has must still be there."""
import json
import math
import os
import shutil

from tests.launcher import ROOT, results, run_deepspeed


CHANCE = ("_chance", "_chance_std", "_excess")   # the shuffle statistics, redefined since the fixture
ADDED = {"train_load_max_over_mean"}            # the epoch's training-load balance, recorded since (issue 23)


def assert_close(actual, expected, where="results"):
    """Equal structure and counts; floats to 1e-6 relative; chance levels aside."""
    if isinstance(expected, dict):
        def kept(d):
            return {k for k in d if not k.endswith(CHANCE)}
        assert kept(actual) - ADDED == kept(expected), where
        for key in kept(expected):
            assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-9), (where, actual, expected)
    else:
        assert actual == expected, (where, actual, expected)

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
        assert_close({k: r["train"][k] for k in value} if key == "train" else r[key], value, key)
