"""A classification task whose loss is NaN in the second process only (tests/test_distributed.py)."""

from dataclasses import dataclass

import torch

from tasks.classification import TextClassification


@dataclass(frozen=True)
class NanOnOneRank(TextClassification):
    def loss(self, outputs, batch):
        loss = super().loss(outputs, batch)
        return loss * float("nan") if torch.distributed.get_rank() == 1 else loss
