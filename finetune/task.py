"""The contract a task plugin implements.

A task is a frozen dataclass: its fields are its options (`model.task.init_args` in a config), and
the core stores `dataclasses.asdict(task)` in checkpoints. What it reads is declared (`columns`),
what it learns from data or from the backbone is *returned* and becomes part of those options, and
what evaluation needs of a split (`split_context`) is returned and handed to the hooks that use it.
Nothing is kept on the task between hooks (it is frozen), so a task is the same wherever it runs.

Who calls what, in order:
  module, when built: `backbone_options(config, tokenizer)` -> options set from the backbone;
      `model_class(config)` and `model_kwargs()` when loading the weights
  data module, per split: `read_file` (formats of the task's own) -> the core checks the declared
      `columns` -> on `train`: `learn(rows)` -> options learned (e.g. the label set) ->
      `check_rows` -> `split_context` -> `datasets.map(preprocess)`, cached -> `collate` per batch
  module, per stage: `metrics(split, context)`; every training step, for a task that makes its batches with the
      model (online RL), `rollout`; every step `forward` -> `loss` (a mean over
      `loss_weight(batch)` items); when `computes_metrics`, `update_metrics`; on predict steps
      `predict`, and `merge_predictions(rows, context)` once over all rows before writing.

The core adds `index` (the example a feature comes from) to every batch and reads each feature's
length from its `input_ids`; a task never handles either.
"""

from __future__ import annotations
import __future__

import dataclasses
import sys
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Optional

import torch
from torchmetrics import MetricCollection
from transformers import DataCollatorWithPadding, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

#: What a column holds, which the core checks before any hook sees the rows:
#:   text: a non-empty string; words: a non-empty list of non-empty strings; id: any value but null;
#:   label: any value but null (the task checks the label set); record: an object {...};
#:   messages: a conversation, a list of {role, content} messages, or a text (the task checks the turns).
ColumnKind = Literal["text", "words", "id", "label", "record", "messages"]


@dataclass(frozen=True)
class Column:
    """A column the task reads. `option` is the task option that holds the column's name (so messages
    can name the setting, `model.task.init_args.<option>`); an option set to None reads no column."""

    option: str
    kind: ColumnKind = "text"
    #: Read for training and evaluation, not for `predict` (labels, answers, reference texts).
    target: bool = False
    #: The column holds objects and the value is under this key (e.g. a language of a translation pair).
    field: Optional[str] = None


def task_option(name: str) -> str:
    """How messages name a task option: its config key."""
    return f"model.task.init_args.{name}"


#: The class-level declarations of a task: annotated in a subclass, @dataclass would make them options.
DECLARATIONS = ("head_modules", "length_limits", "compares_to_reference")


