"""SQuAD's evaluation, as pure functions of the windows: their best spans (`best_spans`), the answers they make
together (`best_answers`, as HF's reference post-processing), and EM/F1 as the official SQuAD script computes them
(`squad_scores`, in a metric whose states combine an example's windows across steps and processes)."""

import collections
import re
import string
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


@dataclass(frozen=True)
class Decoding:
    """How windows' logits become answers: the task options of the same names."""

    n_best: int
    max_answer_length: int
    version_2_with_negative: bool
    null_score_diff_threshold: float


@dataclass(frozen=True)
class SplitContext:
    """What evaluation and prediction need of a split's rows, by example index."""

    ids: tuple[str, ...]
    contexts: tuple[str, ...]
    answers: Optional[tuple[tuple[str, ...], ...]]  # each example's gold answer texts; None for `predict`


def best_spans(
    start_logits: torch.Tensor, end_logits: torch.Tensor, offsets: torch.Tensor, cls_index: torch.Tensor,
    n_best: int, max_answer_length: int, top: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per window, on its device: the `top` best spans among the `n_best` best starts and ends inside
    the context (end >= start, at most `max_answer_length` tokens) as (score, start char, end char),
    best first (score -inf and chars -1 where fewer are valid), and the no-answer score (CLS + CLS)."""
    start_logits, end_logits = start_logits.float(), end_logits.float()
    context = offsets[..., 0] >= 0
    k = min(n_best, start_logits.shape[1])
    start_values, starts = start_logits.masked_fill(~context, float("-inf")).topk(k, dim=1)
    end_values, ends = end_logits.masked_fill(~context, float("-inf")).topk(k, dim=1)
    length = ends[:, None, :] - starts[:, :, None] + 1
    scores = start_values[:, :, None] + end_values[:, None, :]
    scores = scores.masked_fill((length < 1) | (length > max_answer_length), float("-inf")).flatten(1)
    scores, flat = scores.topk(min(top, k * k), dim=1)
    start_char = offsets[..., 0].gather(1, starts.gather(1, flat // k))
    end_char = offsets[..., 1].gather(1, ends.gather(1, flat % k))
    invalid = scores == float("-inf")
    rows = torch.arange(len(cls_index), device=cls_index.device)
    null = start_logits[rows, cls_index] + end_logits[rows, cls_index]
    return scores, start_char.masked_fill(invalid, -1), end_char.masked_fill(invalid, -1), null


# --- windows -> answers: the one post-processing, shared by the metric and prediction ----------------
Candidate = tuple[float, int, int]  # a span: (score, start char, end char)
Window = tuple[Sequence[Candidate], float]  # a window's valid spans and its no-answer score


@dataclass(frozen=True)
class Answer:
    text: str  # "" for no answer
    start: Optional[int]  # character offset into the context; None for no answer
    score: float  # the span's, or the no-answer score
    n_best: list[tuple[float, str, Optional[int]]]  # (score, text, start), best first; under SQuAD 2.0 with ""


def best_answers(windows: dict[int, list[Window]], contexts: Sequence[str], decoding: Decoding) -> dict[int, Answer]:
    """Each example's answer from its windows ({example index: windows}), as HF's reference: the best span
    over all windows (a span several windows find counts with its best score; ties go to the earliest
    span, so the order of windows does not matter) and the smallest no-answer score. No answer when no
    window has a valid span or, under SQuAD 2.0, when the no-answer score beats the best span by more
    than `null_score_diff_threshold`. A window seen twice changes nothing."""
    answers = {}
    for example, its_windows in windows.items():
        spans: dict[tuple[int, int], float] = {}
        for candidates, _ in its_windows:
            for score, start, end in candidates:
                spans[start, end] = max(score, spans.get((start, end), score))
        ranked = sorted(spans.items(), key=lambda span: (-span[1], span[0]))
        null = min(null_score for _, null_score in its_windows)
        context = contexts[example]
        n_best = [(score, context[s:e], s) for (s, e), score in ranked]
        if decoding.version_2_with_negative:
            n_best.append((null, "", None))  # (a stable sort: after the spans of equal score)
        n_best = sorted(n_best, key=lambda c: -c[0])[: decoding.n_best]
        if not ranked or (decoding.version_2_with_negative
                          and null > ranked[0][1] + decoding.null_score_diff_threshold):
            answers[example] = Answer("", None, null, n_best)
        else:
            (start, end), score = ranked[0]
            answers[example] = Answer(context[start:end], start, score, n_best)
    return answers


STATES = ("index", "score", "start", "end", "null")  # of `SquadMetric`, one value per window


class SquadMetric(Metric):
    """EM and F1 (0-100) of the official SQuAD v1.1/v2.0 script, over whole examples.

    `update` keeps, per window, its best span and its no-answer score (tensors, concatenated across
    processes); `compute` turns them into answers with `best_answers`, so a window seen twice (a
    distributed sampler pads with repeats) changes nothing and each example counts once.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, context: SplitContext, decoding: Decoding) -> None:
        super().__init__()
        self.context, self.decoding = context, decoding
        for name in STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, start_logits: torch.Tensor, end_logits: torch.Tensor, offsets: torch.Tensor,
               cls_index: torch.Tensor, index: torch.Tensor) -> None:
        scores, starts, ends, null = best_spans(start_logits, end_logits, offsets, cls_index,
                                                self.decoding.n_best, self.decoding.max_answer_length, 1)
        for name, value in zip(STATES, (index, scores[:, 0], starts[:, 0], ends[:, 0], null)):
            getattr(self, name).append(value)

    def compute(self) -> dict[str, torch.Tensor]:
        if isinstance(self.index, list) and not self.index:  # (after a sync the states are tensors)
            return {"exact_match": torch.tensor(0.0, dtype=torch.float64), "f1": torch.tensor(0.0, dtype=torch.float64)}
        windows = collections.defaultdict(list)
        for example, score, start, end, null in zip(*(dim_zero_cat(getattr(self, n)).tolist() for n in STATES)):
            windows[example].append(([(score, start, end)] if score != float("-inf") else [], null))
        answers = best_answers(windows, self.context.contexts, self.decoding)
        examples = sorted(answers)  # one order of summing, however the windows were spread over processes
        scores = squad_scores([answers[i].text for i in examples], [self.context.answers[i] for i in examples])
        if not self.decoding.version_2_with_negative:
            scores = {k: scores[k] for k in ("exact_match", "f1")}
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in scores.items()}


