"""Short LoRA fine-tune of the pretrained MiniLM for extractive QA (SQuAD 2.0 style) through the CLI.

The shared SQuAD sample is split by article, so no context is seen in both parts: one article
(default Southern_California, 324 questions) is evaluated, the other four (1,083) train. Prints
EM/F1 of the untrained head (`finetune validate`) and after `finetune fit`, and the wall time.

    python -m benchmarks.qa_minilm [path/to/dev_sample_v2.jsonl] [--epochs 4] [--max_length 256]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch

from benchmarks.data import DATA, read_jsonl, write_jsonl
from benchmarks.models import MINILM
from benchmarks.results import write_results
from benchmarks.systems import finetune_cli
from tasks.squad import SquadMetric

DEFAULT = DATA / "squad" / "dev_sample_v2.jsonl"
KEYS = ["exact_match", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"]


def forced_answers(cli, val_file: Path) -> dict[str, float]:
    """EM/F1 of the trained model on the answerable eval questions with the no-answer option switched
    off: whether it learned to find spans, apart from when it dares to answer."""
    module = cli.model.eval()
    context = module.task.split_context("val", datasets.load_dataset("json", data_files=str(val_file), split="train"))
    metric = SquadMetric(context, dataclasses.replace(module.task.decoding, null_score_diff_threshold=float("inf")))
    with torch.no_grad():
        for batch in cli.datamodule.val_dataloader():
            out = module.task.forward(module.model, batch)
            metric.update(out.start_logits, out.end_logits, batch["offset_mapping"], batch["cls_index"], batch["index"])
    return {k: float(v) for k, v in metric.compute().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(DEFAULT))
    parser.add_argument("--eval_title", default="Southern_California")
    parser.add_argument("--backbone", default=MINILM)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--doc_stride", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--out", default=None, help="where to write the split files (default: a temp dir)")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the CLI gets its arguments from `run`, not from this script's command line

    rows = read_jsonl(args.data)
    out = Path(args.out or tempfile.mkdtemp(prefix="qa_minilm_"))
    out.mkdir(parents=True, exist_ok=True)
    train = [r for r in rows if r["title"] != args.eval_title]
    val = [r for r in rows if r["title"] == args.eval_title]
    for name, part in (("train", train), ("val", val)):
        write_jsonl(out / f"{name}.jsonl", part)
    unanswerable = sum(not r["answers"]["text"] for r in val)
    print(f"train: {len(train)} questions ({len({r['title'] for r in train})} articles); "
          f"eval: {len(val)} questions ({args.eval_title}, {unanswerable} unanswerable)")

    common = [
        f"--model.backbone={args.backbone}", "--model.task=QuestionAnswering",
        "--model.task.version_2_with_negative=true", f"--model.task.max_length={args.max_length}",
        f"--model.task.doc_stride={args.doc_stride}", f"--data.val_file={out / 'val.jsonl'}",
        f"--data.batch_size={args.batch_size}", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_model_summary=false", "--seed_everything=0",
        f"--trainer.default_root_dir={out}",
    ]
    start = time.perf_counter()
    before = finetune_cli.metrics(finetune_cli.run(["validate", *common]))
    validate_s = time.perf_counter() - start
    start = time.perf_counter()
    fit = finetune_cli.run(["fit", *common, f"--data.train_file={out / 'train.jsonl'}",
                            f"--trainer.max_epochs={args.epochs}", f"--model.optimizer.lr={args.lr}",
                            "--model.lora.target_modules=all-linear", f"--model.lora.r={args.lora_r}",
                            f"--model.lora.alpha={2 * args.lora_r}"])
    fit_s = time.perf_counter() - start
    after = finetune_cli.metrics(fit)
    forced = forced_answers(fit, out / "val.jsonl")
    windows = {split: len(fit.datamodule.features[split]) for split in ("train", "val")}

    print(f"\nMiniLM-L6 + LoRA r={args.lora_r} all-linear, max_length={args.max_length}, doc_stride={args.doc_stride}, "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}; windows: train {windows['train']}, "
          f"eval {windows['val']}")
    print(f"{'':>8}  " + "  ".join(f"{k:>12}" for k in KEYS))
    for name, metrics in (("before", before), ("after", after)):
        print(f"{name:>8}  " + "  ".join(f"{metrics[f'val/{k}']:12.2f}" for k in KEYS))
    print(f"answerable questions when the model must answer (no-answer never chosen): "
          f"EM {forced['HasAns_exact']:.2f}, F1 {forced['HasAns_f1']:.2f}")
    print(f"wall time: validate (untrained head) {validate_s:.0f} s, fit incl. per-epoch validation {fit_s:.0f} s")
    write_results("qa_minilm", {
        "settings": vars(args), "windows": windows, "before": {k: before[f"val/{k}"] for k in KEYS},
        "after": {k: after[f"val/{k}"] for k in KEYS}, "forced_answers": forced, "validate_seconds": validate_s,
        "fit_seconds": fit_s})


if __name__ == "__main__":
    main()
