"""Text regression: a text -> a number (a rating, a score), trained with mean squared error."""

import torch.nn.functional as F
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection
from transformers import AutoModelForSequenceClassification

from finetune import Task


class TextRegression(Task):
    name = "text_regression"
    auto_model = AutoModelForSequenceClassification
    head_modules = ("classifier", "score")  # the new head: trained in full, saved with the adapter

    def __init__(self, text_column: str = "text", target_column: str = "target", max_length: int = 256):
        self.text_column = text_column
        self.target_column = target_column
        self.max_length = max_length

    def input_columns(self):
        return {"text_column": self.text_column}

    def target_columns(self):
        return {"target_column": self.target_column}

    def model_kwargs(self):
        return {"num_labels": 1}

    def preprocess(self, examples, tokenizer, with_targets):
        features = tokenizer(examples[self.text_column], truncation=True, max_length=self.max_length)
        if with_targets:
            features["labels"] = [float(y) for y in examples[self.target_column]]
        return features

    def loss(self, outputs, batch):
        return F.mse_loss(outputs.logits.squeeze(-1), batch["labels"])

    def metrics(self, split):
        return MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError()})

    def update_metrics(self, metrics, outputs, batch, model):
        metrics.update(outputs.logits.squeeze(-1), batch["labels"])

    def predict(self, model, batch):
        return [{"score": score} for score in self.forward(model, batch).logits.squeeze(-1).tolist()]
