"""The steps every command runs, as plain functions, in the order data flows: settle the task (from the backbone,
then from the training rows), make each split's features, and predict rows.

`finetune fit|validate|test|predict` (through `connect`), `finetune serve` and the conformance kit call these, so
a row becomes the same features and the same prediction wherever it goes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from finetune.registry import build_task
from finetune.task import Task

if TYPE_CHECKING:
    from finetune.data import DataModule
    from finetune.module import FineTuneModule

#: The splits each stage reads, with metrics on all but `predict`.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


def settle_task(spec: Any, config: Any, tokenizer: Any) -> Task:
    """The task of a config or checkpoint (a registered name, a `{"class_path", "init_args"}` dict, a Task) with
    the options the backbone decides (`Task.backbone_options`)."""
    task = build_task(spec)
    return task.with_options(**task.backbone_options(config, tokenizer))


def connect(model: FineTuneModule, data: DataModule, stage: str) -> None:
    """Settles the task for `stage` and hands it over, before the Trainer runs: the data module reads the stage's
    splits for the module's task and tokenizer and learns from the training rows; the module gets the learned task
    and the splits' contexts. `finetune fit|validate|test|predict` call it; so must a script driving its own
    Trainer, before `trainer.fit(model, datamodule=data)` (and again before another stage)."""
    task = data.connect(model.task, model.tokenizer, stage)
    model.connect(task, data.contexts)


def make_features(examples: dict[str, list], indices: list[int], task: Task, tokenizer: Any,
                  with_targets: bool) -> dict[str, list]:
    """A batch of raw examples -> the task's features, each with the `index` of its example (windows of one
    example share it) and its `length` in tokens (for length-grouped batches)."""
    features = task.preprocess(examples, tokenizer, with_targets)
    if "input_ids" not in features:
        raise TypeError(f"Task.preprocess of {type(task).__name__} must return `input_ids` (batches are grouped "
                        f"by their length); it returned {', '.join(features) or 'nothing'}")
    mapping = features.pop("overflow_to_sample_mapping", range(len(indices)))
    features["index"] = [indices[i] for i in mapping]
    features["length"] = [len(ids) for ids in features["input_ids"]]
    return features


def collate(features: list[dict], task: Task, tokenizer: Any, with_targets: bool) -> dict[str, torch.Tensor]:
    """The task's batch of features, plus the example `index` of each."""
    index = torch.tensor([feature["index"] for feature in features])
    rest = [{k: v for k, v in feature.items() if k not in ("index", "length")} for feature in features]
    return {**task.collate(rest, tokenizer, with_targets), "index": index}


def predict_batch(task: Task, model: Any, tokenizer: Any, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """The task's predictions of a batch, each with the `index` of its example."""
    predictions = task.predict(model, batch, tokenizer)
    for prediction, index in zip(predictions, batch["index"].tolist()):
        prediction["index"] = index
    return predictions


def merge_predictions(task: Task, predicted: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
    """Predicted features (any order, with `index`) -> one row per example, in input order, without `index`."""
    rows = task.merge_predictions(sorted(predicted, key=lambda row: row["index"]), context)
    return [{k: v for k, v in row.items() if k != "index"} for row in rows]


def predict_rows(task: Task, model: Any, tokenizer: Any, rows: list[dict[str, Any]], batch_size: int = 32,
                 device: Any = "cpu", model_for: Optional[Callable[[list[int]], Any]] = None) -> list[dict[str, Any]]:
    """Rows (already checked) -> one prediction each, exactly as `finetune predict` writes them: features made
    as the data module makes them, longest first in batches, `Task.predict`, then `merge_predictions`.
    `model_for(indices)`: the model for a batch of the rows with these indices (`finetune serve` routes a batch
    to its rows' LoRA adapters); default: `model` for every batch."""
    import datasets

    keys = list(dict.fromkeys(key for row in rows for key in row))
    examples = {key: [row.get(key) for row in rows] for key in keys}
    made = make_features(examples, list(range(len(rows))), task, tokenizer, with_targets=False)
    features = [{key: values[i] for key, values in made.items()} for i in range(len(made["input_ids"]))]
    features.sort(key=lambda f: -f["length"])
    predicted: list[dict[str, Any]] = []
    with torch.inference_mode():
        for start in range(0, len(features), batch_size):
            batch = collate(features[start:start + batch_size], task, tokenizer, with_targets=False)
            batch = {key: value.to(device) for key, value in batch.items()}
            batch_model = model if model_for is None else model_for(batch["index"].tolist())
            predicted += predict_batch(task, batch_model, tokenizer, batch)
    context = task.split_context("predict", datasets.Dataset.from_list(rows)) if needs_context(task) else None
    return merge_predictions(task, predicted, context)


def needs_context(task: Task) -> bool:
    """Whether the task reads a split's context (building one from rows costs a `datasets.Dataset`)."""
    return type(task).split_context is not Task.split_context