# --- the official SQuAD evaluation (v2.0 script; identical to v1.1 on answerable questions) -------
PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation and the articles a/an/the, fold whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in PUNCTUATION)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def _f1(gold: str, prediction: str) -> float:
    gold_tokens, pred_tokens = normalize_answer(gold).split(), normalize_answer(prediction).split()
    if not gold_tokens or not pred_tokens:  # no-answer: right only when both are empty
        return float(gold_tokens == pred_tokens)
    same = sum((collections.Counter(gold_tokens) & collections.Counter(pred_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """EM and F1 in percent, best over each question's gold answers (none: the empty answer), and
    split by answerable (HasAns) and unanswerable (NoAns) questions where there are any."""
    exact, f1, has_answer = [], [], []
    for prediction, answers in zip(predictions, golds):
        has_answer.append(bool(answers))
        answers = [a for a in answers if normalize_answer(a)] or [""]
        exact.append(max(float(normalize_answer(a) == normalize_answer(prediction)) for a in answers))
        f1.append(max(_f1(a, prediction) for a in answers))
    scores = {"exact_match": 100 * sum(exact) / len(exact), "f1": 100 * sum(f1) / len(f1)}
    for name, wanted in (("HasAns", True), ("NoAns", False)):
        part = [i for i, h in enumerate(has_answer) if h == wanted]
        if part:
            scores[f"{name}_exact"] = 100 * sum(exact[i] for i in part) / len(part)
            scores[f"{name}_f1"] = 100 * sum(f1[i] for i in part) / len(part)
    return scores
