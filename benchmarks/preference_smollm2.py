"""Preference tuning (DPO) of SmolLM2-135M-Instruct with LoRA on ../shared/data/preference, through `finetune`:

1. validation reward accuracy and margin before training (0.5 and 0 by construction: the model is its own
   reference) and after, and the training loss per step;
2. memory: the peak resident memory of a process that runs DPO steps against one that runs SFT steps
   (instruction tuning on the prompt + chosen conversations) on the same rows, each in a fresh process.

    python benchmarks/preference_smollm2.py        # ~10 min on 2 CPU cores
"""

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # (the Hub's SmolLM2 when cached, else the packaged copy)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "preference"
BACKBONE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def rows_of(path: Path, n: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][:n]


def common_args(work: Path, args) -> list[str]:
    return [f"--model.backbone={BACKBONE}", f"--model.task.max_length={args.max_length}",
            f"--data.batch_size={args.batch_size}", "--model.lora.target_modules=all-linear",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--seed_everything=0",
            f"--trainer.default_root_dir={work}"]


def one_step(kind: str, args) -> None:
    """In a fresh process: `max_steps` optimizer steps of DPO or SFT on the same rows; prints the peak RSS."""
    from finetune.cli import run

    work = Path(tempfile.mkdtemp(prefix=f"{kind}-memory-"))
    rows = rows_of(SHARED / "train.jsonl", args.batch_size * args.memory_steps)
    if kind == "sft":  # the same conversations, trained on the chosen reply
        rows = [{"messages": [*r["prompt"], *r["chosen"]]} for r in rows]
        task = ["--model.task=InstructionTuning"]
    else:
        task = ["--model.task=PreferenceTuning"]
    started = time.perf_counter()
    run(["fit", *task, *common_args(work, args), f"--data.train_file={write(work / 'train.jsonl', rows)}",
         f"--trainer.max_steps={args.memory_steps}", "--trainer.logger=false", "--trainer.enable_checkpointing=false"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print("RESULT " + json.dumps({"kind": kind, "peak_rss_gb": round(peak, 2),
                                  "seconds": round(time.perf_counter() - started, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser()
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
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.step:
        return one_step(args.step, args)
    from finetune.cli import run

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="preference-bench-"))
    train = write(work / "train.jsonl", rows_of(SHARED / "train.jsonl", args.train))
    val = write(work / "val.jsonl", rows_of(SHARED / "validation.jsonl", args.val))
    common = ["--model.task=PreferenceTuning", f"--model.task.beta={args.beta}", *common_args(work, args),
              f"--data.val_file={val}"]
    memory = {}
    for kind in ("sft", "dpo"):  # each in a fresh process: its own peak (first,
        # while this process is small: with the fitted model beside a DPO step, 23 GB were not enough)
        output = subprocess.run([sys.executable, __file__, "--step", kind, f"--max_length={args.max_length}",
                                 f"--batch_size={args.batch_size}", f"--memory_steps={args.memory_steps}"],
                                capture_output=True, text=True, check=True).stdout
        memory[kind] = json.loads(output.split("RESULT ", 1)[1])

    before = run(["validate", *common]).trainer.callback_metrics
    fit_started = time.perf_counter()
    cli = run(["fit", *common, f"--data.train_file={train}", f"--trainer.max_epochs={args.epochs}",
               f"--model.optimizer.lr={args.lr}", "--trainer.log_every_n_steps=1", "--trainer.logger=CSVLogger",
               f"--trainer.logger.save_dir={work}"])
    fit_seconds = time.perf_counter() - fit_started
    after = cli.trainer.callback_metrics
    (metrics_csv,) = (work / "lightning_logs").rglob("metrics.csv")  # (the CSV logger's; `validate` wrote its own)
    curve = [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(metrics_csv.open()) if r["train/loss"]]

    print(f"\nSmolLM2-135M-Instruct, LoRA r=8 all-linear, DPO (sigmoid) beta {args.beta}, lr {args.lr}, batch "
          f"{args.batch_size} pairs, max_length {args.max_length}, {args.epochs} epochs on {args.train} pairs; "
          f"validation: {args.val} pairs")
    print("| validation | before | after |\n|---|---|---|")
    for name in ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"):
        print(f"| {name} | {float(before[f'val/{name}']):.4f} | {float(after[f'val/{name}']):.4f} |")
    print("training loss per step: " + ", ".join(f"{step}: {loss:.4f}" for step, loss in curve))
    print(f"fit: {fit_seconds:.0f} s")
    print(f"peak RSS, {args.memory_steps} steps of {args.batch_size} rows (fresh process each): SFT "
          f"{memory['sft']['peak_rss_gb']} GB, DPO {memory['dpo']['peak_rss_gb']} GB")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
