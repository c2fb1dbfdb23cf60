"""What the benchmarks record as their command, and the launch.py flags they refuse to pass through."""
import argparse
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench.commands import command_line, passthrough_parser, refuse_owned_flags  # noqa: E402


def test_the_recorded_command_has_no_machine_paths_inside_the_repository():
    argv = ["--work", os.path.join(ROOT, "runs", "vs_mmsa"), f"--out={ROOT}/bench/results/a", "--variant=--d_model 128",
            "--data", "/data/elsewhere.pkl"]
    assert command_line(os.path.join(ROOT, "bench", "vs_mmsa.py"), argv) == (
        "python bench/vs_mmsa.py --work runs/vs_mmsa --out=bench/results/a '--variant=--d_model 128' "
        "--data /data/elsewhere.pkl")


def test_flags_the_benchmark_sets_per_run_are_refused(capsys):
    parser = argparse.ArgumentParser(prog="bench")
    refuse_owned_flags(parser, ["--d_model", "128"], {"--seed"}, "set per run")
    with pytest.raises(SystemExit):
        refuse_owned_flags(parser, ["--lr", "1e-3", "--seed=3"], {"--seed", "--run_name"}, "set per run")
    assert "--lr 1e-3 --seed=3: --seed set per run" in capsys.readouterr().err


def test_a_launch_flag_is_never_taken_as_an_abbreviation_of_the_benchmarks_own():
    parser = passthrough_parser(None)
    parser.add_argument("--seeds", default="1,2,3")
    args, extra = parser.parse_known_args(["--seed", "3"])
    assert args.seeds == "1,2,3" and extra == ["--seed", "3"]   # then refused as owned, not run as seed 3


def test_the_uniform_routing_reference_matches_the_balls_in_bins_arithmetic():
    """bench/uniform_reference.py: many routes per expert spread evenly; few leave the busiest far above the mean
    and experts empty at the rate e^(-2R/N) per layer (two tasks, R routes each, N experts)."""
    import math
    from bench.uniform_reference import uniform_reference
    ratio, dead = uniform_reference(routes=1000 * 64, experts=64)
    assert ratio < 1.2 and dead == 0
    ratio, dead = uniform_reference(routes=1024, experts=1024, layers=2)
    assert ratio > 4 and abs(dead - 2 * 1024 * math.exp(-2)) < 25
    one_layer, _ = uniform_reference(routes=1024, experts=1024, layers=1)
    assert one_layer < ratio   # the worst of two layers is worse than one layer's
