"""Translation: source -> target text, scored with sacreBLEU (13a) and chrF (the `sacrebleu` package).

Rows are flat (`source`, `target` columns) or in the Hugging Face nested format
`{"translation": {"en": ..., "de": ...}}` with `source_lang` / `target_lang`.
"""

from dataclasses import dataclass
from typing import Optional

import sacrebleu
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from finetune.generation import GenerationTask
from finetune.task import Column


class SacreBLEU(Metric):
    """A corpus-level sacrebleu metric (BLEU, chrF), exactly sacrebleu's score on the whole split. The
    texts are metric states (UTF-8 bytes), gathered across processes, and scored once by `corpus_score`:
    corpus scores are not means of per-batch scores."""

    full_state_update = False

    def __init__(self, metric: sacrebleu.metrics.base.Metric) -> None:
        super().__init__()
        self.metric = metric
        for name in ("predictions", "prediction_lengths", "references", "reference_lengths"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, predictions: list[str], references: list[str]) -> None:
        for texts, name in ((predictions, "predictions"), (references, "references")):
            encoded = [text.encode("utf-8") for text in texts]
            getattr(self, name).append(torch.tensor(list(b"".join(encoded)), dtype=torch.uint8, device=self.device))
            getattr(self, f"{name[:-1]}_lengths").append(torch.tensor([len(e) for e in encoded], device=self.device))

    def texts(self, name: str) -> list[str]:
        data = bytes(dim_zero_cat(getattr(self, name)).cpu().tolist())
        ends = dim_zero_cat(getattr(self, f"{name[:-1]}_lengths")).cumsum(0).tolist()
        return [data[start:end].decode("utf-8") for start, end in zip([0, *ends], ends)]

    def compute(self) -> torch.Tensor:
        if isinstance(self.predictions, list) and not self.predictions:  # (after a sync the states are tensors)
            return torch.tensor(0.0, dtype=torch.float64)
        score = self.metric.corpus_score(self.texts("predictions"), [self.texts("references")]).score
        return torch.tensor(score, dtype=torch.float64)


@dataclass(frozen=True)
class Translation(GenerationTask):
    """Translation, scored with sacreBLEU and chrF; options as `GenerationTask`, plus:

    Args:
        source_lang: with `target_lang`: read `translation_column` rows of the form {lang: text}.
        target_lang: the language to translate into, a key of the `translation_column` rows.
        translation_column: the column of {lang: text} rows.
    """

    source_lang: Optional[str] = None
    target_lang: Optional[str] = None
    translation_column: str = "translation"

    def columns(self) -> list[Column]:
        if self.source_lang is None or self.target_lang is None:
            return super().columns()
        return [Column("translation_column", field=self.source_lang),
                Column("translation_column", target=True, field=self.target_lang)]

    def text_metrics(self) -> dict[str, Metric]:
        return {"bleu": SacreBLEU(sacrebleu.BLEU(tokenize="13a")), "chrf": SacreBLEU(sacrebleu.CHRF())}
