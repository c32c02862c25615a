"""Writing `predict` results: one JSON line per input, in input order."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from finetune.errors import InputError
from finetune.preflight import unwritable


class PredictionWriter(BasePredictionWriter):
    """Writes the predictions of `finetune predict` to `output_file` (JSON Lines): one line per
    input, in input order, from rank 0 however many processes predicted."""

    def __init__(self, output_file: str = "predictions.jsonl") -> None:
        super().__init__(write_interval="epoch")
        self.output_file = Path(output_file)

    def check_output_file(self, inputs: Sequence[tuple[str, str]] = ()) -> None:
        """Fail before predicting, not after, when `output_file` cannot be written, or would replace one of the
        run's `inputs` ((setting, path): `preflight.run_inputs`) or a file inside an input directory: the same
        file however it is spelled (`./a.jsonl`, a symlink, a hard link). `finetune predict` checks before the
        model and the data load."""
        file = self.output_file
        if file.is_dir():
            raise InputError(f"predictions.output_file: {str(file)!r} is a directory; expected a file path "
                             f"such as {str(file / 'predictions.jsonl')!r}")
        for setting, path in inputs:
            directory = os.path.isdir(path)
            if directory:
                replaced = file.exists() and Path(os.path.realpath(file)).is_relative_to(os.path.realpath(path))
            else:
                replaced = file.exists() and os.path.samefile(file, path)
            if replaced:
                raise InputError(f"predictions.output_file: {str(file)!r} is {'a file inside ' if directory else ''}"
                                 f"{setting} ({path!r}); writing the predictions would replace it: choose another "
                                 "output file")
        problem = unwritable(str(file.parent))
        if problem is None and file.exists() and not os.access(file, os.W_OK):
            problem = "the file is read-only"
        if problem:
            raise InputError(f"predictions.output_file: cannot write {str(file)!r}: {problem}")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check_output_file()

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        rows = [row for batch in predictions for row in batch]
        if trainer.world_size > 1:  # every process predicted its share: collect them on rank 0
            shares: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(shares, rows)
            rows = [row for share in shares for row in share]
        if not trainer.is_global_zero:
            return
        rows = pl_module.merge_predictions(rows)
        tmp = self.output_file.with_name(self.output_file.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        tmp.replace(self.output_file)
        print(f"Wrote {len(rows)} predictions to {self.output_file}")
