"""What `finetune` prints: the model summary, the progress bar, per-epoch metrics and where the results are.

The messages of other libraries that say nothing to act on in a finetune run are dropped here, and only
here, each by its exact wording (`quiet_known_messages`); everything else they log or warn still shows.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from lightning_utilities.core.imports import RequirementCache

#: (logger, start of the message) of the known-harmless messages `finetune` does not show.
KNOWN_HARMLESS = [
    # Lightning, on every run: the hardware it found (the model summary and the bar show what runs) and an ad.
    ("lightning.pytorch.utilities.rank_zero", "GPU available:"),
    ("lightning.pytorch.utilities.rank_zero", "TPU available:"),
    ("lightning.pytorch.utilities.rank_zero", "HPU available:"),
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging"),
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud uploads"),
    # Lightning, when the schedule asks for the run's length (`configure_optimizers`): nothing to act on.
    ("lightning.pytorch.utilities.rank_zero", "Loading `train_dataloader` to estimate number of stepping batches"),
    # bitsandbytes (>= 0.49), when imported on a CPU with AVX512_BF16: it tries to fetch an optional 4-bit matmul
    # kernel from the Hugging Face Hub, which refuses it (unverified publisher) or is unreachable, and falls back to
    # its own PyTorch path, which computes the same.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"),
    # transformers, when `finetune export` dequantizes a QLoRA backbone to merge into it: export states the dtype.
    ("transformers.integrations.bitsandbytes", "The modules are dequantized in"),
    # datasets, before the reader fails: finetune's own message names the line and the cause.
    ("datasets.packaged_modules.json.json", "Failed to load JSON from file"),
    # lm-eval, given the model object `finetune evaluate` evaluates in one process (only batch_size and the
    # tokenizer are passed, and honoured), and its tip, for the tasks of configs/lm_eval, that metadata reaches
    # their data loader (finetune passes data_dir so).
    ("lm_eval.models.huggingface", "`pretrained` model kwarg is not of type `str`."),
    ("lm_eval.models.huggingface", "Passed an already-initialized model through `pretrained`"),
    ("lm_eval.api.task", "piqa_local: Custom kwargs can be passed to `--metadata`"),
    ("lm_eval.api.task", "gsm8k_local: Custom kwargs can be passed to `--metadata`"),
]

#: Deprecation warnings raised inside other libraries about their own use of a third one (the fix is theirs):
KNOWN_HARMLESS_WARNINGS = [
    # PEFT's get_peft_model reads transformers' deprecated `is_gradient_checkpointing` (peft 0.21, transformers 5.2x).
    r"`is_gradient_checkpointing` is deprecated and will be removed in v6",
    # Lightning's pytree helpers use torch's deprecated `LeafSpec` check (lightning 2.6, torch 2.13).
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # ModelCheckpoint, when `--ckpt_path` comes from another run's directory: every command writes to a run
    # directory of its own (validate, test, a resumed fit), so the checkpoint's directory always differs.
    r"The dirpath has changed from .* won't be reloaded. Only `best_model_path` will be reloaded.",
    # Lightning, when `predict` batches with finetune's batch sampler (FSDP2: as many batches in every process), which
    # returns every index (tested): Lightning cannot check that itself.
    r"You are using a custom batch sampler `LengthGroupedBatchSampler` for prediction",
]


class DropMessages(logging.Filter):
    def __init__(self, starts: list[str]) -> None:
        super().__init__()
        self.starts = tuple(starts)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


class DropMissingOnlyLoadReport(logging.Filter):
    """transformers' LOAD REPORT when all it lists is MISSING weights: those are the task's new head (and
    weights the pretrained checkpoint dropped), which finetune trains and saves in full; on `predict` and
    `export` they come from the checkpoint. A report of unexpected or mismatched weights still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        return any(status in message for status in ("UNEXPECTED", "MISMATCH", "CONVERSION"))


def quiet_known_messages() -> None:
    """Install the filters of `KNOWN_HARMLESS` (once per process) and switch off transformers' bar of
    weight loading (the backbone loads in a second)."""
    import transformers

    starts: dict[str, list[str]] = {}
    for name, start in KNOWN_HARMLESS:
        starts.setdefault(name, []).append(start)
    for name, prefixes in starts.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(prefixes))
    modeling = logging.getLogger("transformers.modeling_utils")
    if not any(isinstance(f, DropMissingOnlyLoadReport) for f in modeling.filters):
        modeling.addFilter(DropMissingOnlyLoadReport())
    transformers.utils.logging.disable_progress_bar()
    for message in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


RICH = bool(RequirementCache("rich"))


class ProgressBar(RichProgressBar if RICH else TQDMProgressBar):  # type: ignore[misc]
    """Lightning's progress bar without `v_num` (the run's directory is printed at the end)."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class Summary(ModelSummary):
    """The model summary: the modules that hold parameters, and how many are trained (no FLOPs column:
    Lightning counts FLOPs only for models that define an example input, which ours do not)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        columns = dict(summary_data)
        rows = [(name, kind, params) for name, kind, params in zip(columns["Name"], columns["Type"], columns["Params"])
                if params.strip() != "0"]
        widths = [max(len(row[i]) for row in [("Name", "Type", "Params"), *rows]) for i in range(3)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                 for row in [("Name", "Type", "Params"), *rows]]
        share = 100 * trainable_parameters / max(1, total_parameters)
        lines.append(f"Trainable params: {get_human_readable_count(trainable_parameters)} ({share:.2f}%) of "
                     f"{get_human_readable_count(total_parameters)}, {model_size:.1f} MB")
        rank_zero_info("\n".join(lines))


class LoggingInterval(Callback):
    """Logs the training metrics at least once an epoch: an epoch with fewer batches than
    `trainer.log_every_n_steps` (a small data set, or the demo config's 10 on a few rows) logs every epoch's batches
    instead of none, without Lightning's warning that the interval is longer than the epoch. (Set on `setup`, when
    the data module has read its data: the fit loop counts the epoch's batches, and warns, later.)"""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.datamodule is None:
            return
        batches = len(trainer.datamodule.train_dataloader())
        limit = trainer.limit_train_batches  # (as Lightning applies it: a number of batches, or a fraction)
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        if 0 < batches < trainer.log_every_n_steps:
            trainer.log_every_n_steps = batches
