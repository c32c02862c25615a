"""The contract a task plugin implements.

A task owns everything that differs between, say, classification and question answering: which
Hugging Face head it needs, which columns it reads, how examples become features, how features
collate into a batch, the loss, the metrics and how outputs become predictions. The core
(`finetune.module`, `finetune.data`) calls these hooks and owns everything else.

Who calls what, in order:
  module, when built: `configure_backbone` (the backbone's config and tokenizer)
  data module, per split: `read_file` (custom formats) -> column check (`input_columns`,
      `target_columns`) -> `prepare` -> `datasets.map(preprocess)`, cached -> `collate` per batch
  module: `model_kwargs` when loading the backbone; `metrics(split)` once per split;
      every step `forward` -> `loss`; on evaluation steps `update_metrics`;
      on predict steps `predict`, and `merge_predictions` once over all rows before writing.

Constructor arguments of a task are its configuration (`model.task.init_args` in a config). Keep
each one in an attribute of the same name: `config()` reads them back to store the task in
checkpoints, so a checkpoint restores the task exactly (including a label set learned from data).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar, Optional

import torch
from torchmetrics import MetricCollection
from transformers import DataCollatorWithPadding, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class Task:
    #: Registry name; also the prefix of the task's entry point.
    name: ClassVar[str] = ""
    #: `transformers.AutoModelFor...` class the backbone is loaded with.
    auto_model: ClassVar[type]
    #: Head modules (name suffixes) trained in full next to the LoRA adapter and saved with it.
    head_modules: ClassVar[tuple[str, ...]] = ()
    #: The text columns hold lists of words instead of strings (token classification).
    is_split_into_words: ClassVar[bool] = False

    # --- columns -------------------------------------------------------------------------------
    def input_columns(self) -> dict[str, str]:
        """Columns every split must have, as {config key: column name}."""
        raise NotImplementedError

    def target_columns(self) -> dict[str, str]:
        """Columns every split except `predict` must have, as {config key: column name}."""
        raise NotImplementedError

    # --- backbone ------------------------------------------------------------------------------
    def configure_backbone(self, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        """See the backbone's config and tokenizer before any data is prepared (e.g. to pick the
        head class by architecture). Default: nothing."""

    # --- data ----------------------------------------------------------------------------------
    def read_file(self, path: str) -> Optional[Any]:
        """A `datasets.Dataset` for a file in a format of the task's own (e.g. nested SQuAD JSON),
        or None to let the core read JSONL/JSON/CSV/Parquet. Default: None."""
        return None

    def prepare(self, split: str, dataset: Any, source: str) -> None:
        """See a raw split before it is tokenized: learn from `train` (e.g. the label set), reject
        bad values (naming `source` and the row), keep what evaluation needs. Default: nothing."""

    def preprocess(
        self, examples: dict[str, list], tokenizer: PreTrainedTokenizerBase, with_targets: bool
    ) -> dict[str, list]:
        """Turn a batch of raw examples (column -> values) into features (batched `datasets.map`).
        A task that makes several features per example (windows) returns the tokenizer's
        `overflow_to_sample_mapping`; the core turns it into each feature's example `index`."""
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

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """How many items `loss` averages over in this batch, so that the evaluation loss is the
        exact mean over the whole split however it is batched or spread over processes.
        Default: the number of features (rows)."""
        return len(batch["index"])

    # --- evaluation ----------------------------------------------------------------------------
    def metrics(self, split: str) -> MetricCollection:
        """A fresh metric collection for `split` (train, val or test); the core updates it on that
        split's steps, computes it once per epoch (synced across processes) and resets it."""
        raise NotImplementedError

    def evaluates(self, split: str, epoch: int) -> bool:
        """Whether `update_metrics` runs on this split this epoch (e.g. generation only every N
        epochs). Loss is always reported. Default: always."""
        return True

    def update_metrics(
        self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor], model: PreTrainedModel
    ) -> None:
        raise NotImplementedError

    def metric_names(self, name: str, size: int) -> list[str]:
        """Names for the entries of a vector-valued metric (e.g. per-label F1). Default: indices."""
        return [f"{name}/{i}" for i in range(size)]

    # --- prediction ----------------------------------------------------------------------------
    def predict(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """Human-readable, JSON-serialisable predictions, one dict per feature in the batch."""
        raise NotImplementedError

    def merge_predictions(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """All decoded rows of a predict run (each with its example `index`, in index order) -> one
        row per input example, still carrying `index`. Default: as they are (one feature per example)."""
        return rows

    # --- persistence ---------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The task as `{"class_path", "init_args"}`: what checkpoints store and configs accept.
        Plain data only (dataclasses become dicts), so checkpoints load with `weights_only=True`."""
        cls = type(self)
        params = []  # a subclass may pass **kwargs on to its parent: collect along the MRO
        for klass in cls.__mro__[: cls.__mro__.index(Task)]:
            params += [p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "args", "kwargs")]
        missing = [p for p in dict.fromkeys(params) if not hasattr(self, p)]
        if missing:
            raise TypeError(f"{cls.__name__} does not keep its constructor arguments {missing} in attributes of the "
                            "same name, so checkpoints cannot store the task")
        values = {p: getattr(self, p) for p in dict.fromkeys(params)}
        values = {p: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for p, v in values.items()}
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": values}
