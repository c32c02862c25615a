"""Checkpoints that survive interruption: atomic writes, and a clean stop on SIGTERM / Ctrl-C."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from finetune.errors import InputError, StoppedBySignal, with_article


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint next to its destination and renames it into place, so a kill while
    saving leaves the previous checkpoint intact and loadable, never a half-written file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        with open(partial, "rb") as f:  # on disk before it replaces the old one
            os.fsync(f.fileno())
        os.replace(partial, path)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint for runs that each have their own directory (`runs/<task>/version_N/`).

    A resumed `fit` is a new run in a new directory: its best and top-k checkpoints are among its own (the
    previous run's files are left alone), as Lightning does, without its warning that the directory changed.
    `validate`, `test` and `predict` save nothing, so the state a checkpoint holds of this callback is not
    restored there either."""

    stage: Optional[str] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.stage = stage  # (Lightning calls setup before it restores a checkpoint)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.stage == "fit" and state_dict.get("dirpath") == self.dirpath:
            super().load_state_dict(state_dict)


class StopOnSignal(Callback):
    """On SIGTERM (cluster preemption, `kill`) or SIGINT (Ctrl-C), finish the current step, save
    `last.ckpt` in the checkpoint directory and stop, saying how to resume."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:  # a second Ctrl-C: the user really wants out now
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.received = None
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        received = self.received is not None
        if trainer.world_size > 1:  # all processes stop at the same step, if any one was signalled (one
            received = trainer.strategy.reduce_boolean_decision(received, all=False)  # all-reduce of 1 number)
        if not received:
            return
        checkpoints = trainer.checkpoint_callback
        path = Path(checkpoints.dirpath if checkpoints else trainer.default_root_dir) / "last.ckpt"
        if checkpoints:  # part of the saved state: the resumed run then updates this file, not `last-v1.ckpt`
            checkpoints.last_model_path = str(path)
        trainer.save_checkpoint(path, weights_only=False)  # the whole state: a resume continues exactly
        signal_name = self.received or "a signal to another process"
        rank_zero_info(
            f"Stopped by {signal_name} after step {trainer.global_step}; saved {path}. "
            f"Resume with: finetune fit ... --ckpt_path {path}"
        )
        raise StoppedBySignal(signal_name)


def read_checkpoint(path: str) -> Optional[dict[str, Any]]:
    """The finetune checkpoint at `path` (of the current format), checked before anything loads; None for Lightning's
    own names (`last`, `best`), which Lightning resolves."""
    import pickle
    import zipfile

    import torch

    from finetune.module import check_format

    file = Path(path)
    if not file.is_file():
        if path in ("last", "best", "hpc", "registry") or path.startswith("registry:"):
            return None
        raise InputError(f"--ckpt_path: {path!r} does not exist")
    if not zipfile.is_zipfile(file):
        raise InputError(f"--ckpt_path: {path!r} is not a checkpoint (not a file torch.save writes)")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise InputError(f"--ckpt_path: refusing to load a checkpoint that holds pickled Python objects, which could "
                         f"run code when loaded: {path!r} (finetune checkpoints hold only tensors and data)") from err
    except (RuntimeError, OSError, EOFError) as err:
        raise InputError(f"--ckpt_path: {path!r} is not a readable checkpoint ({err})") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise InputError(f"--ckpt_path: {path!r} is not a Lightning checkpoint")
    check_format(checkpoint, repr(path))
    return checkpoint


def load_module(path: str) -> Any:
    """The FineTuneModule of a checkpoint (its backbone, with the trained weights of the checkpoint), on the CPU."""
    import warnings

    from finetune.module import FineTuneModule

    with warnings.catch_warnings():
        # A checkpoint holds only the trained weights (the frozen backbone comes from model.backbone), which
        # Lightning reports by listing every backbone weight; missing trained weights are refused on load.
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the")
        return FineTuneModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)


def check_checkpoint(path: str, model_config: Any = None, checkpoint: Optional[dict[str, Any]] = None) -> None:
    """Before anything loads: `path` is a finetune checkpoint of the current format (`checkpoint`: as
    `read_checkpoint` read it already), and of the task the config names (if it names one)."""
    checkpoint = checkpoint if checkpoint is not None else read_checkpoint(path)
    if checkpoint is None:
        return
    saved = checkpoint.get("hyper_parameters", {}).get("task", {}).get("class_path", "")
    named = getattr(getattr(model_config, "task", None), "class_path", None) if model_config is not None else None
    if saved and named and named.rpartition(".")[2] != saved.rpartition(".")[2]:
        raise InputError(f"--ckpt_path: {path!r} holds {with_article(saved.rpartition('.')[2])} model, but the "
                         f"config's model.task is {named.rpartition('.')[2]}; use that task's config, or leave "
                         "model.task out")
