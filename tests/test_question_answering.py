"""Extractive question answering: windows, labels, the SQuAD metric and the CLI end to end."""

import collections
import csv
import dataclasses
import json
import random
import re
import string
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from transformers import AutoModelForQuestionAnswering, AutoTokenizer

from conftest import SHARED, write_jsonl
from finetune.cli import main, run
from finetune.errors import InputError
from tasks.question_answering import QuestionAnswering, answer_spans
from tasks.squad import Answer, Decoding, SplitContext, best_answers

SQUAD = SHARED / "data" / "squad" / "dev_sample_v2.jsonl"
needs_squad = pytest.mark.skipif(not SQUAD.is_file(), reason="../shared/data/squad is not here")
WHERE = "data.val_file (v.jsonl)"  # how the core names a split's file in messages


def squad_rows(n=None) -> list[dict]:
    rows = [json.loads(line) for line in SQUAD.read_text(encoding="utf-8").splitlines()]
    return rows[:n] if n else rows


def row(id_, context, answer=None, start=None, question="what?") -> dict:
    """A SQuAD-style row; `start` defaults to the answer's first occurrence in the context."""
    answers = {"text": [], "answer_start": []}
    if answer is not None:
        answers = {"text": [answer], "answer_start": [context.index(answer) if start is None else start]}
    return {"id": id_, "question": question, "context": context, "answers": answers}


def without_starts(r: dict) -> dict:
    """The row with its answers' `answer_start` missing (null), as some real datasets have them."""
    return {**r, "answers": {**r["answers"], "answer_start": [None] * len(r["answers"]["text"])}}


def dataset(rows: list[dict]) -> datasets.Dataset:
    """Raw rows as the core hands them to `check_rows` and `split_context`."""
    return datasets.Dataset.from_list([{k: r[k] for k in ("id", "question", "context", "answers")} for r in rows])


def batches(task, rows, tokenizer, with_targets=True, size=16, seed=0) -> list[dict]:
    """The rows' windows batched as the core does it (preprocess, each window's example `index`, collate),
    in a shuffled order: nothing may depend on it."""
    feats = task.preprocess({k: [r[k] for r in rows] for k in rows[0]}, tokenizer, with_targets)
    index = feats.pop("overflow_to_sample_mapping")
    feats = [(dict(zip(feats, values)), i) for values, i in zip(zip(*feats.values()), index)]
    random.Random(seed).shuffle(feats)
    return [{**task.collate([f for f, _ in chunk], tokenizer, with_targets),
             "index": torch.tensor([i for _, i in chunk])}
            for chunk in (feats[i : i + size] for i in range(0, len(feats), size))]


