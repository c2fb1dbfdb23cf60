"""results.json assembled by a pure function from a run's parts, and what a run writes (`results.py`)."""
import csv
import json

import numpy as np

from mmolre.config import EMOTIONS, RunConfig
from mmolre.evaluate import EvalResult
from mmolre.metrics import baselines
from mmolre.results import assemble_results, format_table, run_records, write_records, write_results
from mmolre.train_state import TrainState
from tests.mmsa_files import dump, mmsa, prepared


def test_results_json_holds_the_selected_epoch_and_the_test_pass(tmp_path):
    data = prepared(tmp_path, dataset="mmsa", data_path=dump(tmp_path / "d.pkl", mmsa(emotions=True)))
    cfg = RunConfig()
    state = TrainState(epoch=2, global_step=20, train_seconds=4.0, train_samples=400, best_epoch=1,
                       best_tag="step00000010",
                       history=[{"epoch": 1, "step": 10, "valid": {"loss": 0.5}, "routing": None},
                                {"epoch": 2, "step": 20, "valid": {"loss": 0.7}}])
    n = 6
    rng = np.random.default_rng(0)
    preds = {"ids": [f"t{i}" for i in range(n)], "sentiment_true": rng.uniform(-3, 3, n),
             "sentiment_pred": np.zeros(n), "has_emotion": np.array([1, 1, 0, 1, 0, 1]),
             "emotion_true": rng.uniform(0, 3, (n, 6)), "emotion_prob": rng.uniform(0, 1, (n, 6))}
    test = EvalResult(0.9, {"sentiment": {"mae": 0.9}}, preds, None)
    results = assemble_results(cfg, data, world_size=2, ep_size=2, params={"total": 10}, state=state, test=test,
                               decisions=None, made_by={"versions": {"torch": "x"}, "git_commit": "abc"})
    assert results["valid"] == {"loss": 0.5} and results["best_checkpoint"] == "step00000010"
    assert results["train"]["samples_per_s"] == 100.0 and results["train"]["epochs"] == 2
    assert results["versions"] == {"torch": "x"} and results["git_commit"] == "abc"
    assert results["routing"]["summary"] is None and results["synthetic"] is False
    train = data.splits["train"].hf
    labelled = np.asarray(train["has_emotion"], bool)
    assert labelled.all()     # (mmsa(emotions=True): every train row has emotion labels)
    expected = baselines(np.asarray(train["sentiment"]), np.asarray(train["emotions"]), preds["sentiment_true"],
                         preds["emotion_true"][preds["has_emotion"].astype(bool)])
    assert results["baselines"] == expected
    json.dumps(results)   # serialisable as it is

    write_results(str(tmp_path), results | {"test": {"sentiment": {k: 0.5 for k in (
        "has0_acc2", "has0_f1", "non0_acc2", "non0_f1", "acc5", "acc7", "mae", "corr")}}},
        preds, dict(zip(EMOTIONS, [0.5] * 6)))
    rows = list(csv.DictReader(open(tmp_path / "predictions_test.csv")))
    assert [r["id"] for r in rows] == sorted(preds["ids"]) and "fear_pred" in rows[0]
    assert json.loads((tmp_path / "results.json").read_text())["best_epoch"] == 1


def test_the_records_hold_what_export_and_predict_read(tmp_path):
    data = prepared(tmp_path, dataset="mmsa", data_path=dump(tmp_path / "d.pkl", mmsa()))
    records = run_records(RunConfig(), {"train_micro_batch_size_per_gpu": 8}, data)
    assert records["config.json"]["ds_config"] == {"train_micro_batch_size_per_gpu": 8}
    assert records["data_meta.json"]["shapes"] == {m: list(s) for m, s in data.shapes.items()}
    write_records(str(tmp_path / "run"), records)
    assert json.loads((tmp_path / "run" / "data_meta.json").read_text())["synthetic"] is False


