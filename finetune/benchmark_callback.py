"""lm-eval benchmarks during a fit: the model being trained, its adapter in memory, every N epochs."""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy

from finetune.errors import InputError
from finetune.evaluate import Benchmarks, language_model, metric_values


class BenchmarkEvaluation(Callback):
    """Runs lm-eval benchmarks (as `finetune evaluate` does) on the model being trained at the end of every
    `every_n_epochs`-th training epoch, and logs lm-eval's numbers as metrics next to the task's own:
    `eval/<task>/<metric>` (e.g. `eval/piqa_local/acc`, `eval/gsm8k_local/exact_match/strict-match`), in
    metrics.csv, the loggers and the printed epoch line. Checkpoints and early stopping may monitor them when the
    checkpoint is saved at the end of the training epoch (a fit without validation data).

    In several processes (DDP) the first process evaluates, the others wait, and every process logs its numbers:
    the same as one process gives. (Not with FSDP, whose processes each hold a part of the model.)

    Args:
        benchmarks: the lm-eval tasks and how to run them (the options of `finetune evaluate`).
        every_n_epochs: evaluate after every N-th training epoch.
    """

    def __init__(self, benchmarks: Benchmarks, every_n_epochs: int = 1) -> None:
        if every_n_epochs < 1:
            raise InputError(f"BenchmarkEvaluation.every_n_epochs: {every_n_epochs} is not a positive number")
        self.benchmarks = benchmarks
        self.every_n_epochs = every_n_epochs
        self.manager: Optional[Any] = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            raise InputError("BenchmarkEvaluation: not with FSDP (each process holds a part of the model); evaluate "
                             "the checkpoints with `finetune evaluate` instead")
        self.manager = self.benchmarks.check()  # (every process: a missing task or file stops all before training)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        values = self.evaluate(pl_module) if trainer.is_global_zero else None
        values = trainer.strategy.broadcast(values, src=0)
        # (equal in every process: sync_dist averages equal numbers, and says so to Lightning)
        pl_module.log_dict(values, sync_dist=True)
        pl_module.print(f"epoch {trainer.current_epoch} " + "  ".join(f"{k}={v:.4f}" for k, v in values.items()))

    def evaluate(self, pl_module: LightningModule) -> dict[str, float]:
        """The benchmarks' numbers for the model as it is now, leaving its mode and the random state as they were
        (lm-eval seeds Python's, NumPy's and torch's generators, as its command line does)."""
        model = pl_module.model
        training = model.training
        python_state, numpy_state = random.getstate(), np.random.get_state()
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                lm = language_model(model, pl_module.tokenizer, self.benchmarks.batch_size)
                results = self.benchmarks.run(lm, self.manager)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            model.train(training)
        return metric_values(results)
