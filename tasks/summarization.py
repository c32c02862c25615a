"""Summarization: document -> summary, scored with ROUGE-1/2/L/Lsum (the `rouge-score` package)."""

import re
from dataclasses import dataclass

import torch
from torchmetrics import Metric

from finetune.generation import GenerationTask

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def split_sentences(text: str) -> str:
    """One sentence per line, which is how ROUGE-Lsum reads a summary. (The reference scripts split
    with nltk's punkt, a model downloaded at run time; this rule needs nothing and agrees with it on
    ordinary prose.)"""
    return "\n".join(s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s)


class Rouge(Metric):
    """Mean per-summary ROUGE F1 (x100), stemmed, exactly as `rouge_score.RougeScorer` computes it;
    the sums are metric states, so they add up across batches and processes."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        from rouge_score import rouge_scorer  # (imports nltk: 1.3 s, paid only when ROUGE is computed)

        self.scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
        self.add_state("totals", torch.zeros(len(ROUGE_KEYS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, predictions: list[str], references: list[str]) -> None:
        for prediction, reference in zip(predictions, references):
            scores = self.scorer.score(split_sentences(reference), split_sentences(prediction))
            self.totals += torch.tensor([scores[k].fmeasure for k in ROUGE_KEYS], dtype=torch.float64,
                                        device=self.totals.device)
        self.count += len(predictions)

    def compute(self) -> dict[str, torch.Tensor]:
        means = 100 * self.totals / self.count.clamp(min=1)
        return {key: value.float() for key, value in zip(ROUGE_KEYS, means)}


@dataclass(frozen=True)
class Summarization(GenerationTask):
    """Summarization, scored with ROUGE; options as `GenerationTask`, the columns default to document/summary."""

    source_column: str = "document"
    target_column: str = "summary"

    def text_metrics(self) -> dict[str, Metric]:
        return {"rouge": Rouge()}
