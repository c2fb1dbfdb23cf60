"""Routing options in real runs through the `deepspeed` launcher: 1024 experts under expert parallelism 2,
aux_free balancing with 2 processes against 1, the specialisation statistics in results.json and
TensorBoard."""
import numpy as np
import pytest
import torch

from mmolre.export import export

from tests.launcher import final_weights, results, run_deepspeed
from tests.launcher import scalars


def _biases(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith("gate.selection_bias")}


def test_1024_experts_with_expert_parallelism_2_train_under_two_processes(tmp_path):
    proc = run_deepspeed(tmp_path, "--run_name", "wide", "--num_experts", "1024", "--ep_size", "2", "--top_k", "2",
                         "--epochs", "1", "--max_steps", "4", "--log_every", "1", "--balance", "aux_free",
                         "--router_z_loss", "0.001", "--router_lr_scale", "3", "--emotion_pos_weight", "prevalence")
    run = tmp_path / "runs" / "wide"
    r = results(run)
    assert r["num_experts"] == 1024 and r["ep_size"] == 2 and r["global_step"] == 4
    per_expert = r["params"]["per_expert"]
    assert r["params"]["expert"] == 1024 * per_expert * len(r["history"][0]["dead_experts"])
    assert r["params"]["expert_bytes_per_rank"] == r["params"]["expert"] // 2 * 4   # 512 experts per rank, fp32
    # 4 steps of 16 utterances x 2 tasks x top-2 cannot reach 1024 experts: the log says which layers have dead ones
    dead = r["history"][0]["dead_experts"]
    assert all(n >= 1024 - 4 * 16 * 2 * 2 for n in dead.values()), dead
    assert "shared experts that received no row" in proc.stdout and "text.0" in proc.stdout
    assert "emotion BCE: present cases weighted by (1 - prevalence) / prevalence: happy" in proc.stdout
    summary, valid = r["routing"]["summary"], r["routing"]["valid"]
    assert set(valid) == set(dead)
    assert summary["task_divergence"] == pytest.approx(np.mean([v["task_divergence"] for v in valid.values()]))
    assert summary["sentiment_label_mi_excess"] == pytest.approx(
        summary["sentiment_label_mi"] - summary["sentiment_label_mi_chance"])
    # the validation rows' experts: at most 2 per row per task, the rest unused
    rows = r["history"][0]["valid"]["samples"]
    assert all(v[t]["experts_used"] <= 2 * rows for v in valid.values() for t in ("sentiment", "emotion"))
    assert summary["dead_experts"] == sum(dead.values())
    assert set(r["routing"]["test"]) == set(dead)                   # every MoE layer, per task
    assert [s for s, _ in scalars(run, "loss/router_z")] == [1, 2, 3, 4]
    assert scalars(run, "routing/text.0/task_divergence") and scalars(run, "routing/dead_experts/text.0")
    _, weights = final_weights(run)
    biases = _biases(weights)
    assert biases and all(b.shape == (2, 1024) and b.abs().sum() > 0 for b in biases.values())
    # the export keeps the biases (they are part of the routing an exported model does)
    exported = export(str(run), str(tmp_path / "wide"), tag="latest")["state_dict"]
    for key, bias in biases.items():
        assert torch.equal(exported[key], bias.float()), key


def test_aux_free_biases_with_two_processes_equal_one_process(tmp_path):
    """The nudge counts every rank's routes (one all-reduce), so 2 processes x 8 take the steps of 1 x 16."""
    same = ["--dropout", "0", "--epochs", "1", "--max_steps", "6", "--balance", "aux_free",
            "--balance_bias_rate", "0.01"]
    run_deepspeed(tmp_path, "--run_name", "two", "--batch_size", "8", *same, procs=2)
    run_deepspeed(tmp_path, "--run_name", "one", "--batch_size", "16", *same, procs=1)
    _, two = final_weights(tmp_path / "runs" / "two")
    _, one = final_weights(tmp_path / "runs" / "one")
    b2, b1 = _biases(two), _biases(one)
    assert b1.keys() == b2.keys() and len(b1) == 6                  # 3 modalities x 2 blocks
    for key in b1:
        assert b1[key].abs().max() > 0
        torch.testing.assert_close(b2[key], b1[key], rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")
    assert results(tmp_path / "runs" / "two")["config"]["model"]["balance"] == "aux_free"
    # switching the balancing rule on a resume is refused, saying why (the biases are part of the model)
    proc = run_deepspeed(tmp_path, "--run_name", "one", "--batch_size", "16", *same[:-4], "--epochs", "2",
                         "--resume", procs=1, check=False)
    assert proc.returncode != 0 and "was saved with --balance aux_free" in proc.stdout + proc.stderr
