"""End to end through the CLI on a tiny backbone: fit, checkpoints, resume, predict, export."""

import csv
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from conftest import fit_args, make_rows, write_jsonl
from finetune.cli import main, run
from finetune.module import FineTuneModule


def checkpoints(root: Path) -> dict[str, Path]:
    return {p.name: p for p in root.rglob("*.ckpt")}


def epoch_metrics(root: Path) -> list[dict]:
    (path,) = root.rglob("metrics.csv")
    return [row for row in csv.DictReader(path.open()) if row.get("train/loss_epoch")]


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory):
    """One LoRA fit shared by the tests below (keeps the suite fast)."""
    root = tmp_path_factory.mktemp("fit")
    files = {
        "train": write_jsonl(root / "train.jsonl", make_rows(96, seed=1)),
        "val": write_jsonl(root / "val.jsonl", make_rows(30, seed=2)),
        "predict": write_jsonl(root / "predict.jsonl", [{"text": r["text"]} for r in make_rows(13, seed=3)]),
        "predict_labels": [r["label"] for r in make_rows(13, seed=3)],
    }
    cli = run(fit_args(tiny_bert, files, root, "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={root}"))
    (ckpt,) = checkpoints(root).values()
    return {"root": root, "files": files, "cli": cli, "ckpt": ckpt}


def test_fit_learns_the_task(trained):
    losses = [float(row["train/loss_epoch"]) for row in epoch_metrics(trained["root"])]
    assert len(losses) == 5 and losses[-1] < 0.75 * losses[0]
    assert trained["cli"].trainer.callback_metrics["val/accuracy"] >= 0.6  # chance: 0.33


def test_checkpoint_holds_only_what_was_trained(trained, tiny_bert):
    ckpt = torch.load(trained["ckpt"], weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys and all(("lora_" in k) or ("classifier.modules_to_save" in k) for k in keys)
    module = trained["cli"].model
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    saved = sum(v.numel() for v in ckpt["state_dict"].values())
    assert saved == sum(p.numel() for p in module.parameters() if p.requires_grad) < 0.2 * frozen
    task = ckpt["hyper_parameters"]["task"]
    assert task["class_path"] == "tasks.classification.TextClassification"
    assert task["init_args"]["labels"] == ["neg", "neu", "pos"]  # the label mapping travels with it
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]


def test_validate_from_checkpoint_reproduces_the_fit_metrics(trained, tiny_bert):
    cli = run(["validate", f"--model.backbone={tiny_bert}", "--model.task=classification",
               f"--ckpt_path={trained['ckpt']}", f"--data.val_file={trained['files']['val']}",
               "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={trained['root']}/validate"])
    fit_metrics = trained["cli"].trainer.callback_metrics
    assert cli.trainer.callback_metrics["val/accuracy"] == pytest.approx(float(fit_metrics["val/accuracy"]), abs=1e-6)
    assert cli.model.task.labels == ["neg", "neu", "pos"]


def test_predict_writes_one_json_line_per_input_in_order(trained, tiny_bert, tmp_path):
    out = tmp_path / "sub" / "predictions.jsonl"
    main(["predict", f"--model.backbone={tiny_bert}", "--model.task=classification",
          f"--ckpt_path={trained['ckpt']}", f"--data.predict_file={trained['files']['predict']}",
          f"--predictions.output_file={out}", "--data.batch_size=4", "--trainer.enable_progress_bar=false",
          f"--trainer.default_root_dir={tmp_path}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 13
    for row in rows:
        assert row["label"] in {"neg", "neu", "pos"}
        assert row["score"] == max(row["probabilities"].values())
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    # input order: the predictions line up with the (hidden) labels of the inputs
    correct = sum(row["label"] == label for row, label in zip(rows, trained["files"]["predict_labels"]))
    assert correct >= 7  # chance: 4.3


def test_export_gives_identical_logits(trained, tiny_bert, tmp_path):
    main(["export", f"--ckpt_path={trained['ckpt']}", f"--output_dir={tmp_path}"])
    module = FineTuneModule.load_from_checkpoint(trained["ckpt"], map_location="cpu", weights_only=True).eval()
    batch = module.tokenizer(["good great nice", "river stone door lamp", "awful"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = module.model(**batch).logits
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
        adapter = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(adapter(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    assert merged.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not list(tmp_path.rglob("*.bin"))


def test_resume_continues_at_the_same_step_lr_and_weights(tiny_bert_no_dropout, toy_files, tmp_path):
    every_epoch = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_top_k=-1",
                   "--trainer.callbacks.filename={epoch}", "--model.lora.dropout=0.0", "--trainer.max_epochs=3"]
    run(fit_args(tiny_bert_no_dropout, toy_files, tmp_path / "a", *every_epoch,
                 f"--trainer.callbacks.dirpath={tmp_path / 'a'}"))
    run(fit_args(tiny_bert_no_dropout, toy_files, tmp_path / "b", *every_epoch,
                 f"--trainer.callbacks.dirpath={tmp_path / 'b'}", f"--ckpt_path={tmp_path / 'a' / 'epoch=0.ckpt'}"))
    a = torch.load(tmp_path / "a" / "epoch=2.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b" / "epoch=2.ckpt", weights_only=True)
    assert not (tmp_path / "b" / "epoch=0.ckpt").exists()  # b really started from a's first epoch
    assert a["global_step"] == b["global_step"] == 36
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"]
    assert a["optimizer_states"][0]["param_groups"][0]["lr"] == b["optimizer_states"][0]["param_groups"][0]["lr"]
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, atol=1e-6, rtol=1e-5)


def test_multi_label_fit_and_predict(tiny_bert, tmp_path):
    rows = [{"text": r["text"] + " " + s["text"], "tags": sorted({r["label"], s["label"]})}
            for r, s in zip(make_rows(60, seed=4), make_rows(60, seed=5)[::-1])]
    files = {"train": write_jsonl(tmp_path / "t.jsonl", rows), "val": write_jsonl(tmp_path / "v.jsonl", rows[:20])}
    cli = run(fit_args(tiny_bert, files, tmp_path, "--model.task=TextClassification",
                       "--model.task.multi_label=true", "--model.task.label_column=tags", "--trainer.max_epochs=2"))
    metrics = cli.trainer.callback_metrics
    for name in ["val/accuracy", "val/exact_match", "val/f1_macro", "val/f1/neg", "val/f1/neu", "val/f1/pos"]:
        assert 0.0 <= float(metrics[name]) <= 1.0
    predictions = cli.model.predict_step(next(iter(cli.datamodule.val_dataloader())), 0)
    assert set(predictions[0]["probabilities"]) == {"neg", "neu", "pos"}
    assert all(isinstance(p["labels"], list) for p in predictions)


def test_print_config_shows_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(Path(__file__).parents[1] / "configs" / "classification.yaml"), "--print_config"])
    out = capsys.readouterr().out
    for key in ["backbone: sentence-transformers/all-MiniLM-L6-v2",
                "class_path: tasks.classification.TextClassification", "use_dora: false",
                "class_path: torch.optim.AdamW", "group_by_length: true", "output_file:"]:
        assert key in out