class Task:
    """Base class of task plugins. Subclasses are `@dataclass(frozen=True)`; their fields are the options, each
    described in the class docstring's `Args:` section (shown by `finetune fit --model.task.help CLASS`)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_declaration(cls)

    #: Head modules (name suffixes) trained in full next to the LoRA adapter and saved with it.
    head_modules: ClassVar[tuple[str, ...]] = ()
    #: {feature key: option holding its token limit}: the core reports examples those limits cut short.
    length_limits: ClassVar[dict[str, str]] = {}
    #: The loss compares the model with the backbone as it was before training (preference tuning): the core
    #: also runs `forward` on that reference, without gradients (the LoRA adapter switched off; with `lora: null`
    #: a frozen copy), and `loss` and `update_metrics` receive `(outputs, reference_outputs)`.
    compares_to_reference: ClassVar[bool] = False

    # --- what the task reads and which model it needs -----------------------------------------
    def columns(self) -> list[Column]:
        raise NotImplementedError

    def model_class(self, config: PretrainedConfig) -> type:
        """The `transformers.AutoModelFor...` class to load the backbone with, given its config."""
        raise NotImplementedError

    def model_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for `from_pretrained` (e.g. `num_labels`)."""
        return {}

    def backbone_options(self, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
        """Options the backbone decides (e.g. decoder-only or not), returned as {option: value}; raise
        InputError for a backbone the task cannot use. Default: none."""
        return {}

    # --- data ----------------------------------------------------------------------------------
    def read_file(self, path: str) -> Optional[Any]:
        """A `datasets.Dataset` for a file in a format of the task's own (e.g. nested SQuAD JSON),
        or None to let the core read JSONL/JSON/CSV/Parquet. Default: None."""
        return None

    def learn(self, train: Any) -> dict[str, Any]:
        """Options learned from the training split (e.g. `{"labels": [...]}`); they are stored with the
        task, so a checkpoint restores them. Default: none."""
        return {}

    def check_rows(self, split: str, rows: Any, where: str) -> None:
        """Reject values the column kinds do not cover (an unknown label, an answer not in its
        context) with an InputError naming `where` (the file) and the row. Default: nothing."""

    def split_context(self, split: str, rows: Any) -> Any:
        """What the split's metrics and prediction merging need of its raw rows (e.g. QA's contexts and
        answers); passed to `metrics` and `merge_predictions`. Default: None."""
        return None

    def preprocess(
        self, examples: dict[str, list], tokenizer: PreTrainedTokenizerBase, with_targets: bool
    ) -> dict[str, list]:
        """A batch of raw examples (column -> values) -> features, including `input_ids` (batched
        `datasets.map`, cached). A task that makes several features per example (windows) returns the
        tokenizer's `overflow_to_sample_mapping`; the core turns it into each feature's `index`."""
        raise NotImplementedError

    def packed_row_length(self) -> Optional[int]:
        """Tokens per row when `collate` packs whole examples into rows of that many tokens (packing): then a
        training or evaluation batch is `batch_size` rows, and the core picks the examples that fill them (best
        fit, longest first) and passes them to `collate` row after row. Default: None, a batch is `batch_size`
        examples."""
        return None

    def collate(self, features: list[dict], tokenizer: PreTrainedTokenizerBase,
                with_targets: bool) -> dict[str, torch.Tensor]:
        """Pad a list of features into a batch, to the longest item. `with_targets`: the features were made with
        targets (training and evaluation; not `predict`). Default: the tokenizer's padding; other fields (labels)
        become tensors as they are."""
        return dict(DataCollatorWithPadding(tokenizer)(features))

    # --- model ---------------------------------------------------------------------------------
    def forward(self, model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> Any:
        """Run the model on a batch. Default: the tokenizer's inputs only; the task computes the loss."""
        return model(**{k: batch[k] for k in MODEL_INPUTS if k in batch})

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean loss over the `loss_weight(batch)` items of the batch."""
        raise NotImplementedError

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """How many items `loss` averages over (rows, or target tokens for a token-level loss), so that
        the core's losses are exact means however the work is batched or spread. Default: rows."""
        return len(batch["index"])

    # --- online training (the task trains on what the model generates) --------------------------------
    def rollout(self, model: PreTrainedModel, batch: dict[str, Any], tokenizer: PreTrainedTokenizerBase,
                step: Optional[int]) -> Optional[dict[str, Any]]:
        """The batch to train on, made with the model from the data's batch at optimizer step `step` (online RL:
        completions of its prompts, sampled and scored), or to evaluate on (`step` None: e.g. greedy completions,
        scored); None to use the data's batch (the default). The core calls it in eval mode without gradients,
        and trains on what it returns for `rollout_steps()` optimizer steps; every value of the returned batch is
        a tensor of one row per item (`index`: the example of each row). A `samples` entry (JSON-serialisable
        rows) is taken out and appended to `samples.jsonl` in the run's log directory."""
        return None

    def rollout_steps(self) -> int:
        """How many optimizer steps one rollout serves (its batches are kept, and checkpointed, until then)."""
        return 1

    def step_logs(self, outputs: Any, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Figures of a training step to log as `train/<name>` (e.g. the mean reward of a rollout). Default: none."""
        return {}

    # --- evaluation ----------------------------------------------------------------------------
    def metrics(self, split: str, context: Any) -> MetricCollection:
        """Fresh metrics for `split` (train, val or test), given the split's context; the core updates
        them on that split's steps, computes them once per epoch (synced across processes) and resets them."""
        raise NotImplementedError

    def computes_metrics(self, split: str, fit_epoch: Optional[int]) -> bool:
        """Whether `update_metrics` runs on this split: `fit_epoch` is the epoch during `fit`, None in a
        standalone `validate` or `test` (e.g. generate only every N epochs of a fit). The loss is always
        reported. Default: always."""
        return True

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict[str, torch.Tensor],
                       model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        raise NotImplementedError

    # --- prediction ----------------------------------------------------------------------------
    def predict(self, model: PreTrainedModel, batch: dict[str, torch.Tensor],
                tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
        """JSON-serialisable predictions, one dict per feature in the batch."""
        raise NotImplementedError

    def chat_row(self, messages: list[dict[str, str]]) -> Optional[dict[str, Any]]:
        """The predict row that a conversation (OpenAI-style {role, content} messages, each checked) is for this
        task, when the task replies to conversations: its `predict` then returns `{"generated_text": reply}`, its
        `generation` field holds the decoding settings (`GenerationSettings`), and `finetune serve` offers the
        OpenAI chat endpoint. Raise InputError for a conversation it cannot answer. Default: None, no chat."""
        return None

    def merge_predictions(self, rows: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
        """All predicted rows of a predict run (each with its example `index`, in index order) -> one
        row per input example, still carrying `index`. Default: as they are (one feature per example)."""
        return rows

    # --- persistence (the core's) ------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The task as `{"class_path", "init_args"}`: what checkpoints store and configs accept."""
        cls = type(self)
        if not dataclasses.is_dataclass(self):
            raise TypeError(f"{cls.__name__} must be a dataclass (@dataclass(frozen=True)): its fields are the "
                            "task's options, which checkpoints store")
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dataclasses.asdict(self)}

    def with_options(self, **options: Any) -> Task:
        """A copy of the task with some options changed (what `learn` and `backbone_options` return)."""
        return dataclasses.replace(self, **options) if options else self

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Task:
        """The task from its options as checkpoints store them (plain data): nested dataclass options (e.g.
        generation settings) are rebuilt from their dicts by the fields' type hints."""
        return cls(**rebuilt(cls, options))


def rebuilt(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments of dataclass `cls` from plain data: a dict given for a dataclass-typed field (or an
    Optional one) becomes that dataclass, recursively."""
    hints = typing.get_type_hints(cls)
    arguments = {}
    for name, value in values.items():
        hint = hints.get(name)
        types = [t for t in (hint, *typing.get_args(hint)) if isinstance(t, type) and dataclasses.is_dataclass(t)]
        arguments[name] = types[0](**rebuilt(types[0], value)) if types and isinstance(value, dict) else value
    return arguments


def check_declaration(cls: type) -> None:
    """A task class's declaration errors that would otherwise pass silently, raised when the class is defined."""
    module = sys.modules.get(cls.__module__)
    if getattr(module, "annotations", None) is __future__.annotations:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__}: its module has `from __future__ import annotations`, "
                        "which leaves the option types as strings that the command line cannot check (a word would "
                        f"pass for a number); remove that import from {getattr(module, '__file__', cls.__module__)}")
    annotations = cls.__dict__.get("__annotations__", {})
    for name in DECLARATIONS:
        hint = annotations.get(name)
        if hint is not None and hint is not ClassVar and typing.get_origin(hint) is not ClassVar:
            raise TypeError(f"{cls.__qualname__}.{name}: annotated as {getattr(hint, '__name__', hint)}, so @dataclass "
                            f"would make it an option; write `{name}: ClassVar[...] = ...` or leave out the annotation")
