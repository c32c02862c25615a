"""Run directories: every `finetune fit` writes into its own `<root>/version_N/` (metrics, config, curves,
`checkpoints/`), `--ckpt_path last` finds the newest run's `last.ckpt`, and a run that fails before
its first step leaves no directory behind."""

from __future__ import annotations

import glob
import importlib.util
import itertools
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from finetune.errors import InputError

VERSION = re.compile(r"version_(\d+)")


def tensorboard_installed() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def next_version(root: Path) -> int:
    """The number of the next `version_N` directory under `root`."""
    numbers = [int(m.group(1)) for p in root.glob("version_*") if (m := VERSION.fullmatch(p.name))]
    return max(numbers, default=-1) + 1


def default_loggers(root: str) -> list[Logger]:
    """What `finetune` logs to when `trainer.logger` is not set: `<root>/version_N/metrics.csv` and, when
    TensorBoard is installed (`pip install 'finetune[tensorboard]'`), its curves in the same directory."""
    version = next_version(Path(root))
    loggers: list[Logger] = [CSVLogger(root, name="", version=version)]
    if tensorboard_installed():
        loggers.append(TensorBoardLogger(root, name="", version=version, default_hp_metric=False))
    return loggers


def class_name(node: Any) -> str:
    """The class name of a `class_path` config entry ('' for anything else)."""
    return str(node.get("class_path", "")).rpartition(".")[2] if hasattr(node, "get") else ""


def checkpoint_dirs(trainer: Any) -> list[Path]:
    """The directories (globs) where the runs of a parsed `trainer` config keep their checkpoints."""
    root = Path(trainer.get("default_root_dir") or ".")
    callbacks = trainer.get("callbacks") or []
    dirs = [Path(c["init_args"]["dirpath"]) for c in callbacks if class_name(c) == "ModelCheckpoint"
            and c.get("init_args") and c["init_args"].get("dirpath")]
    logger = trainer.get("logger")
    if logger is None or logger is True:  # finetune's default loggers
        dirs.append(root / "version_*" / "checkpoints")
    elif logger is False:
        dirs.append(root / "checkpoints")
    else:  # Lightning puts checkpoints under the first logger's save_dir/name/version
        first = (logger if isinstance(logger, list) else [logger])[0]
        args = first.get("init_args") or {} if hasattr(first, "get") else {}
        save_dir = args.get("save_dir") or args.get("root_dir") or root
        dirs.append(Path(save_dir) / str(args.get("name") or "") / "*" / "checkpoints")
    return dirs


def newest_last_checkpoint(trainer: Any) -> Optional[str]:
    """The newest `last*.ckpt` of the runs of a parsed `trainer` config, or None when there is none."""
    found = [path for pattern in checkpoint_dirs(trainer) for path in glob.glob(str(pattern / "last*.ckpt"))]
    return max(found, key=os.path.getmtime) if found else None


def resolve_last(trainer: Any, subcommand: str) -> Optional[str]:
    """`--ckpt_path last`: the newest run's `last.ckpt`. `fit` starts from scratch, saying so, when there is
    none (so a job script can always pass `last`); the other commands need one."""
    path = newest_last_checkpoint(trainer)
    if path is not None:
        return path
    where = ", ".join(str(d) for d in checkpoint_dirs(trainer))
    if subcommand == "fit":
        print(f"--ckpt_path last: no last.ckpt in {where} yet: training from the start", flush=True)
        return None
    raise InputError(f"--ckpt_path last: no last.ckpt in {where}; give the path of a checkpoint")


class DiscardFailedRun(Callback):
    """Removes this run's new `version_N` directory when the run fails before its first training step and
    saved no checkpoint: nothing of value is lost, and failed attempts do not pile up. The directories above it
    that did not exist when the run began (a new `default_root_dir`) go too, when nothing else is in them; a
    directory that existed before is never removed."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = Path(run_dir)
        self.new_parents = list(itertools.takewhile(lambda parent: not parent.exists(), self.run_dir.parents))

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        fitting = trainer.state.fn == "fit"
        if not trainer.is_global_zero or (fitting and trainer.global_step > 0) or not self.run_dir.is_dir():
            return
        if any(self.run_dir.rglob("*.ckpt")):
            return
        shutil.rmtree(self.run_dir, ignore_errors=True)
        for parent in self.new_parents:  # (the deepest first)
            if not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()
