"""Defects found trying the tool as a new user would (issue 16): run directories, resuming longer runs,
outputs checked before the work, clear messages, and a console that shows only what a user needs."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import REPO, fit_args, make_rows, write_jsonl
from finetune.cli import main, run
from finetune.testing import processes_env

CONFIG = str(REPO / "configs" / "classification.yaml")


def demo_args(backbone: str, files: dict, root: Path, *extra: str) -> list[str]:
    """The demo config (its logging and checkpoints) on the tiny backbone and the toy data."""
    return ["fit", "--config", CONFIG, f"--model.backbone={backbone}", f"--data.train_file={files['train']}",
            f"--data.val_file={files['val']}", f"--data.predict_file={files['predict']}", "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={root}", "--trainer.log_every_n_steps=1",
            f"--predictions.output_file={root}/predictions.jsonl", *extra]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("data")
    return {"train": write_jsonl(root / "train.jsonl", make_rows(24, seed=1)),
            "val": write_jsonl(root / "val.jsonl", make_rows(12, seed=2)),
            "predict": write_jsonl(root / "predict.jsonl", [{"text": r["text"]} for r in make_rows(6, seed=3)])}


@pytest.fixture(scope="module")
def trained(tiny_bert, files, tmp_path_factory) -> Path:
    """The last.ckpt of a one-epoch run of the demo config."""
    root = tmp_path_factory.mktemp("trained")
    run(demo_args(tiny_bert, files, root, "--trainer.enable_progress_bar=false"))
    return root / "version_0" / "checkpoints" / "last.ckpt"


# --- 1. every run its own directory; `--ckpt_path last` resumes the newest ---------------------------

def test_each_fit_has_its_own_version_directory_and_last_resumes_the_newest(tiny_bert, files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the current directory: default_root_dir moves everything
    root = tmp_path / "elsewhere"
    quiet = "--trainer.enable_progress_bar=false"
    for _ in range(2):
        run(demo_args(tiny_bert, files, root, quiet))
    assert sorted(p.name for p in root.iterdir()) == ["version_0", "version_1"]
    for version in ("version_0", "version_1"):  # README's layout: runs/<task>/version_N/checkpoints/last.ckpt
        assert (root / version / "checkpoints" / "last.ckpt").is_file()
        assert (root / version / "metrics.csv").is_file() and (root / version / "config.yaml").is_file()
    assert not list((root / "version_1" / "checkpoints").glob("*-v1.ckpt"))  # no mixing of two runs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]

    cli = run(demo_args(tiny_bert, files, root, quiet, "--ckpt_path=last", "--trainer.max_epochs=2"))
    assert Path(cli.trainer.ckpt_path) == root / "version_1" / "checkpoints" / "last.ckpt"
    assert cli.trainer.current_epoch == 2 and cli.trainer.global_step == 2 * 2  # one epoch more (24 rows / 16)
    assert (root / "version_2" / "checkpoints" / "last.ckpt").is_file()


def test_last_with_no_earlier_run_is_explained(tiny_bert, files, tmp_path, capsys):
    args = demo_args(tiny_bert, files, tmp_path, "--ckpt_path=last")
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", *args[1:]])
    assert exit_info.value.code == 2
    assert f"--ckpt_path last: no last.ckpt in {tmp_path}/version_*/checkpoints" in capsys.readouterr().err


def test_readme_resume_commands_name_the_run_layout():
    readme = (REPO / "README.md").read_text()
    assert "runs/classification/checkpoints/last.ckpt" not in readme  # the shared directory of before
    assert "--ckpt_path runs/classification/version_0/checkpoints/last.ckpt" in readme
    for config in (REPO / "configs").glob("*.yaml"):
        assert "dirpath:" not in config.read_text(), config  # a fixed dirpath makes runs share one directory


# --- 2. resuming with a larger max_steps follows the new length -------------------------------------

def test_resume_with_larger_max_steps_keeps_learning(tiny_bert, toy_files, tmp_path):
    args = fit_args(tiny_bert, toy_files, tmp_path, "--model.scheduler.warmup_ratio=0",
                    "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last=true")
    first = run([*args, "--trainer.max_steps=2"])
    last = Path(first.trainer.checkpoint_callback.last_model_path)
    before = torch.load(last, weights_only=True)
    assert before["global_step"] == 2
    assert before["optimizer_states"][0]["param_groups"][0]["lr"] == 0  # the 2-step schedule ended at 0

    resumed = run([*args, "--trainer.max_steps=4", f"--ckpt_path={last}"])
    assert resumed.trainer.global_step == 4
    scheduler = resumed.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == 4
    after = resumed.model.trainable_state_dict()
    changed = [key for key, value in before["state_dict"].items() if not torch.equal(value, after[key])]
    assert changed, "the extra steps trained at learning rate 0"


def test_schedule_restored_for_a_longer_run_continues_on_the_new_length():
    from finetune.schedule import LinearWarmupDecay

    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    old = LinearWarmupDecay(optimizer, total_steps=2, warmup_ratio=0)
    for _ in range(2):
        optimizer.step()
        old.step()
    state, optimizer_state = old.state_dict(), optimizer.state_dict()
    assert optimizer.param_groups[0]["lr"] == 0

    optimizer = torch.optim.SGD([weight], lr=1.0)
    new = LinearWarmupDecay(optimizer, total_steps=4, warmup_ratio=0)
    optimizer.load_state_dict(optimizer_state)  # (Lightning's order: optimizer, then scheduler)
    new.load_state_dict(state)
    assert (new.last_epoch, new.total_steps) == (2, 4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


# --- 3. predict checks its output file first ------------------------------------------------------

@pytest.mark.parametrize("kind", ["directory", "under a file"])
def test_predict_to_an_unwritable_output_fails_before_any_work(trained, tiny_bert, files, tmp_path, kind, capsys,
                                                               monkeypatch):
    if kind == "directory":
        output, message = tmp_path, f"predictions.output_file: {str(tmp_path)!r} is a directory; expected a file"
    else:
        (tmp_path / "file").write_text("x")
        output, message = tmp_path / "file" / "out.jsonl", "predictions.output_file: cannot write"

    def no_work(*args, **kwargs):
        raise AssertionError("the data was read before the output was checked")

    monkeypatch.setattr("finetune.data.DataModule.setup", no_work)
    args = demo_args(tiny_bert, files, tmp_path / "runs")[1:]
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *args, f"--ckpt_path={trained}", f"--predictions.output_file={output}"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("kind", ["predict_file", "predict_file as ./relative", "predict_file by a symlink",
                                  "ckpt_path", "config file", "a file of the backbone"])
def test_predict_refuses_to_write_over_an_input_of_the_run(trained, tiny_bert, files, tmp_path, kind, capsys,
                                                           monkeypatch):
    """(issue 25: predictions written over the input texts or the checkpoint, exit 0)"""
    monkeypatch.chdir(tmp_path)
    texts = Path(write_jsonl(tmp_path / "texts.jsonl", [{"text": "a good day"}]))
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(trained.read_bytes())
    config = tmp_path / "run.yaml"
    config.write_text("trainer:\n  max_epochs: 1\n")
    (tmp_path / "link.jsonl").symlink_to(texts)
    output, setting, source = {
        "predict_file": (texts, "data.predict_file", texts),
        "predict_file as ./relative": ("./texts.jsonl", "data.predict_file", texts),
        "predict_file by a symlink": ("link.jsonl", "data.predict_file", texts),
        "ckpt_path": (checkpoint, "ckpt_path", checkpoint),
        "config file": (config, "--config", config),
        "a file of the backbone": (Path(tiny_bert) / "config.json", "model.backbone", Path(tiny_bert) / "config.json"),
    }[kind]
    before = source.read_bytes()

    def no_work(*args, **kwargs):
        raise AssertionError("the data was read before the output was checked")

    monkeypatch.setattr("finetune.data.DataModule.setup", no_work)
    args = demo_args(tiny_bert, {**files, "predict": "texts.jsonl"}, tmp_path / "runs")[1:]
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *args, "--config", str(config), f"--ckpt_path={checkpoint}",
              f"--predictions.output_file={output}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"finetune: error: predictions.output_file: {str(Path(output))!r} is ")
    assert f" {setting} (" in err
    assert err.endswith("writing the predictions would replace it: choose another output file")
    assert source.read_bytes() == before


# --- 4. export refuses a non-empty directory and a file, before loading -----------------------------

def test_export_checks_the_output_directory_before_loading(trained, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "notes.txt").write_text("keep me")

    def no_load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the output directory was checked")

    monkeypatch.setattr("finetune.module.FineTuneModule.load_from_checkpoint", no_load)
    for output, message in ((tmp_path / "a-file", "is a file; expected a directory"),
                            (tmp_path / "old", "is not empty; choose a new directory, or pass --overwrite true")):
        with pytest.raises(SystemExit) as exit_info:
            main(["export", f"--ckpt_path={trained}", f"--output_dir={output}"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"finetune: error: --output_dir: {str(output)!r} {message}" in err and "Traceback" not in err
    monkeypatch.undo()
    main(["export", f"--ckpt_path={trained}", f"--output_dir={tmp_path / 'old'}", "--overwrite=true"])
    assert (tmp_path / "old" / "merged" / "config.json").is_file() and (tmp_path / "old" / "notes.txt").is_file()


# --- 11. messages that say which file and what was meant ----------------------------------------

def test_yaml_syntax_error_names_the_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epochs: [1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, "--config", str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"finetune: error: --config {bad}: not valid YAML:" in err and "line 2" in err


@pytest.mark.parametrize("where", ["config file", "command line"])
def test_unknown_top_level_key_gets_a_did_you_mean(tmp_path, capsys, where):
    config = tmp_path / "typo.yaml"
    config.write_text("trainr:\n  max_epochs: 1\n")
    extra = ["--config", str(config)] if where == "config file" else ["--trainr.max_epochs", "1"]
    with pytest.raises(SystemExit):
        main(["fit", "--config", CONFIG, *extra])
    assert "trainr.max_epochs: unknown key. Did you mean 'trainer.max_epochs'?" in capsys.readouterr().err


def test_an_abbreviated_option_is_a_typo_not_a_guess(capsys):
    with pytest.raises(SystemExit):  # (argparse would take it as --trainer.max_epochs and run a whole epoch)
        main(["fit", "--config", CONFIG, "--trainer.max_epoch", "1"])
    assert "trainer.max_epoch: unknown key. Did you mean 'trainer.max_epochs'?" in capsys.readouterr().err


def test_a_json_error_is_reported_once_by_finetune(tiny_bert, files, tmp_path, capfd):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "x"}\n{"text": "b\\ud800", "label": "y"}\n{"text": "c" "label": "y"}\n')
    with pytest.raises(SystemExit):
        main(demo_args(tiny_bert, {**files, "train": str(bad)}, tmp_path))
    err = capfd.readouterr().err
    assert "line 3: invalid JSON" in err
    assert "Failed to load JSON" not in err and "Generating train split" not in err


# --- 15. the kill/resume benchmark, killed before its first checkpoint --------------------------------

def test_kill_resume_benchmark_handles_a_kill_before_the_first_checkpoint(tmp_path):
    spec = importlib.util.spec_from_file_location("kill_resume", REPO / "benchmarks" / "kill_resume.py")
    kill_resume = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kill_resume)
    assert kill_resume.saved_step(tmp_path) is None  # (it was a FileNotFoundError)
    (tmp_path / "steps").mkdir()
    torch.save({"global_step": 30}, tmp_path / "steps" / "last.ckpt")
    assert kill_resume.saved_step(tmp_path) == 30


# --- 16. the console ------------------------------------------------------------------------------

NOISE = ["Warning", "deprecated", "warnings.warn",
         "GPU available", "TPU available", "litlogger", "litmodels", "LOAD REPORT", "Loading weights",
         "Loading `train_dataloader`", "Generating train split", "FLOPs", "v_num", "tensorboardX",
         "exists and is not empty", "dirpath has changed", "custom batch sampler", "weights_only", "Traceback"]


def run_quietly(args: list[str], cwd: Path) -> str:
    """`finetune ARGS` in a fresh process, as a user runs it, with every UserWarning an error (Lightning's,
    jsonargparse's and finetune's own are UserWarnings); returns its console, checked for noise."""
    env = processes_env()
    result = subprocess.run([sys.executable, "-W", "error::UserWarning", "-m", "finetune", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-3000:]
    for line in console.splitlines():
        for noise in NOISE:
            assert noise not in line, line
    return console


def test_a_clean_fit_then_predict_print_only_what_a_user_needs(tiny_bert, files, tmp_path):
    args = demo_args(tiny_bert, files, tmp_path)
    cwd = tmp_path / "cwd"  # (paths outside the current directory are printed as given)
    cwd.mkdir()
    for version in ("version_0", "version_1"):  # the second run: the runs directory is not empty
        console = run_quietly(args, cwd)
        assert "Trainable params:" in console and "epoch 0 val/loss=" in console
        best = next((tmp_path / version / "checkpoints").glob("epoch=*.ckpt"))
        assert f"Best checkpoint: {best} (val/accuracy=" in console
        assert f"Last checkpoint: {tmp_path / version / 'checkpoints' / 'last.ckpt'}" in console
        assert f"finetune predict --config {CONFIG} --ckpt_path {best}" in console
        assert f"finetune export --ckpt_path {best} --output_dir {tmp_path / version / 'export'}" in console
        assert f"finetune serve --ckpt_path {best}   # http://127.0.0.1:8000" in console
    console = run_quietly(["validate", *args[1:], f"--ckpt_path={best}"], cwd)  # (its own run directory)
    assert "val/accuracy" in console
    console = run_quietly(["predict", *args[1:], f"--ckpt_path={best}"], cwd)
    assert "Wrote 6 predictions" in console
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "predictions.jsonl", "version_0", "version_1",
                                                         "version_2"]
    assert not any(cwd.iterdir())


def test_a_small_fit_without_validation_says_what_it_keeps_and_logs_every_epoch(tiny_bert, files, tmp_path):
    """(issue 25) The demo config without validation data (it monitors val/accuracy) on 24 rows: 2 batches an epoch
    against its log_every_n_steps of 10. Lightning warned that the monitored key is missing, that the validation
    loader is empty and that the logging interval is longer than the epoch (and logged no training step)."""
    args = [arg for arg in demo_args(tiny_bert, files, tmp_path, "--data.val_file=null", "--trainer.max_epochs=2")
            if not arg.startswith(("--trainer.log_every_n_steps", f"--data.val_file={files['val']}"))]
    console = run_quietly(args, tmp_path)
    assert ("No validation data (data.val_file): RunCheckpoint keeps last.ckpt only (it ranks checkpoints by "
            "'val/accuracy', which only validation reports)") in console
    run_dir = tmp_path / "version_0"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]
    with open(run_dir / "metrics.csv") as f:
        steps = [(row["epoch"], row["step"]) for row in csv.DictReader(f) if row["train/loss"]]
    assert steps == [("0", "1"), ("1", "3")]  # the last batch of each epoch


def test_a_run_that_fails_before_training_leaves_no_directory(tiny_bert, files, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    (tmp_path / "existing").mkdir()
    for root in (tmp_path / "new" / "runs", tmp_path / "existing"):
        for _ in range(2):
            with pytest.raises(SystemExit):
                main(demo_args(tiny_bert, {**files, "train": str(empty)}, root))
        assert "is empty" in capsys.readouterr().err
    # the root it created is gone with the run's directory (issue 25), the user's own directory is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "existing"]
    assert not any((tmp_path / "existing").iterdir())
    # a run refused before the Trainer starts creates no directory
    with pytest.raises(SystemExit):
        main(demo_args(tiny_bert, files, tmp_path / "new" / "runs", "--data.val_file=null",
                       "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/loss"))
    assert "EarlyStopping monitors 'val/loss', but the run has no validation data" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_without_a_logger_nothing_is_written_to_the_current_directory(tiny_bert, toy_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "root"
    run(fit_args(tiny_bert, toy_files, root, "--trainer.logger=false", "--trainer.max_epochs=1"))
    assert not (tmp_path / "config.yaml").exists() and not (root / "config.yaml").exists()
    assert list((root / "checkpoints").glob("*.ckpt"))


def test_the_checkpoint_plugin_is_config_not_an_instance(tiny_bert, toy_files, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run(fit_args(tiny_bert, toy_files, tmp_path, "--trainer.max_epochs=1"))
    assert not [w for w in caught if "Unable to serialize" in str(w.message)]
    saved = (tmp_path / "version_0" / "config.yaml").read_text()
    assert "finetune.checkpointing.AtomicCheckpointIO" in saved
    from finetune.checkpointing import AtomicCheckpointIO

    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_predict_batches_are_a_plain_sampler_in_length_order(trained, tiny_bert, files, tmp_path):
    cli = run(["predict", *demo_args(tiny_bert, files, tmp_path)[1:], f"--ckpt_path={trained}",
               "--trainer.enable_progress_bar=false"])
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    loader = cli.datamodule.predict_dataloader()
    assert loader.batch_sampler.drop_last is False and type(loader.batch_sampler).__name__ == "BatchSampler"
    lengths = cli.datamodule.features["predict"]["length"]
    order = list(loader.sampler)
    assert sorted(order) == list(range(6)) and [lengths[i] for i in order] == sorted(lengths, reverse=True)


# --- 17. curves: CSV always, TensorBoard when installed ---------------------------------------------

@pytest.mark.parametrize("installed", [True, False])
def test_default_loggers_are_csv_and_tensorboard_when_installed(tmp_path, monkeypatch, installed):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    import finetune.runs

    if installed:
        pytest.importorskip("tensorboard")  # (not in the dev extra: `pip install -e .[tensorboard]`)
    monkeypatch.setattr(finetune.runs, "tensorboard_installed", lambda: installed)
    (tmp_path / "version_0").mkdir()
    loggers = finetune.runs.default_loggers(str(tmp_path))
    assert [type(logger) for logger in loggers] == [CSVLogger, TensorBoardLogger][: 2 if installed else 1]
    assert {logger.log_dir for logger in loggers} == {str(tmp_path / "version_1")}  # one directory per run
