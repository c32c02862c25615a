"""Checkpoints that survive interruption: atomic writes, and a clean stop on SIGTERM / Ctrl-C."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from finetune.errors import StoppedBySignal


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
        trainer.save_checkpoint(path)
        signal_name = self.received or "a signal to another process"
        rank_zero_info(
            f"Stopped by {signal_name} after step {trainer.global_step}; saved {path}. "
            f"Resume with: finetune fit ... --ckpt_path {path}"
        )
        raise StoppedBySignal(signal_name)
