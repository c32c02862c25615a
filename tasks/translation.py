"""Translation: source -> target text, scored with sacreBLEU (13a) and chrF (the `sacrebleu` package).

Rows are flat (`source`, `target` columns) or in the Hugging Face nested format
`{"translation": {"en": ..., "de": ...}}` with `source_lang` / `target_lang`.
"""

from __future__ import annotations

from typing import Any, Optional

import sacrebleu
import torch
from torchmetrics import Metric

from finetune.generation import GenerationTask


class SacreBLEU(Metric):
    """A corpus-level sacrebleu metric (BLEU, chrF) whose sufficient statistics are metric states:
    they add up across batches and processes, and the score equals sacrebleu's on the whole corpus."""

    full_state_update = False

    def __init__(self, metric: sacrebleu.metrics.base.Metric) -> None:
        super().__init__()
        self.metric = metric
        size = len(metric._extract_corpus_statistics(["a"], [["a"]])[0])
        self.add_state("stats", torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[str]) -> None:
        segments = self.metric._extract_corpus_statistics(predictions, [references])
        self.stats += torch.tensor(segments, dtype=torch.float64, device=self.stats.device).sum(0)

    def compute(self) -> torch.Tensor:
        stats = [int(s) for s in self.stats.round().tolist()]  # counts: integers by construction
        return torch.tensor(self.metric._compute_score_from_stats(stats).score, dtype=torch.float64)


class Translation(GenerationTask):
    """Args: as `GenerationTask` (see finetune/generation.py), plus
    source_lang / target_lang: read `translation_column` rows of the form {lang: text}.
    """

    name = "translation"

    def __init__(
        self,
        source_lang: Optional[str] = None,
        target_lang: Optional[str] = None,
        translation_column: str = "translation",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.source_lang = source_lang
        self.target_lang = target_lang
        self.translation_column = translation_column
        self.nested = source_lang is not None and target_lang is not None

    def input_columns(self) -> dict[str, str]:
        return {"translation_column": self.translation_column} if self.nested else super().input_columns()

    def target_columns(self) -> dict[str, str]:
        return {} if self.nested else super().target_columns()

    def sources(self, examples: dict[str, list]) -> list[str]:
        if self.nested:
            return [pair.get(self.source_lang) for pair in examples[self.translation_column]]
        return super().sources(examples)

    def targets(self, examples: dict[str, list]) -> list[str]:
        if self.nested:
            return [pair.get(self.target_lang) for pair in examples[self.translation_column]]
        return super().targets(examples)

    def text_metrics(self) -> dict[str, Metric]:
        return {"bleu": SacreBLEU(sacrebleu.BLEU(tokenize="13a")), "chrf": SacreBLEU(sacrebleu.CHRF())}
