"""Preference tuning (DPO, KTO, ORPO, SimPO) of SmolLM2-135M-Instruct with LoRA on ../shared/data/preference,
through `finetune`:

1. per method, in a fresh process: the validation metrics before training (DPO and KTO: rewards 0 by construction,
   the model is its own reference) and after, the training loss per step, the fit's time and the process's peak
   resident memory (DPO and KTO also run the reference: the adapter switched off; ORPO and SimPO run none);
2. memory: the peak resident memory of a process that runs SFT steps (instruction tuning on the prompt + chosen
   conversations) on the same rows, the baseline of the methods' peaks (`--memory_steps 0` skips it).

KTO learns from unpaired rows: the benchmark derives them from the pairs, each pair's chosen completion a desirable
row and its rejected completion an undesirable one (twice the rows, the same text). Each method's rewards are its
own (TRL's definitions): DPO and KTO beta x the log-ratio to the reference, ORPO and SimPO beta x the mean per-token
log-probability, so the figures compare a method's before with its after, not methods with each other.

    python -m benchmarks.preference_smollm2                         # all four, ~40 min on 2 CPU cores
    python -m benchmarks.preference_smollm2 --methods kto,orpo,simpo --train 48 --val 32 --epochs 1
"""

import argparse
import csv
import json
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
PAIRED = "tasks.preference_tuning.PreferenceTuning"
#: method -> (task class, its options); betas and SimPO's gamma as TRL's defaults, but SimPO's beta (its paper: 2-2.5)
METHODS = {
    "dpo": (PAIRED, {"loss_type": "sigmoid", "beta": 0.1}),
    "kto": ("tasks.unpaired_preference_tuning.UnpairedPreferenceTuning", {"beta": 0.1}),
    "orpo": (PAIRED, {"loss_type": "orpo", "beta": 0.1}),
    "simpo": (PAIRED, {"loss_type": "simpo", "beta": 2.0, "gamma": 0.5}),
}
FIGURES = {"paired": ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"),
           "kto": ("loss", "reward_margin", "chosen_reward", "rejected_reward", "kl")}


def unpaired(pairs: list[dict]) -> list[dict]:
    """KTO's rows from pairs: the chosen completions desirable, the rejected ones undesirable."""
    return [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for side in ("chosen", "rejected") for p in pairs]


def common_args(work: Path, args: argparse.Namespace) -> list[str]:
    return [f"--model.backbone={SMOLLM2}", f"--data.batch_size={args.batch_size}",
            "--model.lora.target_modules=all-linear", f"--model.backbone_dtype={args.dtype}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--seed_everything=0", f"--trainer.default_root_dir={work}"]


def task_arg(method: str, args: argparse.Namespace) -> str:
    class_path, options = METHODS[method]
    return "--model.task=" + json.dumps({"class_path": class_path,
                                         "init_args": {**options, "max_length": args.max_length}})


def method_run(method: str, args: argparse.Namespace) -> None:
    """In a fresh process: one method's validation before, its fit and validation after; reports them."""
    work = Path(tempfile.mkdtemp(prefix=f"{method}-"))
    train_pairs = read_jsonl(PREFERENCE / "train.jsonl", args.train)
    val_pairs = read_jsonl(PREFERENCE / "validation.jsonl", args.val)
    if method == "kto":
        train_pairs, val_pairs = unpaired(train_pairs), unpaired(val_pairs)
    train, val = write_jsonl(work / "train.jsonl", train_pairs), write_jsonl(work / "val.jsonl", val_pairs)
    common = [task_arg(method, args), *common_args(work, args), f"--data.val_file={val}"]
    before = finetune_cli.metrics(finetune_cli.run(["validate", *common]))
    fit_started = time.perf_counter()
    after = finetune_cli.metrics(finetune_cli.run([
        "fit", *common, f"--data.train_file={train}", f"--trainer.max_epochs={args.epochs}",
        f"--model.optimizer.lr={args.lr}", "--trainer.log_every_n_steps=1", "--trainer.logger=CSVLogger",
        f"--trainer.logger.save_dir={work}", "--trainer.enable_checkpointing=false"]))
    fit_seconds = time.perf_counter() - fit_started
    (metrics_csv,) = (work / "lightning_logs").rglob("metrics.csv")  # (the CSV logger's; `validate` wrote its own)
    curve = [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(metrics_csv.open()) if r["train/loss"]]
    figures = FIGURES["kto" if method == "kto" else "paired"]
    emit({"method": method, "before": {k: before[f"val/{k}"] for k in figures},
          "after": {k: after[f"val/{k}"] for k in figures}, "loss_curve": curve, "fit_seconds": fit_seconds,
          "train_rows": len(train_pairs), "val_rows": len(val_pairs), "peak_rss_gb": round(peak_rss_mb() / 1024, 2)})


