"""Text classification: single-label (softmax) or multi-label (sigmoid), single texts or pairs."""

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelExactMatch,
    MultilabelF1Score,
)
from torchmetrics.wrappers import ClasswiseWrapper
from transformers import AutoModelForSequenceClassification

from finetune.errors import InputError
from finetune.task import Column, Task, task_option

Label = Union[str, int]


@dataclass(frozen=True)
class TextClassification(Task):
    """Text classification: single-label (softmax) or multi-label (sigmoid), of single texts or pairs.

    Args:
        text_column: the column of texts.
        text_pair_column: a column of second texts (sentence pairs), or None.
        label_column: one label per row, or a list of labels per row when `multi_label`.
        labels: the label set, in id order; learned from the training split when not given.
        multi_label: several labels per text (sigmoid + binary cross-entropy) instead of one.
        threshold: multi-label probability from which a label is predicted.
        max_length: longer inputs are truncated to this many tokens.
    """

    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    labels: Optional[list[Label]] = None
    multi_label: bool = False
    threshold: float = 0.5
    max_length: int = 256

    head_modules = ("classifier", "score")
    length_limits = {"input_ids": "max_length"}

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise InputError(f"{task_option('max_length')}: must be at least 1, got {self.max_length}")

    def columns(self) -> list[Column]:
        return [Column("text_column"), Column("text_pair_column"), Column("label_column", "label", target=True)]

    def model_class(self, config: Any) -> type:
        return AutoModelForSequenceClassification

    def _row_labels(self, value: Any) -> list[Any]:
        return list(value) if self.multi_label and isinstance(value, (list, tuple)) else [value]

    def learn(self, train: Any) -> dict[str, Any]:
        if self.labels is not None:
            return {}
        return {"labels": sorted({label for value in train[self.label_column] for label in self._row_labels(value)})}

    def check_rows(self, split: str, rows: Any, where: str) -> None:
        if self.labels is None:  # (only on a split other than train: `learn` saw the training split)
            raise InputError(f"{task_option('labels')}: no label set; give it, or a checkpoint (--ckpt_path), or "
                             "data.train_file to learn it from")
        if len(self.labels) < 2:
            raise InputError(f"{task_option('labels')}: need at least 2 labels, found {self.labels}")
        if split == "predict":
            return
        known = set(self.labels)
        for row, value in enumerate(rows[self.label_column], start=1):
            if self.multi_label and not isinstance(value, (list, tuple)):
                raise InputError(f"{where}, row {row}: column {self.label_column!r} must hold a list of labels")
            unknown = [label for label in self._row_labels(value) if label not in known]
            if unknown:
                raise InputError(
                    f"{where}, row {row}: label {unknown[0]!r} in column {self.label_column!r} is not in the "
                    f"label set {self.labels} ({task_option('labels')}, or learned from the training split)"
                )

    def preprocess(self, examples: dict[str, list], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        pairs = examples[self.text_pair_column] if self.text_pair_column else None
        features = dict(tokenizer(examples[self.text_column], pairs, truncation=True, max_length=self.max_length))
        if with_targets:
            ids = {label: i for i, label in enumerate(self.labels)}
            if self.multi_label:
                features["labels"] = [
                    [1.0 if label in set(row) else 0.0 for label in self.labels] for row in examples[self.label_column]
                ]
            else:
                features["labels"] = [ids[label] for label in examples[self.label_column]]
        return features

    def model_kwargs(self) -> dict[str, Any]:
        return {
            "num_labels": len(self.labels),
            "id2label": {i: str(label) for i, label in enumerate(self.labels)},
            "label2id": {str(label): i for i, label in enumerate(self.labels)},
            "problem_type": "multi_label_classification" if self.multi_label else "single_label_classification",
        }

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = outputs.logits.float()  # (bf16 under autocast: the loss is computed in fp32)
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits, batch["labels"].float())
        return F.cross_entropy(logits, batch["labels"])

    def metrics(self, split: str, context: Any) -> MetricCollection:
        n = len(self.labels)
        if self.multi_label:
            per_label = MultilabelF1Score(n, threshold=self.threshold, average="none")
            return MetricCollection({
                "accuracy": MultilabelAccuracy(n, threshold=self.threshold, average="micro"),
                "exact_match": MultilabelExactMatch(n, threshold=self.threshold),
                "f1_macro": MultilabelF1Score(n, threshold=self.threshold, average="macro"),
                "f1": ClasswiseWrapper(per_label, labels=[str(label) for label in self.labels], prefix="f1/"),
            })
        return MetricCollection({
            "accuracy": MulticlassAccuracy(n, average="micro"),
            "f1_macro": MulticlassF1Score(n, average="macro"),
        })

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict, model: Any, tokenizer: Any) -> None:
        if self.multi_label:
            metrics.update(torch.sigmoid(outputs.logits.float()), batch["labels"].long())
        else:
            metrics.update(outputs.logits.float(), batch["labels"])

    def predict(self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[dict[str, Any]]:
        logits = self.forward(model, batch).logits.float()
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        predictions = []
        for row in probs.tolist():
            probabilities = {str(label): round(p, 6) for label, p in zip(self.labels, row)}
            if self.multi_label:
                predictions.append({
                    "labels": [label for label, p in zip(self.labels, row) if p >= self.threshold],
                    "probabilities": probabilities,
                })
            else:
                best = max(range(len(row)), key=row.__getitem__)
                predictions.append({"label": self.labels[best], "score": round(row[best], 6),
                                    "probabilities": probabilities})
        return predictions