def oracle_logits(batch, raw: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits from the gold answer, found independently of the task's labels: high on the context
    tokens overlapping the first answer's characters in windows that hold all of it, else on CLS."""
    start, end = torch.zeros(batch["input_ids"].shape), torch.zeros(batch["input_ids"].shape)
    for j, (offsets, index) in enumerate(zip(batch["offset_mapping"].tolist(), batch["index"].tolist())):
        s = e = batch["cls_index"][j].item()
        answers = raw[index]["answers"]
        if answers["text"]:
            a = answers["answer_start"][0]
            b = a + len(answers["text"][0])
            context = [i for i, (x, _) in enumerate(offsets) if x >= 0]
            inside = [i for i in context if offsets[i][1] > a and offsets[i][0] < b]
            if offsets[context[0]][0] <= a and offsets[context[-1]][1] >= b:
                s, e = inside[0], inside[-1]
        start[j, s] = end[j, e] = 10.0
    return start, end


class FakeModel:
    """Stands in for the backbone in `task.predict`: returns the logits it was given."""

    def __call__(self, **inputs):
        return SimpleNamespace(start_logits=self.start, end_logits=self.end)


def predicted(task, model, batch, tokenizer) -> list[dict]:
    """`task.predict` on a batch, each row with its example `index` (as the core adds it)."""
    return [dict(p, index=i) for p, i in zip(task.predict(model, batch, tokenizer), batch["index"].tolist())]


def run_oracle(task: QuestionAnswering, raw: list[dict], tokenizer):
    """Oracle logits through collate -> metric (val split), and predict -> merge_predictions (predict split)."""
    metric, model, rows = task.metrics("val", task.split_context("val", dataset(raw))), FakeModel(), []
    for batch in batches(task, raw, tokenizer):
        start, end = oracle_logits(batch, raw)
        assert batch["start_positions"].tolist() == start.argmax(1).tolist()  # the task's own labels agree
        assert batch["end_positions"].tolist() == end.argmax(1).tolist()
        metric.update(start, end, batch["offset_mapping"], batch["cls_index"], batch["index"])
    for batch in batches(task, raw, tokenizer, with_targets=False):
        model.start, model.end = oracle_logits(batch, raw)
        rows += predicted(task, model, batch, tokenizer)
    merged = task.merge_predictions(sorted(rows, key=lambda r: r["index"]), task.split_context("predict", dataset(raw)))
    return metric, {k: v.item() for k, v in metric.compute().items()}, merged


def test_the_task_is_its_options():
    task = QuestionAnswering(version_2_with_negative=True, n_best=5)
    assert QuestionAnswering(**task.config()["init_args"]) == task  # what a checkpoint restores
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.n_best = 3
    fields = {f.name for f in dataclasses.fields(task)}
    assert {c.option for c in task.columns()} <= fields and "name" not in fields
    assert task.model_class(None) is AutoModelForQuestionAnswering
    assert task.split_context("train", dataset([row("a", "x y", "y")])) is None  # training needs only features


# --- the oracle: windowing + decoding lose nothing on real data ---------------------------------
@needs_squad
def test_oracle_logits_give_full_marks_on_real_squad(tiny_bert):
    raw = squad_rows()
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    task = QuestionAnswering(max_length=128, doc_stride=48, version_2_with_negative=True)
    task.check_rows("val", dataset(raw), WHERE)
    val = batches(task, raw, tokenizer)
    windows = collections.Counter(i for batch in val for i in batch["index"].tolist())
    assert len(windows) == 1407 and max(windows.values()) >= 4
    assert sum(n > 1 for n in windows.values()) > 500  # many contexts need several windows
    # some windows hold only part of their answer: labelled CLS there, correctly in a neighbour
    cut = 0
    for batch in val:
        for offsets, index, start, cls in zip(batch["offset_mapping"].tolist(), batch["index"].tolist(),
                                              batch["start_positions"].tolist(), batch["cls_index"].tolist()):
            answers = raw[index]["answers"]
            if answers["text"] and start == cls:
                a, b = answers["answer_start"][0], answers["answer_start"][0] + len(answers["text"][0])
                cut += any(x >= 0 and y > a and x < b for x, y in offsets)
    assert cut > 0

    metric, scores, predictions = run_oracle(task, raw, tokenizer)
    assert scores == {"exact_match": 100.0, "f1": 100.0, "HasAns_exact": 100.0, "HasAns_f1": 100.0,
                      "NoAns_exact": 100.0, "NoAns_f1": 100.0}
    # windows seen twice (as a distributed sampler that pads by repeating would give) change nothing
    start, end = oracle_logits(val[0], raw)
    metric.update(start, end, val[0]["offset_mapping"], val[0]["cls_index"], val[0]["index"])
    assert {k: v.item() for k, v in metric.compute().items()} == scores

    # the predict path decodes the same: exact gold substrings, "" for every unanswerable question
    assert [p["id"] for p in predictions] == [r["id"] for r in raw]
    for p, r in zip(predictions, raw):
        if r["answers"]["text"]:  # a gold answer, to the character (the first, or one the token covers)
            assert (p["answer"], p["start"]) in set(zip(r["answers"]["text"], r["answers"]["answer_start"]))
        else:
            assert p["answer"] == "" and p["start"] is None


# --- the metric is the official SQuAD v2.0 evaluation --------------------------------------------
# A literal transcription of the official evaluate-v2.0.py (normalize_answer, compute_exact,
# compute_f1, get_raw_scores, make_eval_dict), kept independent of the task's implementation.
def official_normalize_answer(s):
    def remove_articles(text):
        regex = re.compile(r"\b(a|an|the)\b", re.UNICODE)
        return re.sub(regex, " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def official_get_tokens(s):
    if not s:
        return []
    return official_normalize_answer(s).split()


def official_compute_exact(a_gold, a_pred):
    return int(official_normalize_answer(a_gold) == official_normalize_answer(a_pred))


def official_compute_f1(a_gold, a_pred):
    gold_toks = official_get_tokens(a_gold)
    pred_toks = official_get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def official_evaluate(rows: list[dict], preds: dict[str, str]) -> dict[str, float]:
    exact_scores, f1_scores, has_ans = {}, {}, []
    for qa in rows:
        qid = qa["id"]
        gold_answers = [a for a in qa["answers"]["text"] if official_normalize_answer(a)]
        if not gold_answers:
            gold_answers = [""]
        exact_scores[qid] = max(official_compute_exact(a, preds[qid]) for a in gold_answers)
        f1_scores[qid] = max(official_compute_f1(a, preds[qid]) for a in gold_answers)
        if qa["answers"]["text"]:
            has_ans.append(qid)
    total = len(exact_scores)
    out = {"exact_match": 100.0 * sum(exact_scores.values()) / total, "f1": 100.0 * sum(f1_scores.values()) / total}
    no_ans = [k for k in exact_scores if k not in set(has_ans)]
    for name, qids in (("HasAns", has_ans), ("NoAns", no_ans)):
        if qids:
            out[f"{name}_exact"] = 100.0 * sum(exact_scores[k] for k in qids) / len(qids)
            out[f"{name}_f1"] = 100.0 * sum(f1_scores[k] for k in qids) / len(qids)
    return out


TRICKY = [  # normalisation traps next to the real rows
    row("t1", "It was the Eiffel Tower, in Paris.", "the Eiffel Tower"),
    row("t2", "A cat, an owl and the dog met.", "an owl"),
    row("t3", "Numbers: 3.14 and 2,718 (approx.)", "2,718 (approx.)"),
    {**row("t4", "They said “yes” — the answer, twice!", "yes"),  # "the" normalises to nothing: not a gold
     "answers": {"text": ["yes", "“yes”", "the"], "answer_start": [11, 10, 18]}},
    row("t5", "Nothing to see here.", None),
]


@pytest.mark.parametrize("version_2", [True, False])
def test_metric_equals_the_official_squad_evaluation(tiny_bert, version_2):
    raw = TRICKY + (squad_rows() if SQUAD.is_file() else [])
    raw = [r for r in raw if version_2 or r["answers"]["text"]]
    task = QuestionAnswering(max_length=96, doc_stride=32, version_2_with_negative=version_2)
    rng = random.Random(0)
    first_window = {}  # example -> (batch, row, holds the answer) of the window its prediction goes in
    val = batches(task, raw, AutoTokenizer.from_pretrained(tiny_bert))
    for b, batch in enumerate(val):
        for j, index in enumerate(batch["index"].tolist()):
            gold = batch["start_positions"][j] != batch["cls_index"][j]
            if index not in first_window or (gold and not first_window[index][2]):
                first_window[index] = (b, j, bool(gold))
    expected, metric = {}, task.metrics("val", task.split_context("val", dataset(raw)))
    plants = {}
    for index, (b, j, gold) in first_window.items():
        offsets = val[b]["offset_mapping"][j]
        context = [i for i in range(len(offsets)) if offsets[i][0] >= 0]
        kind = rng.choice(["gold", "perturbed", "random"] + (["none"] if version_2 else []))
        if kind == "none":
            expected[raw[index]["id"]] = ""
            continue
        if kind in ("gold", "perturbed") and gold:
            s, e = val[b]["start_positions"][j].item(), val[b]["end_positions"][j].item()
        else:
            s = rng.choice(context)
            e = s + rng.randint(0, 6)
        if kind == "perturbed":
            s, e = s + rng.randint(-3, 3), e + rng.randint(-3, 3)
        s, e = min(max(s, context[0]), context[-1]), min(max(e, context[0]), context[-1])
        s, e = min(s, e), max(s, e)
        e = min(e, s + 29)
        plants[b, j] = (s, e)
        expected[raw[index]["id"]] = raw[index]["context"][offsets[s][0].item() : offsets[e][1].item()]
    for b, batch in enumerate(val):
        start = torch.zeros(batch["input_ids"].shape)
        end = torch.zeros(batch["input_ids"].shape)
        rows = torch.arange(len(start))
        start[rows, batch["cls_index"]] = end[rows, batch["cls_index"]] = 5.0  # no-answer score 10 everywhere
        for j in range(len(start)):
            if (b, j) in plants:
                s, e = plants[b, j]
                start[j, s], end[j, e] = 8.0, 8.0  # 16 beats the no-answer score
        metric.update(start, end, batch["offset_mapping"], batch["cls_index"], batch["index"])
    ours = {k: v.item() for k, v in metric.compute().items()}
    official = official_evaluate(raw, expected)
    if not version_2:
        official = {k: official[k] for k in ("exact_match", "f1")}
    assert ours.keys() == official.keys()
    for key in official:
        assert ours[key] == pytest.approx(official[key], abs=1e-9), key
    assert 20 < ours["exact_match"] < 80  # a real mix of right and wrong answers


@pytest.mark.parametrize("version_2, threshold", [(False, 0.0), (True, 0.0), (True, 2.0)])
def test_metric_and_predict_give_the_same_answers(tiny_bert, version_2, threshold):
    """Both decode through `best_answers`: the metric with each window's best span, predict with its
    n best. On the same windows and logits they answer the same, whatever the order of the windows."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    raw = [r for r in TRICKY + UNICODE + code_rows(40, seed=3) if version_2 or r["answers"]["text"]]
    task = QuestionAnswering(max_length=48, doc_stride=16, max_answer_length=6, n_best=5, output_n_best=True,
                             version_2_with_negative=version_2, null_score_diff_threshold=threshold)
    val = batches(task, raw, tokenizer, size=8)
    assert any(n > 1 for n in collections.Counter(i for b in val for i in b["index"].tolist()).values())
    generator, model, logits, rows = torch.Generator().manual_seed(0), FakeModel(), [], []
    for batch in val:
        model.start, model.end = (3 * torch.randn(batch["input_ids"].shape, generator=generator) for _ in "se")
        model.start[torch.arange(len(batch["index"])), batch["cls_index"]] += 8.0  # the no-answer score competes
        logits.append((model.start, model.end))
        rows += predicted(task, model, batch, tokenizer)
    merged = task.merge_predictions(sorted(rows, key=lambda r: r["index"]), task.split_context("predict", dataset(raw)))
    answers = [p["answer"] for p in merged]
    assert len(merged) == len(raw) and answers.count("") < len(raw) // 2
    assert not version_2 or answers.count("") > 2

    def scored(context: SplitContext) -> dict[str, float]:
        metric = task.metrics("val", context)
        for batch, (start, end) in [*zip(val, logits)][::-1] + [(val[0], logits[0])]:  # another order, a repeat
            metric.update(start, end, batch["offset_mapping"], batch["cls_index"], batch["index"])
        return {k: v.item() for k, v in metric.compute().items()}

    context = task.split_context("val", dataset(raw))
    official = official_evaluate(raw, {p["id"]: p["answer"] for p in merged})
    scores = scored(context)
    assert scores == pytest.approx({k: official[k] for k in scores}, abs=1e-9)
    # and answer for answer: against predict's answers as the gold ones, the metric gets full marks
    assert scored(dataclasses.replace(context, answers=tuple((a,) for a in answers)))["exact_match"] == 100.0


def test_best_answers_do_not_depend_on_the_order_or_repeats_of_windows():
    decoding = Decoding(n_best=3, max_answer_length=30, version_2_with_negative=True, null_score_diff_threshold=0.0)
    a = ([(5.0, 2, 4), (5.0, 0, 1), (1.0, 6, 8)], 3.0)
    b = ([(5.0, 0, 1), (2.0, 6, 8)], 4.0)  # span (0, 1) again; (6, 8) with a better score
    for windows in ([a, b], [b, a], [b, a, b]):  # ties go to the earliest span; the smallest no-answer score
        assert best_answers({7: windows}, {7: "abcdefghij"}, decoding) == {
            7: Answer("a", 0, 5.0, [(5.0, "a", 0), (5.0, "cd", 2), (3.0, "", None)])}
    # no answer: the no-answer score wins by more than the threshold, or (any version) no window has a span
    close = {0: [([(1.0, 0, 1)], 2.5)]}
    assert best_answers(close, ["abc"], dataclasses.replace(decoding, null_score_diff_threshold=1.0))[0].text == ""
    assert best_answers(close, ["abc"], dataclasses.replace(decoding, null_score_diff_threshold=2.0))[0].text == "a"
    v1 = dataclasses.replace(decoding, version_2_with_negative=False)
    assert best_answers(close, ["abc"], v1)[0].text == "a"
    assert best_answers({0: [([], 9.0)]}, ["abc"], v1)[0] == Answer("", None, 9.0, [])


def test_scores_by_hand():
    from tasks.squad import squad_scores

    scores = squad_scores(["The Eiffel Tower!", "tower in Paris", "", "", "Paris", "Eiffel-Tower"],
                          [["Eiffel Tower"], ["the Eiffel Tower"], [], ["x"], [], ["Eiffel Tower"]])
    # EM: 1, 0, 1, 0, 0, 0 ("eiffeltower": punctuation is dropped, not spaced)
    # F1: 1, 0.4 (1 common token: precision 1/3, recall 1/2), 1, 0, 0, 0
    assert scores["exact_match"] == pytest.approx(100 * 2 / 6)
    assert scores["f1"] == pytest.approx(100 * 2.4 / 6)
    assert scores["HasAns_exact"] == pytest.approx(100 / 4) and scores["NoAns_exact"] == pytest.approx(50.0)


# --- windows and labels at the edges --------------------------------------------------------------
def features(task, rows, tokenizer):
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    return task.preprocess(batch, tokenizer, with_targets=True)


def labelled_text(feats, i, context):
    offsets = feats["offset_mapping"][i]
    s, e = feats["start_positions"][i], feats["end_positions"][i]
    return None if s == feats["cls_index"][i] else context[offsets[s][0] : offsets[e][1]]


def test_answers_at_the_edges_of_the_context_and_of_windows(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    task = QuestionAnswering(max_length=24, doc_stride=8, version_2_with_negative=True)
    words = "table chair window paper river stone cloud street door lamp green small old blue quiet".split()
    context = " ".join(words * 3)  # 45 one-token words: windows of 19 context tokens, 8 overlapping
    # the border: window 0's last context token, and an answer from one token before it to two after
    first = features(task, [row("a", context, "table")], tokenizer)
    k = sum(o[0] >= 0 for o in first["offset_mapping"][0]) - 1  # window 0's last context token
    whole = tokenizer(context, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    cross = context[whole[k - 1][0] : whole[k + 2][1]]
    rows = [row("start", context, "table chair", start=0),
            row("end", context, "old blue quiet", start=len(context) - len("old blue quiet")),
            row("cross", context, cross, start=whole[k - 1][0]),
            row("none", context)]
    feats = features(task, rows, tokenizer)
    assert cross.split() == (words * 3)[k - 1 : k + 3]
    by_example = collections.defaultdict(list)
    for i, example in enumerate(feats["overflow_to_sample_mapping"]):
        by_example[example].append(labelled_text(feats, i, context))
    assert len(by_example[0]) == 4  # 45 tokens: windows from token 0, 11, 22 and 33
    assert by_example[0][0] == "table chair" and set(by_example[0][1:]) == {None}
    assert by_example[1][-1] == "old blue quiet" and set(by_example[1][:-1]) == {None}
    assert by_example[2][0] is None  # window 0 holds only the first two tokens of the answer
    assert by_example[2][1] == cross and set(by_example[2][2:]) == {None}
    assert set(by_example[3]) == {None}
    # offsets of non-context tokens are marked, so no span can start in the question
    for offsets, ids in zip(feats["offset_mapping"], feats["input_ids"]):
        assert offsets[:4] == [[-1, -1]] * 4 and offsets[-1] == [-1, -1]  # [CLS] what ? [SEP] ... [SEP]
        assert ids[0] == tokenizer.cls_token_id and len(ids) <= 24


UNICODE = [
    row("fr", "Le café « Flore » à Paris a ouvert en 1887.", "à Paris"),
    row("fr2", "Le café « Flore » à Paris a ouvert en 1887.", "café « Flore »"),
    row("ja", "東京タワーは東京都港区にある。", "港区"),
    row("emoji", "I love 🍕 and 🎉 parties, Zoë said.", "🍕"),
    row("emoji2", "I love 🍕 and 🎉 parties, Zoë said.", "🎉 parties, Zoë"),
    row("mid", "The Frankish kingdoms fell.", "Frank"),  # inside a token: the whole token comes back
]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_unicode_answers_map_back_to_their_exact_substring(tiny_bert, padding_side):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert, padding_side=padding_side)
    task = QuestionAnswering(max_length=32, doc_stride=8, version_2_with_negative=True)
    feats = features(task, UNICODE, tokenizer)
    found = collections.defaultdict(set)
    for i, example in enumerate(feats["overflow_to_sample_mapping"]):
        found[example].add(labelled_text(feats, i, UNICODE[example]["context"]))
    expected = [r["answers"]["text"][0] for r in UNICODE[:-1]] + ["Frankish"]
    assert [found[i] - {None} for i in range(len(UNICODE))] == [{e} for e in expected]
    if padding_side == "left":  # context first (as HF's reference for left-padding models), still right labels
        assert feats["offset_mapping"][0][1] != [-1, -1] and feats["token_type_ids"][0][1] == 0
    # and through collate, the metric and predict
    _, scores, predictions = run_oracle(task, UNICODE, tokenizer)
    assert scores["exact_match"] == pytest.approx(100 * 5 / 6)  # "Frank" comes back as "Frankish"
    assert [p["answer"] for p in predictions] == expected


# --- bad input, and answers without their offset -------------------------------------------------
def test_bad_answer_start_names_the_example():
    rows = [row("fine", "Paris is in France.", "France"), row("off-by-one", "Paris is in France.", "France", start=11)]
    with pytest.raises(InputError, match=r"v\.jsonl\), id 'off-by-one': answer_start 11 .*'France'.*' Franc'"):
        QuestionAnswering().check_rows("val", dataset(rows), WHERE)
    bad = [{**rows[0], "answers": {"text": ["France"], "answer_start": [12, 3]}}]
    with pytest.raises(InputError, match=r"id 'fine'.*equal length"):
        QuestionAnswering().check_rows("test", dataset(bad), WHERE)
    QuestionAnswering().check_rows("predict", dataset(bad), WHERE)  # predict reads no answers


def test_a_missing_answer_start_is_located_in_the_context(tiny_bert, monkeypatch):
    told = []
    monkeypatch.setattr("tasks.question_answering.rank_zero_info", told.append)
    context = "Paris is in France. France is big."
    assert answer_spans({"text": ["France", "Paris"], "answer_start": [None, 0]}, context) == [(12, 18), (0, 5)]
    rows = [without_starts(row("a", context, "France")), row("b", context, "big"),
            without_starts({**row("c", context), "answers": {"text": ["is big", "France."], "answer_start": [0, 0]}})]
    task = QuestionAnswering()
    task.check_rows("val", dataset(rows), WHERE)
    assert told == [f"{WHERE}: located 3 answers whose answer_start was missing "
                    "(at the answer's first occurrence in the context)"]
    task.check_rows("val", dataset(rows[1:2]), WHERE)
    assert len(told) == 1  # nothing to tell
    # training labels the located span: the first occurrence
    feats = features(task, rows, AutoTokenizer.from_pretrained(tiny_bert))
    for i, expected in enumerate([12, context.index("big"), context.index("is big")]):
        assert feats["offset_mapping"][i][feats["start_positions"][i]][0] == expected
        assert labelled_text(feats, i, context) == rows[i]["answers"]["text"][0]


def test_an_answer_not_in_its_context_is_said_plainly():
    rows = [row("fine", "Paris is in France.", "France"), without_starts(row("x", "Paris is in France.", "France"))]
    rows[1]["answers"]["text"] = ["Lyon"]
    with pytest.raises(InputError) as caught:
        QuestionAnswering().check_rows("train", dataset(rows), WHERE)
    assert str(caught.value) == f"{WHERE}, id 'x': the answer 'Lyon' is not in the context"


def test_unanswerable_questions_need_version_2(tiny_bert, tmp_path, capsys):
    rows = [row("a", "Paris is in France.", "France"), row("b", "No answer.")]
    with pytest.raises(InputError, match=r"id 'b'.*version_2_with_negative: true"):
        QuestionAnswering().check_rows("train", dataset(rows), WHERE)
    feats = features(QuestionAnswering(version_2_with_negative=True), rows, AutoTokenizer.from_pretrained(tiny_bert))
    assert feats["start_positions"] == [7, 0]  # [CLS] what ? [SEP] paris is in france
    # through the CLI: the message reaches the user
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(SystemExit):
        main(["fit", f"--model.backbone={tiny_bert}", "--model.task=question_answering", f"--data.train_file={path}",
              f"--trainer.default_root_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert "id 'b'" in err and "version_2_with_negative: true" in err


def test_long_questions_and_slow_tokenizers_are_explained(tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    task = QuestionAnswering(max_length=32, doc_stride=16)
    long = row("long", "Paris is in France.", "France", question="why " * 14)
    with pytest.raises(InputError, match=r"id 'long'.*14 tokens.*raise max_length or lower doc_stride"):
        features(task, [long], tokenizer)
    with pytest.raises(InputError, match="fast tokenizer"):
        task.preprocess({}, SimpleNamespace(is_fast=False), True)
    with pytest.raises(InputError, match="doc_stride"):
        QuestionAnswering(max_length=128, doc_stride=128)


def test_nested_squad_json_reads_as_flat_rows(tmp_path, monkeypatch):
    nested = {"version": "v2.0", "data": [
        {"title": "France", "paragraphs": [{"context": "Paris is in France.", "qas": [
            {"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]},
            {"id": "q2", "question": "Who?", "answers": [], "is_impossible": True,
             "plausible_answers": [{"text": "Paris", "answer_start": 0}]}]}]},
        {"title": "Rivers", "paragraphs": [{"context": "The Seine flows.", "qas": [
            {"id": "q3", "question": "What flows?", "answers": [{"text": "Seine", "answer_start": 4},
                                                                {"text": "The Seine"}]}]}]},  # no offset
    ]}
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps(nested))
    task = QuestionAnswering(version_2_with_negative=True)
    flat = task.read_file(str(path))
    assert flat.column_names == ["id", "title", "context", "question", "answers"]
    assert flat[1] == {"id": "q2", "title": "France", "context": "Paris is in France.", "question": "Who?",
                       "answers": {"text": [], "answer_start": []}}
    assert flat[2]["answers"] == {"text": ["Seine", "The Seine"], "answer_start": [4, None]}
    told = []
    monkeypatch.setattr("tasks.question_answering.rank_zero_info", told.append)
    task.check_rows("val", flat, str(path))
    assert len(told) == 1 and "located 1 answer whose answer_start was missing" in told[0]
    assert task.split_context("val", flat) == SplitContext(
        ("q1", "q2", "q3"), ("Paris is in France.", "Paris is in France.", "The Seine flows."),
        (("France",), (), ("Seine", "The Seine")))
    # flat JSON and JSON Lines are the core's
    (tmp_path / "flat.json").write_text(json.dumps([row("a", "x y", "y")]))
    assert task.read_file(str(tmp_path / "flat.json")) is None
    assert task.read_file(write_jsonl(tmp_path / "rows.jsonl", [row("a", "x y", "y")])) is None


# --- end to end through the CLI ------------------------------------------------------------------
FILL = "table chair window paper river stone cloud street door lamp green small old blue quiet".split()
CODES = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def code_rows(n: int, seed: int) -> list[dict]:
    """Learnable toy QA: "... the code is X ..." (every fourth context has no code), long enough
    that some contexts need two windows of 64 tokens."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        before = " ".join(rng.choices(FILL, k=rng.randint(2, 40)))
        after = " ".join(rng.choices(FILL, k=rng.randint(2, 20)))
        if i % 4 == 3:
            rows.append(row(f"q{seed}-{i}", f"{before} . {after} .", question="what is the code?"))
        else:
            code = rng.choice(CODES)
            rows.append(row(f"q{seed}-{i}", f"{before} . the code is {code} . {after} .", code,
                            start=len(before) + len(" . the code is "), question="what is the code?"))
    return rows


def test_fit_validate_predict_end_to_end(tiny_bert, tmp_path):
    train, val = code_rows(64, seed=1), code_rows(24, seed=2)
    files = {"train": write_jsonl(tmp_path / "train.jsonl", train), "val": write_jsonl(tmp_path / "val.jsonl", val),
             "predict": write_jsonl(tmp_path / "predict.jsonl", [{k: r[k] for k in ("id", "question", "context")}
                                                                  for r in val])}
    task_args = ["--model.task=QuestionAnswering", "--model.task.version_2_with_negative=true",
                 "--model.task.max_length=64", "--model.task.doc_stride=16"]
    common = ["--trainer.enable_progress_bar=false", "--data.batch_size=8"]
    run(["fit", f"--model.backbone={tiny_bert}", *task_args, *common, f"--data.train_file={files['train']}",
         f"--data.val_file={files['val']}", "--model.optimizer.lr=0.01", "--model.lora.target_modules=all-linear",
         "--trainer.max_epochs=3", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=CSVLogger",
         f"--trainer.logger.save_dir={tmp_path}", "--trainer.enable_model_summary=false", "--seed_everything=0"])
    (metrics_csv,) = tmp_path.rglob("metrics.csv")
    losses = [float(r["train/loss_epoch"]) for r in csv.DictReader(metrics_csv.open()) if r.get("train/loss_epoch")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    (ckpt,) = tmp_path.rglob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert any("qa_outputs.modules_to_save" in k for k in state)  # the head is trained in full, not LoRA'd
    assert all("lora_" in k or "qa_outputs.modules_to_save" in k for k in state)

    validated = run(["validate", f"--model.backbone={tiny_bert}", *task_args, *common, f"--ckpt_path={ckpt}",
                     f"--data.val_file={files['val']}", f"--trainer.default_root_dir={tmp_path}/validate"])
    scores = {k: float(v) for k, v in validated.trainer.callback_metrics.items()}
    for name in ["val/exact_match", "val/f1", "val/HasAns_exact", "val/HasAns_f1", "val/NoAns_exact", "val/NoAns_f1"]:
        assert 0.0 <= scores[name] <= 100.0
    assert scores["val/f1"] >= scores["val/exact_match"]

    out = tmp_path / "predictions.jsonl"
    # settings given on the command line win over the checkpoint's (the task was trained without n-best output)
    main(["predict", f"--model.backbone={tiny_bert}", *task_args, *common, f"--ckpt_path={ckpt}",
          "--model.task.output_n_best=true", "--model.task.n_best", "5",
          f"--data.predict_file={files['predict']}", f"--predictions.output_file={out}",
          f"--trainer.default_root_dir={tmp_path}/predict"])
    predictions = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["id"] for p in predictions] == [r["id"] for r in val]
    for p, r in zip(predictions, val):
        assert set(p) == {"id", "answer", "score", "start", "n_best"}
        if p["answer"]:
            assert r["context"][p["start"] : p["start"] + len(p["answer"])] == p["answer"]
        else:
            assert p["start"] is None
        assert 1 <= len(p["n_best"]) <= 5 and p["n_best"][0]["answer"] == p["answer"]
        assert [c["score"] for c in p["n_best"]] == sorted((c["score"] for c in p["n_best"]), reverse=True)
    # the predictions score exactly what validation reported (same windows, same decoding)
    official = official_evaluate(val, {p["id"]: p["answer"] for p in predictions})
    assert official["exact_match"] == pytest.approx(scores["val/exact_match"], abs=1e-4)
    assert official["f1"] == pytest.approx(scores["val/f1"], abs=1e-4)


def test_config_file_describes_the_task(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(Path(__file__).parents[1] / "configs" / "question_answering.yaml"),
              "--print_config"])
    out = capsys.readouterr().out
    for key in ["backbone: sentence-transformers/all-MiniLM-L6-v2",
                "class_path: tasks.question_answering.QuestionAnswering", "version_2_with_negative: true",
                "doc_stride: 128", "monitor: val/f1"]:
        assert key in out
