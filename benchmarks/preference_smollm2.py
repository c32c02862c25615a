"""Preference tuning (DPO) of SmolLM2-135M-Instruct with LoRA on ../shared/data/preference, through `finetune`:

1. validation reward accuracy and margin before training (0.5 and 0 by construction: the model is its own
   reference) and after, and the training loss per step;
2. memory: the peak resident memory of a process that runs DPO steps against one that runs SFT steps
   (instruction tuning on the prompt + chosen conversations) on the same rows, each in a fresh process.

    python -m benchmarks.preference_smollm2        # ~10 min on 2 CPU cores
"""

import argparse
import csv
import tempfile
import time
from pathlib import Path

from benchmarks.data import DATA, read_jsonl, write_jsonl
from benchmarks.harness import child_env, emit, measured, module_command
from benchmarks.meter import peak_rss_mb
from benchmarks.models import SMOLLM2
from benchmarks.results import markdown_table, write_results
from benchmarks.systems import finetune_cli

PREFERENCE = DATA / "preference"
FIGURES = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")


def common_args(work: Path, args: argparse.Namespace) -> list[str]:
    return [f"--model.backbone={SMOLLM2}", f"--model.task.max_length={args.max_length}",
            f"--data.batch_size={args.batch_size}", "--model.lora.target_modules=all-linear",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--seed_everything=0",
            f"--trainer.default_root_dir={work}"]


def memory_steps(kind: str, args: argparse.Namespace) -> None:
    """In a fresh process: `memory_steps` optimizer steps of DPO or SFT on the same rows; reports the peak RSS."""
    work = Path(tempfile.mkdtemp(prefix=f"{kind}-memory-"))
    rows = read_jsonl(PREFERENCE / "train.jsonl", args.batch_size * args.memory_steps)
    if kind == "sft":  # the same conversations, trained on the chosen reply
        rows = [{"messages": [*r["prompt"], *r["chosen"]]} for r in rows]
        task = ["--model.task=InstructionTuning"]
    else:
        task = ["--model.task=PreferenceTuning"]
    started = time.perf_counter()
    train = write_jsonl(work / "train.jsonl", rows)
    finetune_cli.run(["fit", *task, *common_args(work, args), f"--data.train_file={train}",
                      f"--trainer.max_steps={args.memory_steps}", "--trainer.logger=false",
                      "--trainer.enable_checkpointing=false"])
    emit({"kind": kind, "peak_rss_gb": round(peak_rss_mb() / 1024, 2),
          "seconds": round(time.perf_counter() - started, 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=64, help="training pairs (of 250)")
    parser.add_argument("--val", type=int, default=50, help="validation pairs (of 50)")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--memory_steps", type=int, default=2)
    parser.add_argument("--step", choices=["dpo", "sft"], help=argparse.SUPPRESS)  # (a child process)
    args = parser.parse_args()
    if args.step:
        return memory_steps(args.step, args)

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="preference-bench-"))
    train = write_jsonl(work / "train.jsonl", read_jsonl(PREFERENCE / "train.jsonl", args.train))
    val = write_jsonl(work / "val.jsonl", read_jsonl(PREFERENCE / "validation.jsonl", args.val))
    common = ["--model.task=PreferenceTuning", f"--model.task.beta={args.beta}", *common_args(work, args),
              f"--data.val_file={val}"]
    # Each kind in a fresh process: its own peak (first, while this process is small: with the fitted model beside
    # a DPO step, 23 GB were not enough).
    options = [f"--max_length={args.max_length}", f"--batch_size={args.batch_size}",
               f"--memory_steps={args.memory_steps}"]
    memory = {kind: measured(module_command(__spec__.name, "--step", kind, *options), work / "memory.log", child_env())
              for kind in ("sft", "dpo")}

    before = finetune_cli.metrics(finetune_cli.run(["validate", *common]))
    fit_started = time.perf_counter()
    after = finetune_cli.metrics(finetune_cli.run([
        "fit", *common, f"--data.train_file={train}", f"--trainer.max_epochs={args.epochs}",
        f"--model.optimizer.lr={args.lr}", "--trainer.log_every_n_steps=1", "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={work}"]))
    fit_seconds = time.perf_counter() - fit_started
    (metrics_csv,) = (work / "lightning_logs").rglob("metrics.csv")  # (the CSV logger's; `validate` wrote its own)
    curve = [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(metrics_csv.open()) if r["train/loss"]]

    print(f"\nSmolLM2-135M-Instruct, LoRA r=8 all-linear, DPO (sigmoid) beta {args.beta}, lr {args.lr}, batch "
          f"{args.batch_size} pairs, max_length {args.max_length}, {args.epochs} epochs on {args.train} pairs; "
          f"validation: {args.val} pairs")
    print(markdown_table(["validation", "before", "after"],
                         [[name, f"{before[f'val/{name}']:.4f}", f"{after[f'val/{name}']:.4f}"] for name in FIGURES]))
    print("training loss per step: " + ", ".join(f"{step}: {loss:.4f}" for step, loss in curve))
    print(f"fit: {fit_seconds:.0f} s")
    print(f"peak RSS, {args.memory_steps} steps of {args.batch_size} rows (fresh process each): SFT "
          f"{memory['sft']['peak_rss_gb']} GB, DPO {memory['dpo']['peak_rss_gb']} GB")
    print(f"total {time.perf_counter() - started:.0f} s")
    write_results("preference_smollm2", {
        "settings": vars(args), "before": {k: before[f"val/{k}"] for k in FIGURES},
        "after": {k: after[f"val/{k}"] for k in FIGURES}, "loss_curve": curve, "fit_seconds": fit_seconds,
        "memory": memory})


if __name__ == "__main__":
    main()