def test_the_table_says_synthetic_and_shows_the_decision_rules():
    s = {k: 0.5 for k in ("has0_acc2", "has0_f1", "non0_acc2", "non0_f1", "acc5", "acc7", "mae", "corr")}
    e = {"micro_f1": 0.4, "jaccard_acc": 0.3, "mean_wacc": 0.6, "mean_wf1": 0.7}
    results = {"synthetic": True, "test": {"sentiment": s, "emotion": e},
               "baselines": {"majority_non0_acc2": 0.5, "mean_mae": 1.1},
               "emotion_decisions": {"test_single_threshold": e, "test_per_emotion_thresholds": e,
                                     "baselines": {"best_constant": e}}}
    table = format_table(results)
    assert "test metrics (SYNTHETIC DATA)" in table and "| MMoLRE, one threshold (valid) | 0.4000 |" in table


def test_the_hparams_record_holds_the_changed_flags_the_layout_and_the_final_metrics():
    from mmolre.config import parse_args
    from mmolre.results import hparams_record
    cfg = parse_args(["--num_experts", "64", "--lr", "0.003", "--modalities", "text,audio", "--run_name", "sweep_3",
                      "--output_dir", "/scratch/runs", "--log_every", "7"])
    results = {"world_size": 2, "ep_size": 2, "best_epoch": 2,
               "history": [{"valid_loss": 1.5}, {"valid_loss": 1.25}],
               "test": {"sentiment": {"mae": 0.5, "corr": 0.75, "has0_acc2": 0.8}}}
    hparams, metrics = hparams_record(cfg, results)
    assert hparams["num_experts"] == 64 and hparams["lr"] == 0.003 and hparams["modalities"] == "text,audio"
    assert hparams["world_size"] == 2 and hparams["ep_size"] == 2 and hparams["top_k"] == cfg.model.top_k
    assert "epochs" not in hparams and "dropout" not in hparams   # at their defaults: left out
    assert not {"run_name", "output_dir", "log_every"} & set(hparams)   # name or run a run: not hyper-parameters
    assert hparams["ds_config"] == "zero2.json"   # precision, clipping and ZeRO stage live there
    assert metrics == {"metrics_final/valid_loss": 1.25, "metrics_final/test_mae": 0.5, "metrics_final/test_corr": 0.75,
                       "metrics_final/test_has0_acc2": 0.8}   # no emotion labels: no emotion metric


def test_patience_stops_after_that_many_epochs_without_a_lower_validation_loss_and_says_so():
    from mmolre.config import TrainConfig
    from mmolre.results import epoch_line, stops_early
    t = TrainConfig(epochs=10, patience=2)
    state = TrainState()
    valid = EvalResult(loss=0.0, metrics={"sentiment": {"mae": 0.5, "non0_acc2": 0.7}}, predictions={})
    stopped_at = None
    for epoch, loss in enumerate([1.0, 0.9, 0.95, 0.91, 0.8, 0.7], 1):   # epochs 3 and 4: no new best
        state.epoch = epoch
        state.record_validation(f"step{epoch}", loss)
        if stops_early(state, t):
            stopped_at = epoch
            break
    assert stopped_at == 4 and state.best_epoch == 2
    assert "early stop: no lower validation loss in the 2 epoch(s) since epoch 2 (--patience 2)" in epoch_line(state,
                                                                                                          valid, t)
    assert not stops_early(state, TrainConfig(epochs=10, patience=0))   # off
    assert not stops_early(state, TrainConfig(epochs=4, patience=2))    # the last epoch: not "early"
    state.epoch, state.best_epoch = 3, 2
    assert not stops_early(state, t) and "early stop" not in epoch_line(state, valid, t)


def test_each_epoch_records_what_validation_and_its_checkpoint_cost_beside_its_training():
    from mmolre.config import TrainConfig
    from mmolre.results import epoch_line, epoch_overhead
    state = TrainState(epoch=2, best_epoch=2)
    state.epoch_seconds = [{"epoch": 1, "train": 3.0, "validate": 0.5},   # resumed from its checkpoint: save untimed
                           {"epoch": 2, "train": 3.5, "validate": 0.25, "checkpoint": 0.25}]
    valid = EvalResult(loss=0.0, metrics={"sentiment": {"mae": 0.5, "non0_acc2": 0.7}}, predictions={})
    assert epoch_line(state, valid, TrainConfig()).endswith("| 3.5 s training, 0.25 s validation, 0.25 s checkpoint")
    assert epoch_overhead(state.epoch_seconds) == 0.5 / 4.0
    assert epoch_overhead([{"epoch": 1, "train": 1.0, "validate": 0.1}]) is None
