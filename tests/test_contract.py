"""The task contract as declared data: tasks are frozen dataclasses stored as plain options; what a
task learns or needs is returned; checkpoints and options are checked before any work starts."""

import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from conftest import REPO, reversal_rows, write_jsonl
from finetune.chat import ChatFormat, GenerationSettings
from finetune.checkpointing import check_checkpoint
from finetune.cli import main
from finetune.columns import declared_columns
from finetune.errors import InputError
from finetune.lora import LoraSettings
from finetune.preflight import check_monitors
from finetune.registry import build_task
from tasks.classification import TextClassification
from tasks.question_answering import QuestionAnswering
from tasks.summarization import Summarization
from tasks.translation import Translation


@pytest.mark.parametrize("task", [TextClassification(labels=["a", "b"], max_length=64), QuestionAnswering(n_best=5),
                                  Summarization(chat=ChatFormat(system_prompt="Be brief."),
                                                generation=GenerationSettings(num_beams=4)),
                                  Translation(source_lang="en", target_lang="de")])
def test_a_task_is_its_options(task):
    config = task.config()
    assert config["init_args"] == dataclasses.asdict(task)
    assert build_task(config) == task  # (nested settings come back as their dataclass)
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.stash = 1  # nothing can be kept on a task between hooks


def test_learned_options_are_returned_not_stored():
    task = TextClassification()
    learned = task.learn({"label": ["pos", "neg", "pos"]})
    assert learned == {"labels": ["neg", "pos"]} and task.labels is None
    assert task.with_options(**learned).labels == ["neg", "pos"]
    assert TextClassification(labels=["x", "y"]).learn({"label": ["pos"]}) == {}


def test_declared_columns_skip_unset_options_and_targets_on_predict():
    task = TextClassification(text_pair_column=None)
    assert [name for _, name in declared_columns(task, "train")] == ["text", "label"]
    assert [name for _, name in declared_columns(task, "predict")] == ["text"]


def test_generation_scores_in_standalone_evaluation_and_every_n_epochs_of_a_fit():
    task = Translation(generate_every_n_epochs=2)
    assert [task.computes_metrics("val", epoch) for epoch in range(4)] == [False, True, False, True]
    assert task.computes_metrics("val", None) and task.computes_metrics("test", None)  # `finetune validate` / `test`
    assert not Translation(generate_every_n_epochs=0).computes_metrics("val", 3)


def test_a_monitored_metric_some_validations_skip_is_refused_before_training(tiny_t5, tmp_path, capsys):
    """Lightning stops a fit with a traceback after the first validation that lacks a monitored metric; the
    config that would do so (a checkpoint on val/rougeL, ROUGE every 2nd epoch) stops before training instead."""
    rows = reversal_rows()
    train, val = write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", rows)
    args = ["fit", "--config", str(REPO / "configs" / "summarization.yaml"), f"--model.backbone={tiny_t5}",
            "--model.task.init_args.source_column=source", "--model.task.init_args.target_column=target",
            f"--data.train_file={train}", f"--data.val_file={val}", "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'runs'}"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--model.task.init_args.generate_every_n_epochs=2"])
    assert exit_.value.code == 2
    assert ("trainer.callbacks: RunCheckpoint monitors 'val/rougeL', which Summarization does not compute in the "
            "validation of epoch 1") in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))
    # validating every 2nd epoch only, or monitoring the loss, is consistent
    check_monitors(SimpleNamespace(max_epochs=4, check_val_every_n_epoch=2, callbacks=[ModelCheckpoint(
        monitor="val/rougeL")]), Summarization(generate_every_n_epochs=2))
    check_monitors(SimpleNamespace(max_epochs=-1, check_val_every_n_epoch=1, callbacks=[EarlyStopping(
        monitor="val/loss")]), Summarization(generate_every_n_epochs=0))
    with pytest.raises(InputError, match="EarlyStopping monitors 'val/bleu', which Translation does not compute in "
                                         "the validation of epoch 1"):
        check_monitors(SimpleNamespace(max_epochs=None, check_val_every_n_epoch=None, callbacks=[EarlyStopping(
            monitor="val/bleu")]), Translation(generate_every_n_epochs=0))


