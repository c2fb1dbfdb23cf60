"""`mmolre report`: grouping and mean ± std on known inputs."""
import json

import pytest

from mmolre.report import group_runs, load_runs, markdown_report, mean_std


def _run(tmp_path, name, experts, top_k, seed, mae, f1=None, **model):
    d = tmp_path / name
    d.mkdir()
    r = {"config": {"data": {"dataset": "synthetic"}, "model": {"num_experts": experts, "top_k": top_k, **model},
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
    assert "| 16 | 1 | 16,000 | 500 | 0.4000 ± n/a |" in table      # one run has no spread to show
    assert "0.7000 ± 0.1000" in table                 # emotion micro-F1 of the 3 seeds
    assert "SYNTHETIC" in table


def test_an_unfinished_run_is_named(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="results.json does not exist"):
        load_runs([str(tmp_path / "x")])


def test_figures_draw_one_line_per_variant_not_one_pooled_point(tmp_path):
    """Five variants at 8 experts (as README's ablations): the table has five rows, and so must the figure."""
    pytest.importorskip("matplotlib")
    from mmolre.report import plot_sweep, variants
    models = [{"model": "mmolre"}, {"model": "hard_sharing"}, {"model": "mmoe"},
              {"model": "mmolre", "shared_experts": False}, {"model": "mmolre", "routers": False}]
    dirs = [_run(tmp_path, f"v{i}s{seed}", 8, 2, seed, 0.5 + 0.1 * i + 0.01 * seed, **m)
            for i, m in enumerate(models) for seed in (1, 2)]
    runs = load_runs(dirs)
    groups = variants(runs)
    assert len(groups) == 5 and all(len(v) == 2 for v in groups.values())
    assert any("model=hard_sharing" in name for name in groups)
    import matplotlib.pyplot as plt
    drawn = []
    real_errorbar = plt.Axes.errorbar

    def spy(ax, xs, ys, *a, **kw):
        drawn.append((kw["label"], list(ys)))
        return real_errorbar(ax, xs, ys, *a, **kw)
    plt.Axes.errorbar = spy
    try:
        written = plot_sweep(runs, str(tmp_path / "fig"))
    finally:
        plt.Axes.errorbar = real_errorbar
    assert len(drawn) == 5 and len({ys[0] for _, ys in drawn}) == 5   # five lines, each its own mean
    assert all((tmp_path / p.split("/")[-1]).exists() for p in written)
