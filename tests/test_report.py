"""`mmolre report`: grouping and mean ± std on known inputs."""
import json

import pytest

from mmolre.report import group_runs, load_runs, markdown_report, mean_std


def _run(tmp_path, name, experts, top_k, seed, mae, f1=None):
    d = tmp_path / name
    d.mkdir()
    r = {"config": {"data": {"dataset": "synthetic"}, "model": {"num_experts": experts, "top_k": top_k},
                    "train": {"seed": seed, "run_name": name}},
         "num_experts": experts, "top_k": top_k, "synthetic": True,
         "params": {"total": 1000 * experts, "active_per_utterance": 500},
         "test": {"sentiment": {"mae": mae}, **({"emotion": {"micro_f1": f1}} if f1 is not None else {})}}
    (d / "results.json").write_text(json.dumps(r))
    return str(d)


def test_mean_and_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)


def test_runs_group_by_what_differs_and_average_over_seeds(tmp_path):
    dirs = [_run(tmp_path, "a1", 8, 2, 1, 0.50, 0.6), _run(tmp_path, "a2", 8, 2, 2, 0.60, 0.7),
            _run(tmp_path, "a3", 8, 2, 3, 0.70, 0.8), _run(tmp_path, "b1", 16, 2, 1, 0.40)]
    runs = load_runs(dirs)
    keys, groups = group_runs(runs)
    assert keys == ["model.num_experts"]            # top_k, dataset and seed do not split groups
    assert [len(v) for v in groups.values()] == [3, 1]
    table = markdown_report(runs)
    assert "| 8 | 3 | 8,000 | 500 | 0.6000 ± 0.1000 [0.5000, 0.7000] |" in table
    assert "| 16 | 1 | 16,000 | 500 | 0.4000 ± 0.0000 |" in table
    assert "0.7000 ± 0.1000" in table                 # emotion micro-F1 of the 3 seeds
    assert "SYNTHETIC" in table


def test_an_unfinished_run_is_named(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="results.json does not exist"):
        load_runs([str(tmp_path / "x")])