def sft_memory(args: argparse.Namespace) -> None:
    """In a fresh process: `memory_steps` optimizer steps of SFT on the pairs' prompt + chosen conversations."""
    work = Path(tempfile.mkdtemp(prefix="sft-memory-"))
    rows = [{"messages": [*r["prompt"], *r["chosen"]]}
            for r in read_jsonl(PREFERENCE / "train.jsonl", args.batch_size * args.memory_steps)]
    train = write_jsonl(work / "train.jsonl", rows)
    finetune_cli.run(["fit", "--model.task=InstructionTuning", f"--model.task.max_length={args.max_length}",
                      *common_args(work, args), f"--data.train_file={train}",
                      f"--trainer.max_steps={args.memory_steps}", "--trainer.logger=false",
                      "--trainer.enable_checkpointing=false"])
    emit({"method": "sft", "peak_rss_gb": round(peak_rss_mb() / 1024, 2)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="dpo,kto,orpo,simpo", help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument("--train", type=int, default=64, help="training pairs (of 250; KTO: twice as many rows)")
    parser.add_argument("--val", type=int, default=50, help="validation pairs (of 50)")
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=8, help="pairs (KTO: rows) per batch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="the frozen weights' dtype and autocast (bf16: this CPU has AVX512_BF16)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--memory_steps", type=int, default=2, help="SFT steps of the memory baseline (0: none)")
    parser.add_argument("--run", choices=[*METHODS, "sft"], help=argparse.SUPPRESS)  # (a child process)
    args = parser.parse_args()
    if args.run:
        return sft_memory(args) if args.run == "sft" else method_run(args.run, args)

    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
    started = time.perf_counter()
    log = Path(tempfile.mkdtemp(prefix="preference-bench-")) / "children.log"
    options = [f"--{name}={getattr(args, name)}" for name in ("train", "val", "max_length", "batch_size", "epochs",
                                                             "lr", "memory_steps", "dtype")]
    # each in a fresh process: its own peak memory, and no fitted model of another method beside it
    runs = {method: measured(module_command(__spec__.name, "--run", method, *options), log, child_env())
            for method in (["sft"] if args.memory_steps else []) + methods}

    print(f"\nSmolLM2-135M-Instruct, LoRA r=8 all-linear, lr {args.lr}, batch {args.batch_size}, max_length "
          f"{args.max_length}, {args.epochs} epochs on {args.train} pairs (KTO: {2 * args.train} rows); validation: "
          f"{args.val} pairs (KTO: {2 * args.val} rows)")
    for method in methods:
        run = runs[method]
        print(f"\n{method.upper()} {METHODS[method][1]}: fit {run['fit_seconds']:.0f} s, peak RSS "
              f"{run['peak_rss_gb']} GB (validate + fit)")
        print(markdown_table(["validation", "before", "after"],
                             [[name, f"{value:.4f}", f"{run['after'][name]:.4f}"]
                              for name, value in run["before"].items()]))
        print("training loss per step: " + ", ".join(f"{step}: {loss:.4f}" for step, loss in run["loss_curve"]))
    if args.memory_steps:
        print(f"\npeak RSS of SFT, {args.memory_steps} steps of {args.batch_size} rows: "
              f"{runs['sft']['peak_rss_gb']} GB")
    print(f"total {time.perf_counter() - started:.0f} s")
    write_results("preference_smollm2", {"settings": vars(args), "runs": runs})


if __name__ == "__main__":
    main()
