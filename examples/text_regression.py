"""Text regression: a text -> a number (a rating, a score), trained with mean squared error."""

from dataclasses import dataclass

import torch.nn.functional as F
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection
from transformers import AutoModelForSequenceClassification

from finetune import Column, Task


@dataclass(frozen=True)
class TextRegression(Task):
    """Args:
        text_column: the column of texts.
        target_column: the column of numbers to predict.
        max_length: longer texts are truncated to this many tokens.
    """

    text_column: str = "text"
    target_column: str = "target"
    max_length: int = 256

    def columns(self):
        return [Column("text_column", "text"), Column("target_column", "label", target=True)]

    def model_class(self, config):
        return AutoModelForSequenceClassification

    def model_kwargs(self):
        return {"num_labels": 1}

    def preprocess(self, examples, tokenizer, with_targets):
        features = tokenizer(examples[self.text_column], truncation=True, max_length=self.max_length)
        return {**features, "labels": [float(y) for y in examples[self.target_column]]} if with_targets else features

    def loss(self, outputs, batch):
        return F.mse_loss(outputs.logits.squeeze(-1), batch["labels"])

    def metrics(self, split, context):
        return MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError()})

    def update_metrics(self, metrics, outputs, batch, model, tokenizer):
        metrics.update(outputs.logits.squeeze(-1), batch["labels"])

    def predict(self, model, batch, tokenizer):
        return [{"score": score} for score in self.forward(model, batch).logits.squeeze(-1).tolist()]
