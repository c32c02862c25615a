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
from finetune.cli import main, run
from finetune.columns import declared_columns
from finetune.errors import InputError
from finetune.lora import LoraSettings
from finetune.module import CHECKPOINT_FORMAT
from finetune.preflight import check_monitors, without_validation
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


def test_without_validation_data_a_ranked_checkpoint_keeps_last_and_early_stopping_is_refused(caplog):
    """(issue 25: a fit without data.val_file that monitors val/accuracy printed only Lightning's warnings)"""
    checkpoint = ModelCheckpoint(monitor="val/accuracy", mode="max", save_top_k=-1, save_last=False)
    trainer = SimpleNamespace(max_epochs=2, check_val_every_n_epoch=1, limit_val_batches=1.0, callbacks=[checkpoint])
    without_validation(trainer)
    assert (checkpoint.save_top_k, checkpoint.save_last, trainer.limit_val_batches) == (0, True, 0)
    assert ("No validation data (data.val_file): ModelCheckpoint keeps last.ckpt only (it ranks checkpoints by "
            "'val/accuracy', which only validation reports)") in caplog.messages
    trainer.callbacks.append(EarlyStopping(monitor="val/loss"))
    with pytest.raises(InputError, match=r"^trainer.callbacks: EarlyStopping monitors 'val/loss', but the run has no "
                                         r"validation data; give data.val_file, or remove the callback$"):
        without_validation(trainer)


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
    format_2 = checkpoint_file(tmp_path / "f2.ckpt", finetune_format=2)  # (before the chat options were nested)
    with pytest.raises(InputError, match=r"f2.ckpt' was written by a finetune of format 2; this version reads "
                                         r"format 3"):
        check_checkpoint(format_2)
    qa = checkpoint_file(tmp_path / "qa.ckpt", finetune_format=CHECKPOINT_FORMAT,
                         hyper_parameters={"task": {"class_path": "tasks.question_answering.QuestionAnswering"}})
    config = SimpleNamespace(task=SimpleNamespace(class_path="tasks.classification.TextClassification"))
    with pytest.raises(InputError, match=r"holds a QuestionAnswering model, but the config's model.task is "
                                         r"TextClassification"):
        check_checkpoint(qa, config)
    check_checkpoint(qa)  # no task named: the checkpoint's is used
    sft = checkpoint_file(tmp_path / "sft.ckpt", finetune_format=CHECKPOINT_FORMAT,
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
    assert capsys.readouterr().err.endswith(
        "error: model.task: option 'prompt' expects str, got \"{'Translate': {'source': None}}\"\n")
    with pytest.raises(SystemExit):
        main([*common, '--model.task.init_args={"prompt": "Translate: {source}"}', "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["task"]["init_args"]["prompt"] == "Translate: {source}"


@pytest.fixture(scope="module")
def trained(tiny_bert, tmp_path_factory) -> dict:
    """A LoRA (r 8) classifier fitted for one epoch, its checkpoint and its files."""
    from conftest import fit_args, make_rows

    root = tmp_path_factory.mktemp("trained")
    files = {"train": write_jsonl(root / "train.jsonl", make_rows(24, seed=1)),
             "val": write_jsonl(root / "val.jsonl", make_rows(8, seed=2)),
             "predict": write_jsonl(root / "predict.jsonl", [{"text": r["text"]} for r in make_rows(6, seed=3)])}
    run(fit_args(tiny_bert, files, root, "--trainer.max_epochs=1", "--trainer.logger=false",
                 "--model.lora.target_modules=null"))
    return {"ckpt": str(next(root.rglob("*.ckpt"))), "root": root, **files}


def test_a_checkpoint_alone_rebuilds_its_model_for_validate_test_and_predict(trained, tiny_bert, capsys):
    """No --config, no --model.backbone / --model.task: the checkpoint holds them (issue 25.12)."""
    alone, configured = trained["root"] / "alone.jsonl", trained["root"] / "configured.jsonl"
    main(["predict", f"--ckpt_path={trained['ckpt']}", f"--data.predict_file={trained['predict']}",
          f"--predictions.output_file={alone}", "--trainer.enable_progress_bar=false"])
    main(["predict", f"--ckpt_path={trained['ckpt']}", f"--data.predict_file={trained['predict']}",
          f"--model.backbone={tiny_bert}", "--model.task=TextClassification", f"--predictions.output_file={configured}",
          "--trainer.enable_progress_bar=false"])
    assert alone.read_text() == configured.read_text() and len(alone.read_text().splitlines()) == 6
    main(["validate", f"--ckpt_path={trained['ckpt']}", f"--data.val_file={trained['val']}",
          "--trainer.logger=false", "--trainer.enable_progress_bar=false"])
    assert re.search(r"val/accuracy\s+\S+", capsys.readouterr().out)


@pytest.mark.parametrize("option, message", [
    ("--model.lora.r=4", r"--model.lora.r 4: the checkpoint's weights were trained with 8; with --ckpt_path the "
                         r"backbone, the LoRA settings and the label set come from the checkpoint"),
    ('--model.task.labels=["x", "y"]', r"--model.task.labels \['x', 'y'\]: the checkpoint's weights were trained "
                                       r"with \['neg', 'neu', 'pos'\]"),
])
def test_weight_shaping_options_that_contradict_the_checkpoint_are_refused(trained, option, message, capsys):
    """A LoRA rank (or a label set) other than the checkpoint's cannot load its weights: one line, not 24 size
    mismatches (issue 25.8)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", f"--ckpt_path={trained['ckpt']}", f"--data.val_file={trained['val']}", option,
              "--trainer.logger=false"])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err.strip().splitlines()[-1])


@pytest.mark.parametrize("option, message", [
    ("--model.optimizer.init_args.lr=-0.1", r"^finetune: error: model.optimizer: Invalid learning rate: -0.1$"),
    ("--model.scheduler.init_args.warmup_ratio=1.5", r"^finetune: error: model.scheduler: .*warmup_ratio .*1.5$"),
])
def test_optimizer_and_scheduler_arguments_are_checked_before_anything_loads(tiny_bert, tmp_path, option, message,
                                                                              capsys):
    """A negative learning rate was torch's traceback after the model loaded and the data was tokenized (issue
    25.7): now the error comes first (here, before the missing training file is even looked at)."""
    with pytest.raises(SystemExit):
        main(["fit", f"--model.backbone={tiny_bert}", "--model.task=TextClassification", option,
              f"--data.train_file={tmp_path / 'missing.jsonl'}", "--trainer.logger=false"])
    assert re.search(message, capsys.readouterr().err.strip().splitlines()[-1])


@pytest.mark.parametrize("task", ["TextClassification", "QuestionAnswering", "Translation", "Summarization",
                                  "InstructionTuning", "PreferenceTuning", "tasks.verifiable_rewards.GRPO"])
def test_every_task_option_has_help_text(task, capsys):
    """`finetune fit --model.task.help CLASS` describes every option (from the class docstring's Args)."""
    from finetune.registry import import_registered_tasks

    import_registered_tasks()
    with pytest.raises(SystemExit):
        main(["fit", "--model.task.help", task])
    shown = capsys.readouterr().out
    blocks = re.split(r"\n(?=  --model\.task\.)", shown.split("\n\n", 2)[-1])[1:]
    assert len(blocks) >= 3
    undocumented = [block.split()[0] for block in blocks
                    if not re.sub(r"--model\.task\.\S+( \S+)?,?", "", block.split("(type:")[0]).strip()]
    assert not undocumented, f"options without help text: {undocumented}"


def test_the_usage_line_of_an_error_lists_every_command(capsys):
    """An error's usage line named only LightningCLI's commands (issue 25.12)."""
    with pytest.raises(SystemExit):
        main(["predict", "--data.predict_file=x.jsonl"])
    usage = capsys.readouterr().err.splitlines()[0]
    assert usage == "usage: finetune [-c CONFIG] {fit,validate,test,predict,tasks,export,serve} ..."
