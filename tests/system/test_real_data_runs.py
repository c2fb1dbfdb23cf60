"""Real-data formats in real 2-process runs: mixed datasets, a dataset without emotion labels."""
import json

from tests.mmsa_files import SIZES, csd, dump, mmsa, sdk_labels_for


def test_two_processes_train_on_a_mixed_dataset_and_report_each_dataset(tmp_path):
    from tests.launcher import run_deepspeed
    mosi = dump(tmp_path / "mosi.pkl", mmsa(seed=1))
    raw = mmsa(seed=2)
    mosei = dump(tmp_path / "mosei.pkl", raw)   # sentiment only, as MMSA publishes MOSEI; emotions from the SDK
    labels = csd(tmp_path / "CMU_MOSEI_Labels.csd", sdk_labels_for(raw))
    proc = run_deepspeed(tmp_path, "--dataset", "mosi+mosei", "--data_path", f"{mosi},{mosei}", "--ep_size", "2",
                         "--emotion_labels", labels, "--epochs", "2", "--run_name", "mixed")
    assert "data: mosi: no emotion labels (sentiment only)" in proc.stdout
    assert "data: mosei: emotion labels joined from" in proc.stdout and "test: 6 of 6 samples labelled" in proc.stdout
    with open(tmp_path / "runs" / "mixed" / "results.json") as f:
        results = json.load(f)
    assert results["world_size"] == 2 and results["ep_size"] == 2
    per = results["test"]["per_dataset"]
    assert per["mosi"]["samples"] == per["mosei"]["samples"] == SIZES["test"]
    assert "emotion" not in per["mosi"] and "emotion" in per["mosei"]
    assert results["test"]["samples"] == 2 * SIZES["test"]
    assert set(results["data"]) == {"mosi", "mosei"}
    assert results["data"]["mosi"]["splits"]["train"]["nonfinite_replaced"] == {"audio": 2}
    ids = (tmp_path / "runs" / "mixed" / "predictions_test.csv").read_text()
    assert "mosi/vidtest0$_$0" in ids and "mosei/vidtest0$_$0" in ids
    assert "mosei (6 test samples)" in proc.stdout


def test_a_dataset_without_emotion_labels_shows_no_emotion_loss(tmp_path):
    """MOSI has no emotions: the progress bar and TensorBoard show no emotion loss (it was an exact -0.0)."""
    from tests.launcher import run_deepspeed
    from tests.launcher import scalars
    mosi = dump(tmp_path / "mosi.pkl", mmsa(seed=1))
    proc = run_deepspeed(tmp_path, "--dataset", "mosi", "--data_path", mosi, "--epochs", "2", "--log_every", "1",
                         "--batch_size", "4", "--run_name", "mosi")
    run = tmp_path / "runs" / "mosi"
    assert "mae=" in proc.stderr and "bce=" not in proc.stderr
    assert scalars(run, "loss/sentiment") and "loss/emotion" not in _scalar_tags(run)


def _scalar_tags(run) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return acc.Tags()["scalars"]
