"""Oracle check of the question-answering task's windowing and post-processing on real SQuAD data.

Logits are built from the gold answers (high at the gold start/end tokens in the windows that hold
the answer, at CLS elsewhere and for unanswerable questions) and go through the task's own
preprocess -> collate -> metric. Anything below EM = F1 = 100 is lost in windowing or decoding.

    python -m benchmarks.qa_oracle [path/to/squad.jsonl] [--max_length 128] [--doc_stride 48]
"""

from __future__ import annotations

import argparse
import statistics
import time

import datasets
import torch
from transformers import AutoTokenizer

from benchmarks.data import DATA
from benchmarks.models import MINILM, model_dir
from benchmarks.results import write_results
from finetune.pipeline import collate, make_features
from tasks.question_answering import QuestionAnswering

DEFAULT = DATA / "squad" / "dev_sample_v2.jsonl"


def gold_window_span(offsets: list[list[int]], context: str, answers: dict) -> tuple[int, int] | None:
    """The first gold answer's tokens in a window, found independently of the task: the context tokens
    overlapping its characters, when the window holds all of them."""
    if not answers["text"]:
        return None
    start = answers["answer_start"][0]
    end = start + len(answers["text"][0].rstrip())
    start += len(answers["text"][0]) - len(answers["text"][0].lstrip())
    inside = [i for i, (a, b) in enumerate(offsets) if a >= 0 and b > start and a < end]
    tokens = [i for i, (a, _) in enumerate(offsets) if a >= 0]
    if not inside or offsets[tokens[0]][0] > start or offsets[tokens[-1]][1] < end:
        return None
    return inside[0], inside[-1]


def oracle(task: QuestionAnswering, raw: datasets.Dataset, tokenizer, batch_size: int = 64) -> dict:
    """Oracle logits through the task; returns its metrics, windows per example and label agreement."""
    task.check_rows("val", raw, "oracle")
    features = raw.map(make_features, batched=True, with_indices=True, remove_columns=raw.column_names,
                       fn_kwargs={"task": task, "tokenizer": tokenizer, "with_targets": True})
    rows = list(features)
    metric = task.metrics("val", task.split_context("val", raw))
    agree = cut = 0
    for i in range(0, len(rows), batch_size):
        feats = rows[i : i + batch_size]
        batch = collate(feats, task, tokenizer, with_targets=True)
        start = torch.zeros(batch["input_ids"].shape)
        end = torch.zeros(batch["input_ids"].shape)
        for j, f in enumerate(feats):
            example = raw[f["index"]]
            span = gold_window_span(f["offset_mapping"], example["context"], example["answers"])
            s, e = span if span else (f["cls_index"], f["cls_index"])
            agree += (s, e) == (f["start_positions"], f["end_positions"])
            cut += span is None and _partly_inside(f["offset_mapping"], example["answers"])
            start[j, s] = end[j, e] = 10.0
        metric.update(start, end, batch["offset_mapping"], batch["cls_index"], batch["index"])
    windows = list(torch.bincount(torch.tensor([r["index"] for r in rows])).tolist())
    return {"metrics": {k: float(v) for k, v in metric.compute().items()}, "windows": windows,
            "features": len(rows), "labels_agree": agree, "cut": cut}


def _partly_inside(offsets: list[list[int]], answers: dict) -> bool:
    """Whether a window holds part, but not all, of the first answer (a window border cuts it)."""
    if not answers["text"]:
        return False
    start, end = answers["answer_start"][0], answers["answer_start"][0] + len(answers["text"][0])
    return any(a >= 0 and b > start and a < end for a, b in offsets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(DEFAULT))
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--doc_stride", type=int, default=48)
    parser.add_argument("--max_answer_length", type=int, default=30)
    parser.add_argument("--backbone", default=MINILM)
    args = parser.parse_args()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir(args.backbone))
    raw = datasets.load_dataset("json", data_files=args.data, split="train")
    task = QuestionAnswering(max_length=args.max_length, doc_stride=args.doc_stride,
                             max_answer_length=args.max_answer_length, version_2_with_negative=True)
    result = oracle(task, raw, tokenizer)
    windows = result["windows"]
    print(f"{len(raw)} questions, {result['features']} windows at max_length={args.max_length}, "
          f"doc_stride={args.doc_stride}: windows per question mean {statistics.mean(windows):.2f}, "
          f"max {max(windows)}; {sum(w > 1 for w in windows)} questions need more than one")
    print(f"task labels = independent gold token spans in {result['labels_agree']}/{result['features']} windows; "
          f"{result['cut']} windows hold only part of their answer (labelled CLS)")
    print("oracle: " + "  ".join(f"{k}={v:.2f}" for k, v in result["metrics"].items()))
    print(f"({time.perf_counter() - t0:.1f} s)")
    write_results("qa_oracle", {"settings": vars(args), **result})


if __name__ == "__main__":
    main()
