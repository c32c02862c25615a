"""Extractive question answering (SQuAD v1.1 / v2.0): find the answer span to a question in a context.

Long contexts are cut into overlapping windows (features); the core gives each window its example
`index`. A window's best span and its no-answer score are kept in a torchmetrics `Metric`, so an
example's windows are combined across steps and, under DDP, across processes before the
answer is chosen; EM/F1 follow the official SQuAD evaluation script.
"""

from __future__ import annotations

import collections
import itertools
import json
import re
import string
from typing import Any, Optional

import datasets
import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat
from transformers import AutoModelForQuestionAnswering

from finetune.errors import InputError
from finetune.task import MODEL_INPUTS, Task

NO_CONTEXT = [-1, -1]  # offsets of tokens that are not context (question, special tokens, padding)


class QuestionAnswering(Task):
    """Args:
    question_column / context_column / id_column: the question, the text holding the answer, a unique id.
    answers_column: SQuAD's `{"text": [...], "answer_start": [...]}` (character offsets into the
        context; empty lists: unanswerable). Training uses the first answer; evaluation the best match.
    max_length: tokens per window (question + context); longer contexts get several windows,
        overlapping by `doc_stride` tokens.
    n_best: start and end logits considered per window (and answers listed by `output_n_best`).
    max_answer_length: longest answer, in tokens.
    version_2_with_negative: questions may have no answer (SQuAD 2.0); the answer is "" when the
        no-answer score beats the best span by more than `null_score_diff_threshold`.
    output_n_best: `predict` also writes the `n_best` best answers per question.
    """

    name = "question_answering"
    auto_model = AutoModelForQuestionAnswering
    head_modules = ("qa_outputs",)

    def __init__(
        self,
        question_column: str = "question",
        context_column: str = "context",
        answers_column: str = "answers",
        id_column: str = "id",
        max_length: int = 384,
        doc_stride: int = 128,
        n_best: int = 20,
        max_answer_length: int = 30,
        version_2_with_negative: bool = False,
        null_score_diff_threshold: float = 0.0,
        output_n_best: bool = False,
    ) -> None:
        if not 0 <= doc_stride < max_length:
            raise InputError(f"model.task.init_args.doc_stride ({doc_stride}) must be in [0, max_length={max_length})")
        self.question_column = question_column
        self.context_column = context_column
        self.answers_column = answers_column
        self.id_column = id_column
        self.max_length = max_length
        self.doc_stride = doc_stride
        self.n_best = n_best
        self.max_answer_length = max_answer_length
        self.version_2_with_negative = version_2_with_negative
        self.null_score_diff_threshold = null_score_diff_threshold
        self.output_n_best = output_n_best
        # What evaluation and prediction need of each split ({"id", "context", "answers"}), kept by
        # `prepare` and looked up when the metric computes (the metric may exist before the split).
        self.kept: dict[str, dict[str, list]] = {}

    def input_columns(self) -> dict[str, str]:
        return {"question_column": self.question_column, "context_column": self.context_column,
                "id_column": self.id_column}

    def target_columns(self) -> dict[str, str]:
        return {"answers_column": self.answers_column}

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
                                                  "answer_start": [a["answer_start"] for a in answers]},
                        })
        except (KeyError, TypeError) as err:
            raise InputError(f"{path}: not valid SQuAD JSON (missing or malformed {err})") from err
        text = datasets.Value("string")
        features = datasets.Features({
            self.id_column: text, "title": text, self.context_column: text, self.question_column: text,
            self.answers_column: {"text": datasets.List(text), "answer_start": datasets.List(datasets.Value("int64"))},
        })
        return datasets.Dataset.from_list(rows, features=features)

    def prepare(self, split: str, dataset: Any, source: str) -> None:
        ids, contexts = list(dataset[self.id_column]), list(dataset[self.context_column])
        for id_, context, question in zip(ids, contexts, dataset[self.question_column]):
            if not isinstance(context, str) or not isinstance(question, str):
                raise InputError(f"{source}, id {id_!r}: question and context must be text")
        answers = list(dataset[self.answers_column]) if split != "predict" else None
        for id_, context, answer in zip(ids, contexts, answers or []):
            self._check_answers(answer, context, f"{source}, id {id_!r}")
        if split != "train":  # training needs only the features
            self.kept[split] = {"id": [str(i) for i in ids], "context": contexts,
                                "answers": [a["text"] for a in answers] if answers else None}

    def _check_answers(self, answer: Any, context: str, where: str) -> None:
        column = f"column {self.answers_column!r}"
        if not (isinstance(answer, dict) and isinstance(answer.get("text"), list)
                and isinstance(answer.get("answer_start"), list)
                and len(answer["text"]) == len(answer["answer_start"])):
            raise InputError(f"{where}: {column} must be {{'text': [...], 'answer_start': [...]}} with lists of "
                             f"equal length (empty for no answer), got {answer!r}")
        if not answer["text"] and not self.version_2_with_negative:
            raise InputError(f"{where}: the question has no answer; for data with unanswerable questions "
                             "(SQuAD 2.0) set model.task.init_args.version_2_with_negative: true")
        for text, start in zip(answer["text"], answer["answer_start"]):
            ok = isinstance(text, str) and text and isinstance(start, int) and start >= 0
            if not ok or context[start : start + len(text)] != text:
                found = context[start : start + len(text)] if ok else None
                raise InputError(f"{where}: answer_start {start!r} does not point at the answer {text!r} in the "
                                 f"context (the context has {found!r} there)")

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
        starts, ends = [], []
        for i, (ids, offsets) in enumerate(zip(encoded["input_ids"], encoded["offset_mapping"])):
            offsets = [list(o) if s == context_id else NO_CONTEXT for o, s in zip(offsets, encoded.sequence_ids(i))]
            cls = ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in ids else 0
            features["offset_mapping"].append(offsets)
            features["cls_index"].append(cls)
            if with_targets:
                answer = examples[self.answers_column][encoded["overflow_to_sample_mapping"][i]]
                start, end = _label(offsets, answer, contexts[encoded["overflow_to_sample_mapping"][i]], cls)
                starts.append(start)
                ends.append(end)
        if with_targets:
            features["start_positions"], features["end_positions"] = starts, ends
        return features

    def _check_question_lengths(self, questions: list[str], ids: list, tokenizer: Any) -> None:
        # The tokenizer panics (not a Python error) when a window has no room beyond the stride.
        room = self.max_length - tokenizer.num_special_tokens_to_add(pair=True) - self.doc_stride
        for id_, q in zip(ids, tokenizer(questions, add_special_tokens=False)["input_ids"]):
            if len(q) >= room:
                raise InputError(f"id {id_!r}: the question has {len(q)} tokens, which leaves no room for the "
                                 f"context in windows of max_length={self.max_length} tokens overlapping by "
                                 f"doc_stride={self.doc_stride}; raise max_length or lower doc_stride")

    def collate(self, features: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        # Always pad on the right: token positions (labels, cls_index, offsets) then stay valid.
        inputs = [{k: f[k] for k in MODEL_INPUTS if k in f} for f in features]
        batch = dict(tokenizer.pad(inputs, padding=True, padding_side="right", return_tensors="pt"))
        length = batch["input_ids"].shape[1]
        batch["offset_mapping"] = torch.tensor(
            [f["offset_mapping"] + [NO_CONTEXT] * (length - len(f["offset_mapping"])) for f in features]
        ).view(len(features), length, 2)
        for key in ("cls_index", "start_positions", "end_positions", "index"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features])
        return batch

    # --- model ---------------------------------------------------------------------------------
    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # As HF's QA heads: the mean of the start and end cross-entropies.
        start = F.cross_entropy(outputs.start_logits.float(), batch["start_positions"])
        end = F.cross_entropy(outputs.end_logits.float(), batch["end_positions"])
        return (start + end) / 2

    # --- evaluation ----------------------------------------------------------------------------
    def metrics(self, split: str) -> MetricCollection:
        if split == "train":  # EM/F1 of dropout-noisy training windows would cost, and say little
            return MetricCollection({})
        return MetricCollection({"squad": SquadMetric(self, split)}, compute_groups=False)

    def evaluates(self, split: str, epoch: int) -> bool:
        return split != "train"

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict, model: Any) -> None:
        metrics.update(outputs.start_logits, outputs.end_logits, batch["offset_mapping"], batch["cls_index"],
                       batch["index"])

    # --- prediction ----------------------------------------------------------------------------
    def predict(self, model: Any, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        outputs = self.forward(model, batch)
        scores, starts, ends, null = best_spans(outputs.start_logits, outputs.end_logits, batch["offset_mapping"],
                                                batch["cls_index"], self.n_best, self.max_answer_length, self.n_best)
        return [{"candidates": [[sc, s, e] for sc, s, e in zip(*row) if sc != float("-inf")], "null_score": n}
                for *row, n in zip(scores.tolist(), starts.tolist(), ends.tolist(), null.tolist())]

    def merge_predictions(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        kept = self.kept["predict"]
        merged = []
        for index, windows in itertools.groupby(rows, key=lambda row: row["index"]):
            windows = list(windows)
            spans: dict[tuple[int, int], float] = {}  # overlapping windows find the same span: keep its best
            for score, start, end in (c for w in windows for c in w["candidates"]):
                spans[start, end] = max(score, spans.get((start, end), score))
            ranked = sorted(((score, span) for span, score in spans.items()), key=lambda c: (-c[0], c[1]))
            null = min(w["null_score"] for w in windows)
            context = kept["context"][index]
            if self._is_null(ranked[0][0] if ranked else float("-inf"), null):
                row = {"id": kept["id"][index], "answer": "", "score": round(null, 4), "start": None}
            else:
                score, (start, end) = ranked[0]
                row = {"id": kept["id"][index], "answer": context[start:end], "score": round(score, 4), "start": start}
            if self.output_n_best:
                n_best = [(score, context[s:e], s) for score, (s, e) in ranked]
                if self.version_2_with_negative:
                    n_best.append((null, "", None))
                row["n_best"] = [{"answer": a, "score": round(sc, 4), "start": s}
                                 for sc, a, s in sorted(n_best, key=lambda c: -c[0])[: self.n_best]]
            merged.append({**row, "index": index})
        return merged

    def _is_null(self, best: float, null: float) -> bool:
        """No answer: no valid span at all, or (SQuAD 2.0) the no-answer score wins by the threshold."""
        if best == float("-inf"):
            return True
        return self.version_2_with_negative and null > best + self.null_score_diff_threshold


def _label(offsets: list[list[int]], answer: dict, context: str, cls: int) -> tuple[int, int]:
    """Start and end token of the (first) answer in a window that holds all of it; else the CLS token."""
    if not answer["text"]:
        return cls, cls
    start = answer["answer_start"][0]
    end = start + len(answer["text"][0])
    while start < end and context[start].isspace():  # a span of tokens cannot start or end on a space
        start += 1
    while end > start and context[end - 1].isspace():
        end -= 1
    tokens = [i for i, o in enumerate(offsets) if o != NO_CONTEXT]
    if not tokens or offsets[tokens[0]][0] > start or offsets[tokens[-1]][1] < end:
        return cls, cls
    # The tokens overlapping the answer (a character the tokenizer dropped, e.g. a combining accent,
    # belongs to no token and must not pull in the next one).
    inside = [i for i in tokens if offsets[i][1] > start and offsets[i][0] < end]
    return (inside[0], inside[-1]) if inside else (cls, cls)


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


class SquadMetric(Metric):
    """EM and F1 (0-100) of the official SQuAD v1.1/v2.0 script, over whole examples.

    `update` keeps, per window, its best span and its no-answer score (tensors, concatenated across
    processes). `compute` takes per example the best span over its windows and the smallest
    no-answer score (as HF's reference); a window seen twice (a distributed sampler pads with repeats)
    changes neither, and each example counts once.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, task: QuestionAnswering, split: str) -> None:
        super().__init__()
        self.settings = {k: getattr(task, k) for k in ("n_best", "max_answer_length", "version_2_with_negative",
                                                        "null_score_diff_threshold")}
        self.kept, self.split = task.kept, split  # the split's examples, looked up at compute time
        for name in ("index", "score", "start", "end", "null"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, start_logits: torch.Tensor, end_logits: torch.Tensor, offsets: torch.Tensor,
               cls_index: torch.Tensor, index: torch.Tensor) -> None:
        scores, starts, ends, null = best_spans(start_logits, end_logits, offsets, cls_index,
                                                self.settings["n_best"], self.settings["max_answer_length"], 1)
        for name, value in zip(("index", "score", "start", "end", "null"), (index, scores[:, 0], starts[:, 0],
                                                                            ends[:, 0], null)):
            getattr(self, name).append(value)

    def compute(self) -> dict[str, torch.Tensor]:
        if isinstance(self.index, list) and not self.index:  # (after a sync the states are tensors)
            return {"exact_match": torch.tensor(0.0, dtype=torch.float64), "f1": torch.tensor(0.0, dtype=torch.float64)}
        index, score, start, end, null = (dim_zero_cat(getattr(self, n)).cpu()
                                          for n in ("index", "score", "start", "end", "null"))
        # Best window per example, ties broken by position so the order of windows does not matter.
        order = torch.argsort(end, stable=True)
        for key, descending in ((start, False), (score, True), (index, False)):
            order = order[torch.argsort(key[order], stable=True, descending=descending)]
        first = torch.ones(len(order), dtype=torch.bool)
        first[1:] = index[order][1:] != index[order][:-1]
        best = order[first]
        examples, inverse = torch.unique(index, return_inverse=True)  # ascending, as `best`
        null = torch.full((len(examples),), float("inf")).scatter_reduce(0, inverse, null, "amin")
        kept = self.kept.get(self.split)
        if kept is None or kept["answers"] is None:
            raise RuntimeError(f"no {self.split} examples kept: the task's prepare() did not see this split")
        predictions, golds = [], []
        for example, row, null_score in zip(examples.tolist(), best.tolist(), null.tolist()):
            s, e, sc = int(start[row]), int(end[row]), float(score[row])
            thr = self.settings["null_score_diff_threshold"]
            is_null = sc == float("-inf") or (self.settings["version_2_with_negative"] and null_score > sc + thr)
            predictions.append("" if is_null else kept["context"][example][s:e])
            golds.append(kept["answers"][example])
        scores = squad_scores(predictions, golds)
        if not self.settings["version_2_with_negative"]:
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
