"""The contract a task plugin implements.

A task owns everything that differs between, say, classification and question answering: which
Hugging Face head it needs, which columns it reads, how examples become features, how features
collate into a batch, the loss, the metrics and how outputs become predictions. The core
(`finetune.module`, `finetune.data`) calls these hooks and owns everything else.

Constructor arguments of a task are its configuration (`model.task.init_args` in a config). Keep
each one in an attribute of the same name: `config()` reads them back to store the task in
checkpoints, so a checkpoint restores the task exactly (including a label set learned from data).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torchmetrics import MetricCollection
from transformers import DataCollatorWithPadding, PreTrainedModel, PreTrainedTokenizerBase

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class Task:
    #: Registry name; also the prefix of the task's entry point.
    name: ClassVar[str] = ""
    #: `transformers.AutoModelFor...` class the backbone is loaded with.
    auto_model: ClassVar[type]
    #: Head modules (name suffixes) trained in full next to the LoRA adapter and saved with it.
    head_modules: ClassVar[tuple[str, ...]] = ()

    # --- columns -------------------------------------------------------------------------------
    def input_columns(self) -> dict[str, str]:
        """Columns every split must have, as {config key: column name}."""
        raise NotImplementedError

    def target_columns(self) -> dict[str, str]:
        """Columns every split except `predict` must have, as {config key: column name}."""
        raise NotImplementedError

    # --- data ----------------------------------------------------------------------------------
    def fit(self, train: Any) -> None:
        """Learn what the task needs from the training split (e.g. the label set). Default: nothing."""

    def check(self, dataset: Any, source: str) -> None:
        """Reject bad values in a split that has targets (e.g. unknown labels). Default: nothing."""

    def preprocess(
        self, examples: dict[str, list], tokenizer: PreTrainedTokenizerBase, with_targets: bool
    ) -> dict[str, list]:
        """Turn a batch of raw examples (column -> values) into features (batched `datasets.map`)."""
        raise NotImplementedError

    def collate(self, features: list[dict], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
        """Pad a list of features into a batch, to the longest item. Default: the tokenizer's padding;
        other fields (labels, index) become tensors as they are."""
        return dict(DataCollatorWithPadding(tokenizer)(features))

    # --- model ---------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for `auto_model.from_pretrained` (e.g. `num_labels`)."""
        return {}

    def forward(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> Any:
        """Run the model on a batch. Default: the tokenizer's inputs only; the task computes the loss."""
        return model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def metrics(self) -> MetricCollection:
        """A fresh metric collection; the core keeps one per stage and syncs it across processes."""
        raise NotImplementedError

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def metric_names(self, name: str, size: int) -> list[str]:
        """Names for the entries of a vector-valued metric (e.g. per-label F1). Default: indices."""
        return [f"{name}/{i}" for i in range(size)]

    def decode(self, outputs: Any, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """Human-readable, JSON-serialisable predictions, one dict per example in the batch."""
        raise NotImplementedError

    # --- persistence ---------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The task as `{"class_path", "init_args"}`: what checkpoints store and configs accept."""
        cls = type(self)
        params = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
        return {
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": {p: getattr(self, p) for p in params},
        }
