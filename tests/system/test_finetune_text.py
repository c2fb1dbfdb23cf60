"""The text encoder trained end to end in real 2-process runs through the deepspeed launcher."""
import shutil

import pytest
import torch

from tests.tiny_encoder import MAX_LENGTH, transcripts_pickle


def finetune_args(data: str, encoder: str) -> list[str]:
    return ["--dataset", "mosi", "--data_path", data, "--text_encoder", encoder, "--finetune_text",
            "--text_max_length", str(MAX_LENGTH), "--ep_size", "2", "--batch_size", "4", "--epochs", "2",
            "--save_every", "2", "--keep_checkpoints", "10", "--text_lr", "1e-3", "--text_warmup_ratio", "0.5",
            "--log_every", "1"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_encoder):
    from tests.launcher import run_deepspeed
    tmp = tmp_path_factory.mktemp("finetune")
    data = transcripts_pickle(tmp)
    proc = run_deepspeed(tmp, "--run_name", "ft", *finetune_args(data, tiny_encoder))
    return tmp, data, tmp / "runs" / "ft", proc


def test_two_processes_train_the_encoder_end_to_end(finetuned, tiny_encoder):
    import transformers
    from tests.launcher import final_weights, results
    from tests.launcher import scalars
    _, _, run, proc = finetuned
    assert f"transcripts tokenized for {tiny_encoder} (at most {MAX_LENGTH} tokens" in proc.stdout
    r = results(run)
    assert r["world_size"] == 2 and r["ep_size"] == 2 and r["global_step"] == 2 * 4   # 32 / (4 x 2) per epoch
    # the text encoder's own peak LR and warm-up, as the engine applied them: 64 samples in steps of 8, its
    # warm-up half of them (4 steps), the model's 5 % (one step)
    lr, lr_text = dict(scalars(run, "train/lr")), dict(scalars(run, "train/lr_text"))
    assert lr[1] == lr[2] == pytest.approx(2e-3) and lr[3] < 2e-3
    assert [lr_text[s] for s in (1, 2, 3, 4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3]) and lr_text[6] < lr_text[5]
    _, state = final_weights(run)
    pretrained = transformers.AutoModel.from_pretrained(tiny_encoder).state_dict()
    ours = {k[len("text_backbone.model."):]: v for k, v in state.items() if k.startswith("text_backbone.model.")}
    assert set(ours) == {k for k in pretrained if not k.startswith("pooler.")}   # the unused pooler is left out
    for k in ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
              "encoder.layer.0.output.dense.weight"]:
        assert not torch.allclose(ours[k], pretrained[k]), k


def test_a_finetune_run_resumes_from_a_mid_run_checkpoint_bit_identically(finetuned, tiny_encoder):
    from tests.launcher import complete_tags, final_weights, results, run_deepspeed
    tmp, data, ref, _ = finetuned
    run = tmp / "runs" / "resumed"
    shutil.copytree(ref, run)
    tags = complete_tags(run)
    assert "step00000006" in tags
    for tag in tags[tags.index("step00000006") + 1:]:   # back to step 6, mid 2nd epoch, as if it had died there
        shutil.rmtree(run / "checkpoints" / tag)
    (run / "results.json").unlink()
    proc = run_deepspeed(tmp, "--run_name", "resumed", *finetune_args(data, tiny_encoder), "--resume")
    assert "resumed from" in proc.stdout and "step 6" in proc.stdout
    assert results(run)["test"] == results(ref)["test"] and results(run)["history"] == results(ref)["history"]
    (tag_a, a), (tag_b, b) = final_weights(ref), final_weights(run)
    assert tag_a == tag_b and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_export_then_predict_reads_the_transcripts_like_the_trainer(finetuned, tmp_path):
    import csv
    import subprocess
    import sys
    from tests.launcher import ROOT, environment
    tmp, data, run, _ = finetuned
    env = {**environment(tmp_path), "WORLD_SIZE": "", "RANK": ""}
    cli = [sys.executable, "-m", "mmolre.cli"]
    subprocess.run([*cli, "export", str(run), str(tmp_path / "model")], cwd=ROOT, env=env, check=True)
    subprocess.run([*cli, "predict", str(tmp_path / "model"), data, "--out", str(tmp_path / "pred.csv")],
                   cwd=ROOT, env=env, check=True)
    trainer = {r["id"]: r for r in csv.DictReader(open(run / "predictions_test.csv"))}
    exported = {r["id"]: r for r in csv.DictReader(open(tmp_path / "pred.csv"))}
    assert trainer.keys() == exported.keys() and len(trainer) == 8
    for sid, row in trainer.items():
        assert float(exported[sid]["sentiment_pred"]) == pytest.approx(float(row["sentiment_pred"]), abs=1e-4), sid
    import json   # another tokenizer under the recorded name is refused, not used
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["text_encoder"]["tokenizer_sha256_12"] = "0" * 12
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([*cli, "predict", str(tmp_path / "model"), data, "--out", str(tmp_path / "p2.csv")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "is not the one this model was trained with" in proc.stderr
