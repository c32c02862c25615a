"""Callbacks that interrupt a `finetune fit` subprocess at a chosen step (used by test_reliability)."""

import os
import signal

from lightning.pytorch import Callback


class SignalAtStep(Callback):
    """Sends `signal_name` to this process once `step` optimizer steps are done."""

    def __init__(self, step: int, signal_name: str = "SIGKILL") -> None:
        self.step = step
        self.signal_name = signal_name

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal_name))
