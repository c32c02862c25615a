"""Extractive question answering (SQuAD v1.1 / v2.0): find the answer span to a question in a context.

Long contexts are cut into overlapping windows (features); the core gives each window its example
`index`. Windows become answers in one place, `best_answers`, a pure function of the windows' span
candidates and the split's contexts (as HF's reference post-processing): the metric calls it with
each window's best span (kept in metric states, so an example's windows are combined across steps
and, under DDP, across processes), `merge_predictions` with each window's n best. EM/F1 follow the
official SQuAD evaluation script.
"""

import collections
import json
from dataclasses import dataclass
from typing import Any, Optional

import datasets
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MetricCollection
from transformers import AutoModelForQuestionAnswering

from finetune.errors import InputError
from finetune.task import MODEL_INPUTS, Column, Task, task_option
from tasks.squad import Decoding, SplitContext, SquadMetric, best_answers, best_spans

NO_CONTEXT = [-1, -1]  # offsets of tokens that are not context (question, special tokens, padding)


@dataclass(frozen=True)
class QuestionAnswering(Task):
    """Extractive question answering: the answer is a span of the context (SQuAD 1.1 and 2.0).

    Args:
        question_column: the column of questions.
        context_column: the column of the texts that hold the answers.
        answers_column: SQuAD's `{"text": [...], "answer_start": [...]}` (character offsets into the
            context; empty lists: unanswerable; a null offset: the answer's first occurrence in the context).
            Training uses the first answer; evaluation the best match.
        id_column: the column of unique example ids.
        max_length: tokens per window (question + context); longer contexts get several windows,
            overlapping by `doc_stride` tokens.
        doc_stride: tokens two windows of one context share.
        n_best: start and end logits considered per window (and answers listed by `output_n_best`).
        max_answer_length: longest answer, in tokens.
        version_2_with_negative: questions may have no answer (SQuAD 2.0); the answer is "" when the
            no-answer score beats the best span by more than `null_score_diff_threshold`.
        null_score_diff_threshold: how far the no-answer score must beat the best span (SQuAD 2.0).
        output_n_best: `predict` also writes the `n_best` best answers per question.
    """

    question_column: str = "question"
    context_column: str = "context"
    answers_column: str = "answers"
    id_column: str = "id"
    max_length: int = 384
    doc_stride: int = 128
    n_best: int = 20
    max_answer_length: int = 30
    version_2_with_negative: bool = False
    null_score_diff_threshold: float = 0.0
    output_n_best: bool = False

    head_modules = ("qa_outputs",)

    def __post_init__(self) -> None:
        if not 0 <= self.doc_stride < self.max_length:
            raise InputError(f"{task_option('doc_stride')} ({self.doc_stride}) must be in "
                             f"[0, max_length={self.max_length})")

    @property
    def decoding(self) -> Decoding:
        return Decoding(self.n_best, self.max_answer_length, self.version_2_with_negative,
                        self.null_score_diff_threshold)

    def columns(self) -> list[Column]:
        return [Column("question_column", "text"), Column("context_column", "text"), Column("id_column", "id"),
                Column("answers_column", "record", target=True)]

    def model_class(self, config: Any) -> type:
        return AutoModelForQuestionAnswering

    # --- data ----------------------------------------------------------------------------------
    def read_file(self, path: str) -> Optional[datasets.Dataset]:
        """Nested SQuAD JSON (`{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}`) -> flat rows."""
        if not path.lower().endswith(".json"):
            return None
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return None  # not one JSON document (e.g. JSON Lines): the core reads it
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            return None
        rows = []
        try:
            for article in data["data"]:
                for paragraph in article["paragraphs"]:
                    for qa in paragraph["qas"]:
                        answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                        rows.append({
                            self.id_column: str(qa["id"]), "title": article.get("title", ""),
                            self.context_column: paragraph["context"], self.question_column: qa["question"],
                            self.answers_column: {"text": [a["text"] for a in answers],
                                                  "answer_start": [a.get("answer_start") for a in answers]},
                        })
        except (KeyError, TypeError) as err:
            raise InputError(f"{path}: not valid SQuAD JSON (missing or malformed {err})") from err
        text = datasets.Value("string")
        features = datasets.Features({
            self.id_column: text, "title": text, self.context_column: text, self.question_column: text,
            self.answers_column: {"text": datasets.List(text), "answer_start": datasets.List(datasets.Value("int64"))},
        })
        return datasets.Dataset.from_list(rows, features=features)

    def check_rows(self, split: str, rows: Any, where: str) -> None:
        if split == "predict":  # no answers to check
            return
        located = 0
        for id_, context, answer in zip(rows[self.id_column], rows[self.context_column], rows[self.answers_column]):
            at = f"{where}, id {id_!r}"
            if not (isinstance(answer.get("text"), list) and isinstance(answer.get("answer_start"), list)
                    and len(answer["text"]) == len(answer["answer_start"])):
                raise InputError(f"{at}: column {self.answers_column!r} must be {{'text': [...], 'answer_start': "
                                 f"[...]}} with lists of equal length (empty for no answer), got {answer!r}")
            if not answer["text"] and not self.version_2_with_negative:
                raise InputError(f"{at}: the question has no answer; for data with unanswerable questions "
                                 f"(SQuAD 2.0) set {task_option('version_2_with_negative')}: true")
            try:
                answer_spans(answer, context)
            except ValueError as err:
                raise InputError(f"{at}: {err}") from err
            located += answer["answer_start"].count(None)
        if located:
            answers = "1 answer" if located == 1 else f"{located} answers"
            rank_zero_info(f"{where}: located {answers} whose answer_start was missing "
                           "(at the answer's first occurrence in the context)")

    def split_context(self, split: str, rows: Any) -> Optional[SplitContext]:
        if split == "train":  # training needs only the features
            return None
        answers = None if split == "predict" else tuple(tuple(a["text"]) for a in rows[self.answers_column])
        return SplitContext(tuple(str(i) for i in rows[self.id_column]), tuple(rows[self.context_column]), answers)

    def preprocess(self, examples: dict[str, list], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        if not tokenizer.is_fast:
            raise InputError(f"question answering needs a fast tokenizer (offset mappings); "
                             f"{type(tokenizer).__name__} is not one")
        # Models that pad on the left (XLNet) were trained with the context first, as HF's reference does.
        context_first = tokenizer.padding_side == "left"
        questions = [q.lstrip() for q in examples[self.question_column]]  # leading spaces waste tokens
        contexts = examples[self.context_column]
        self._check_question_lengths(questions, examples[self.id_column], tokenizer)
        encoded = tokenizer(
            *((contexts, questions) if context_first else (questions, contexts)),
            truncation="only_first" if context_first else "only_second",
            max_length=self.max_length, stride=self.doc_stride,
            return_overflowing_tokens=True, return_offsets_mapping=True,
        )
        context_id = 0 if context_first else 1
        features = {k: encoded[k] for k in MODEL_INPUTS if k in encoded}
        features["overflow_to_sample_mapping"] = encoded["overflow_to_sample_mapping"]
        features["offset_mapping"], features["cls_index"] = [], []
        if with_targets:  # once per example, not per window
            answers = [_first_span(a, c) for a, c in zip(examples[self.answers_column], contexts)]
            features["start_positions"], features["end_positions"] = [], []
        for i, (ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
            offsets = [list(o) if s == context_id else NO_CONTEXT for o, s in zip(offsets, encoded.sequence_ids(i))]
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            features["offset_mapping"].append(offsets)
            features["cls_index"].append(cls)
            if with_targets:
                start, end = _label(offsets, answers[encoded["overflow_to_sample_mapping"][i]], cls)
                features["start_positions"].append(start)
                features["end_positions"].append(end)
        return features

    def _check_question_lengths(self, questions: list[str], ids: list, tokenizer: Any) -> None:
        # The tokenizer panics (not a Python error) when a window has no room beyond the stride.
        room = self.max_length - tokenizer.num_special_tokens_to_add(pair=True) - self.doc_stride
        for id_, q in zip(ids, tokenizer(questions, add_special_tokens=False)["input_ids"]):
            if len(q) >= room:
                raise InputError(f"id {id_!r}: the question has {len(q)} tokens, which leaves no room for the "
                                 f"context in windows of max_length={self.max_length} tokens overlapping by "
                                 f"doc_stride={self.doc_stride}; raise max_length or lower doc_stride")

    def collate(self, features: list[dict], tokenizer: Any, with_targets: bool) -> dict[str, torch.Tensor]:
        # Always pad on the right: token positions (labels, cls_index, offsets) then stay valid.
        inputs = [{k: f[k] for k in MODEL_INPUTS if k in f} for f in features]
        batch = dict(tokenizer.pad(inputs, padding=True, padding_side="right", return_tensors="pt"))
        length = batch["input_ids"].shape[1]
        batch["offset_mapping"] = torch.tensor(
            [f["offset_mapping"] + [NO_CONTEXT] * (length - len(f["offset_mapping"])) for f in features]
        ).view(len(features), length, 2)
        for key in ("cls_index", "start_positions", "end_positions") if with_targets else ("cls_index",):
            batch[key] = torch.tensor([f[key] for f in features])
        return batch

    # --- model ---------------------------------------------------------------------------------
    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # As HF's QA heads, the mean of the start and end cross-entropies, but over the window's tokens only: HF pads
        # every window to max_length, finetune to the batch's longest, and padding in the softmax would make a
        # window's loss depend on its batch.
        padding = batch["attention_mask"] == 0
        start, end = (logits.float().masked_fill(padding, torch.finfo(torch.float32).min)
                      for logits in (outputs.start_logits, outputs.end_logits))
        return (F.cross_entropy(start, batch["start_positions"]) + F.cross_entropy(end, batch["end_positions"])) / 2

    # --- evaluation ----------------------------------------------------------------------------
    def metrics(self, split: str, context: Optional[SplitContext]) -> MetricCollection:
        # EM/F1 of dropout-noisy training windows would cost, and say little; predict has no answers
        if split in ("train", "predict"):
            return MetricCollection({})
        return MetricCollection({"squad": SquadMetric(context, self.decoding)}, compute_groups=False)

    def computes_metrics(self, split: str, fit_epoch: Optional[int]) -> bool:
        return split != "train"

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict, model: Any, tokenizer: Any) -> None:
        metrics.update(outputs.start_logits, outputs.end_logits, batch["offset_mapping"], batch["cls_index"],
                       batch["index"])

    # --- prediction ----------------------------------------------------------------------------
    def predict(self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[dict[str, Any]]:
        outputs = self.forward(model, batch)
        scores, starts, ends, null = best_spans(outputs.start_logits, outputs.end_logits, batch["offset_mapping"],
                                                batch["cls_index"], self.n_best, self.max_answer_length, self.n_best)
        return [{"candidates": [[sc, s, e] for sc, s, e in zip(*row) if sc != float("-inf")], "null_score": n}
                for *row, n in zip(scores.tolist(), starts.tolist(), ends.tolist(), null.tolist())]

    def merge_predictions(self, rows: list[dict[str, Any]], context: SplitContext) -> list[dict[str, Any]]:
        windows = collections.defaultdict(list)
        for row in rows:
            windows[row["index"]].append((row["candidates"], row["null_score"]))
        merged = []
        for index, answer in best_answers(windows, context.contexts, self.decoding).items():
            row = {"id": context.ids[index], "answer": answer.text, "score": round(answer.score, 4),
                   "start": answer.start}
            if self.output_n_best:
                row["n_best"] = [{"answer": text, "score": round(score, 4), "start": start}
                                 for score, text, start in answer.n_best]
            merged.append({**row, "index": index})
        return merged


def answer_spans(answer: dict, context: str) -> list[tuple[int, int]]:
    """The character spans `(start, end)` of an example's answers in its context: from `answer_start`,
    or where that is missing (None) the answer's first occurrence. ValueError, in words, for an answer
    that is not text, not where `answer_start` says, or not in the context at all."""
    spans = []
    for text, start in zip(answer["text"], answer["answer_start"]):
        if not isinstance(text, str) or not text:
            raise ValueError(f"an answer must be a non-empty text, got {text!r}")
        if start is None:
            start = context.find(text)
            if start < 0:
                raise ValueError(f"the answer {text!r} is not in the context")
        elif not (isinstance(start, int) and start >= 0 and context[start : start + len(text)] == text):
            found = context[start : start + len(text)] if isinstance(start, int) and start >= 0 else None
            raise ValueError(f"answer_start {start!r} does not point at the answer {text!r} in the context "
                             f"(the context has {found!r} there)")
        spans.append((start, start + len(text)))
    return spans


def _first_span(answer: dict, context: str) -> Optional[tuple[int, int]]:
    """The span training labels: the first answer's, without the spaces around it (a span of tokens
    cannot start or end on one); None for no answer."""
    spans = answer_spans(answer, context)
    if not spans:
        return None
    start, end = spans[0]
    while start < end and context[start].isspace():
        start += 1
    while end > start and context[end - 1].isspace():
        end -= 1
    return start, end


def _label(offsets: list[list[int]], span: Optional[tuple[int, int]], cls: int) -> tuple[int, int]:
    """Start and end token of the answer's character span in a window that holds all of it; else the CLS token."""
    if span is None:
        return cls, cls
    start, end = span
    tokens = [i for i, o in enumerate(offsets) if o != NO_CONTEXT]
    if not tokens or offsets[tokens[0]][0] > start or offsets[tokens[-1]][1] < end:
        return cls, cls
    # The tokens overlapping the answer (a character the tokenizer dropped, e.g. a combining accent,
    # belongs to no token and must not pull in the next one).
    inside = [i for i in tokens if offsets[i][1] > start and offsets[i][0] < end]
    return (inside[0], inside[-1]) if inside else (cls, cls)
