"""Callbacks that interrupt a `finetune fit` subprocess at a chosen step (used by test_reliability)."""

import os
import signal

from lightning.pytorch import Callback


class SignalAtStep(Callback):
    """Sends `signal_name` to this process once `step` optimizer steps are done (in process `rank` only,
    when given: a signal that reaches one process of several)."""

    def __init__(self, step: int, signal_name: str = "SIGKILL", rank: int | None = None) -> None:
        self.step = step
        self.signal_name = signal_name
        self.rank = rank

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), getattr(signal, self.signal_name))