def test_evaluation_without_a_label_set_is_named():
    with pytest.raises(InputError, match=r"model.task.init_args.labels: no label set; give it, or a checkpoint"):
        TextClassification().check_rows("val", {"label": ["a"]}, "data.val_file (v.jsonl)")


@pytest.mark.parametrize("settings, message", [
    ({"r": 0}, r"model.lora.r: the LoRA rank must be at least 1, got 0"),
    ({"dropout": 1.5}, r"model.lora.dropout: must be in \[0, 1\)"),
])
def test_bad_lora_settings_name_the_key(settings, message, tiny_bert, capsys):
    with pytest.raises(InputError, match=message):
        LoraSettings(**settings)
    # through the command: jsonargparse re-raises the constructor's error as its own; finetune finds it
    options = [f"--model.lora.{key}={value}" for key, value in settings.items()]
    with pytest.raises(SystemExit) as exit_:
        main(["fit", f"--model.backbone={tiny_bert}", "--model.task=TextClassification", *options])
    assert exit_.value.code == 2
    assert re.match("finetune: error: " + message, capsys.readouterr().err)


def test_bad_batch_size_is_named():
    from finetune.data import DataModule

    for size in (0, -1):
        with pytest.raises(InputError, match=rf"data.batch_size: must be at least 1, got {size}"):
            DataModule(batch_size=size)


def checkpoint_file(path, **content):
    torch.save({"state_dict": {}, **content}, path)
    return str(path)


def test_checkpoints_are_checked_before_anything_loads(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(InputError, match=r"notes.ckpt' is not a checkpoint"):
        check_checkpoint(str(text))
    old = checkpoint_file(tmp_path / "old.ckpt", hyper_parameters={"task": {"class_path": "x.TextClassification"}})
    with pytest.raises(InputError, match=r"old.ckpt' was written by a finetune of an earlier format"):
        check_checkpoint(old)
    qa = checkpoint_file(tmp_path / "qa.ckpt", finetune_format=2,
                         hyper_parameters={"task": {"class_path": "tasks.question_answering.QuestionAnswering"}})
    config = SimpleNamespace(task=SimpleNamespace(class_path="tasks.classification.TextClassification"))
    with pytest.raises(InputError, match=r"holds a QuestionAnswering model, but the config's model.task is "
                                         r"TextClassification"):
        check_checkpoint(qa, config)
    check_checkpoint(qa)  # no task named: the checkpoint's is used
    sft = checkpoint_file(tmp_path / "sft.ckpt", finetune_format=2,
                          hyper_parameters={"task": {"class_path": "tasks.instruction_tuning.InstructionTuning"}})
    with pytest.raises(InputError, match=r"holds an InstructionTuning model, but the config's model.task is "):
        check_checkpoint(sft, config)
    with pytest.raises(InputError, match=r"--ckpt_path: '.*missing.ckpt' does not exist"):
        check_checkpoint(str(tmp_path / "missing.ckpt"))


def test_task_options_typed_on_the_command_line_are_checked_and_kept_as_typed(tiny_bert, capsys):
    """The CLI types a task's options from its dataclass fields: a wrong type is refused, naming the option (not
    accepted as garbage, as when jsonargparse cannot resolve the fields' annotations: `from __future__ import
    annotations` in a task module). A value holding `: ` reads as YAML: JSON
    keeps it a string."""
    import yaml

    from finetune.cli import main

    common = ["fit", f"--model.backbone={tiny_bert}", "--model.task=Translation"]
    with pytest.raises(SystemExit):
        main([*common, "--model.task.max_source_length=abc"])
    assert "max_source_length" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, "--model.task.prompt=Translate: {source}"])
    assert "Parser key \"prompt\":\n          Expected a <class 'str'>" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*common, '--model.task.init_args={"prompt": "Translate: {source}"}', "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["task"]["init_args"]["prompt"] == "Translate: {source}"
