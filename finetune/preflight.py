"""Checks before training starts: a run whose outputs cannot be written, or whose checkpoint or early
stopping would look for a metric some validations do not report, fails in seconds, with one message
naming the setting, instead of after its first epoch."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from finetune.errors import InputError
from finetune.task import task_option


class OutputDirsCheck(Callback):
    """On `fit`, checks that the directories training writes to can be written (`check_output_dirs`).

    Lightning creates its loggers' directories before any callback's `setup`, so an unwritable
    logger `save_dir` (by default `trainer.default_root_dir`) fails there first, with an OSError;
    call `check_output_dirs(trainer)` before `trainer.fit` (LightningCLI: in `before_fit`) to
    catch that case too."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            check_output_dirs(trainer)


def check_output_dirs(trainer: Any) -> None:
    """Raise InputError naming the setting when a directory `fit` writes to cannot be written: the
    Trainer's `default_root_dir`, each logger's `save_dir` and each `ModelCheckpoint`'s `dirpath`
    (local paths; remote ones such as `s3://` are left to their filesystem). Missing directories are left
    for training to create; their nearest existing parent must be writable. Every process checks, so that all
    stop together."""
    for setting, path in output_dirs(trainer):
        problem = unwritable(path, create=False)
        if problem:
            raise InputError(f"{setting}: cannot write to {path!r}: {problem}")


def output_dirs(trainer: Any) -> list[tuple[str, str]]:
    """(setting, directory) for every local directory a `fit` run writes to."""
    dirs = [("trainer.default_root_dir", trainer.default_root_dir)]
    for logger in trainer.loggers:
        dirs.append((f"trainer.logger ({type(logger).__name__}) save_dir", getattr(logger, "save_dir", None)))
    for callback in trainer.checkpoint_callbacks:
        dirs.append(("trainer.callbacks (ModelCheckpoint) dirpath", getattr(callback, "dirpath", None)))
    return [(setting, str(path)) for setting, path in dirs if path is not None and "://" not in str(path)]


def run_inputs(config: Any) -> list[tuple[str, str]]:
    """(setting, local path) of what a parsed `finetune` command reads: its config files, data files and
    dataset directory, checkpoint and backbone directory (hub names and remote paths are not local)."""
    inputs = [("--config", os.fspath(path)) for path in config.get("config") or []]
    data, model = config.get("data") or {}, config.get("model") or {}
    inputs += [(f"data.{option}", data.get(option))
               for option in ("train_file", "val_file", "test_file", "predict_file", "dataset")]
    inputs += [("ckpt_path", config.get("ckpt_path")), ("model.backbone", model.get("backbone"))]
    return [(setting, str(path)) for setting, path in inputs
            if path is not None and "://" not in str(path) and os.path.exists(path)]


def unwritable(path: str, create: bool = True) -> Optional[str]:
    """Why a file cannot be created in directory `path`, or None if it can. A missing directory is created, or
    with `create=False` left alone: then its nearest existing parent must be a directory we may write in (a fit
    that fails before training then leaves no directory behind)."""
    directory = Path(path).expanduser().absolute()
    if directory.exists() and not directory.is_dir():
        return "it is a file, not a directory"
    if not directory.exists() and not create:
        parent = next(p for p in directory.parents if p.exists())
        if not parent.is_dir():
            return f"{str(parent)!r} is a file, not a directory"
        return None if os.access(parent, os.W_OK | os.X_OK) else f"{str(parent)!r} is not writable"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        return err.strerror or str(err)
    return None


def check_monitors(trainer: Any, task: Any) -> None:
    """Raise InputError when a callback (ModelCheckpoint, EarlyStopping) monitors a validation metric of the task
    that some validation of this fit will not report (`Task.computes_metrics`: e.g. a generation task scoring
    every 2nd epoch): Lightning stops the run with a MisconfigurationException at the first such epoch. (A fit
    without validation data: `without_validation`.)"""
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1000  # (-1: no limit)
    every = trainer.check_val_every_n_epoch or 1
    validated = [epoch for epoch in range(min(epochs, 1000)) if (epoch + 1) % every == 0]
    for callback in validation_monitors(trainer):
        monitor = callback.monitor
        if monitor == "val/loss":
            continue
        missing = next((epoch for epoch in validated if not task.computes_metrics("val", epoch)), None)
        if missing is not None:
            raise InputError(
                f"trainer.callbacks: {type(callback).__name__} monitors {monitor!r}, which {type(task).__name__} "
                f"does not compute in the validation of epoch {missing + 1} (Lightning stops a run whose monitored "
                "value is missing); monitor 'val/loss', which every validation reports, or have the task score "
                f"every validation (generation tasks: {task_option('generate_every_n_epochs')}: 1)")


def validation_monitors(trainer: Any) -> list[Any]:
    """The callbacks that monitor a validation metric ('val/...')."""
    return [callback for callback in trainer.callbacks
            if isinstance(getattr(callback, "monitor", None), str) and callback.monitor.startswith("val/")]


def without_validation(trainer: Any) -> None:
    """A fit without validation data: a checkpoint callback that ranks by a validation metric keeps `last.ckpt`
    only, saying so (Lightning would warn at every epoch that the metric is missing, and keep nothing else); a
    callback that needs the metric (EarlyStopping) is an InputError. The validation loop is switched off, so that
    Lightning does not warn that its loader is empty."""
    for callback in validation_monitors(trainer):
        if not isinstance(callback, ModelCheckpoint):
            raise InputError(f"trainer.callbacks: {type(callback).__name__} monitors {callback.monitor!r}, but the "
                             "run has no validation data; give data.val_file, or remove the callback")
        if callback.save_top_k != 0:
            rank_zero_info(f"No validation data (data.val_file): {type(callback).__name__} keeps last.ckpt only "
                           f"(it ranks checkpoints by {callback.monitor!r}, which only validation reports)")
            callback.save_top_k, callback.save_last = 0, True
    trainer.limit_val_batches = 0
