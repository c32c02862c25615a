"""Training throughput head to head: `finetune` vs a hand-written PyTorch + PEFT loop vs Hugging Face
`Trainer` + PEFT, on the same model, data, batch size, sequence length, LoRA settings, precision and
number of optimizer steps.

Every system runs in a fresh process per repeat, alternately (finetune, loop, ..., finetune, loop,
...), after one discarded warm-up round; the table gives the median and (min–max) of the repeats.

- finetune: `finetune.cli.run(["fit", ...])`, the code path of the `finetune` command (length-grouped
  batches, its defaults: CSV logger, progress bar, a checkpoint at the end).
- loop (grouped): the floor, no framework: the same batches as finetune (its length-grouped sampler,
  same seed), forward, backward, `AdamW.step`, the same linear schedule.
- loop (random): what a minimal loop does: shuffled batches, padded to their longest item.
- HF Trainer: `Trainer` + PEFT with `train_sampling_strategy="group_by_length"`.

Figures per system: training samples/s and real (non-padding) tokens/s over the steps after the
warm-up steps, the fraction of padding tokens, peak resident memory (ru_maxrss), the time from the
command's start to the end of its first optimizer step, the checkpoint size on disk, and the model
FLOP/s of the training step, 4 N per computed (padded) token (forward 2N + backward through the frozen
weights 2N, N = the encoder's linear weights; attention scores and LoRA matrices not counted), as a
fraction of this machine's dense fp32 matmul peak measured in the same run. Also `finetune --help`.

    python -m benchmarks.train_throughput --data ../shared/data/sentiment --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.data import DATA, columns, read_jsonl
from benchmarks.harness import add_run_arguments, child_commands, child_env, emit, set_threads
from benchmarks.meter import StepMeter, dir_size_mb, matmul_peak, matmul_weights, trainable_params
from benchmarks.models import MINILM, model_dir, with_lora
from benchmarks.results import cell, compare, interference_note, markdown_table, publish, ratio, versions
from benchmarks.systems import finetune_cli, hand_loop

SYSTEMS = {
    "finetune": "finetune (length-grouped)",
    "loop_grouped": "hand loop, same batches as finetune",
    "loop_random": "hand loop, random batches",
    "hf_trainer": "HF Trainer (group_by_length)",
}
LABELS = ["negative", "positive"]  # sorted: the ids finetune learns from the data
LORA = {"r": 8, "alpha": 16, "dropout": 0.1}  # finetune's LoRA for BERT: PEFT's default targets (query, value)


# --- the systems (each in its own process) ---------------------------------------------------------
def figures(meter: StepMeter, model: Any, checkpoint_mb: float) -> dict[str, Any]:
    return {**meter.result(matmul_weights(model)[0]), "checkpoint_mb": checkpoint_mb,
            "trainable_params": trainable_params(model)}


def run_finetune(args: argparse.Namespace, work: Path, meter: StepMeter) -> dict[str, Any]:
    cli = finetune_cli.run([
        "fit", f"--seed_everything={args.seed}", f"--model.backbone={MINILM}", "--model.task=TextClassification",
        f"--model.task.max_length={args.max_length}", f"--model.lora.r={LORA['r']}",
        f"--model.lora.alpha={LORA['alpha']}", f"--model.lora.dropout={LORA['dropout']}",
        "--model.optimizer=torch.optim.AdamW", f"--model.optimizer.lr={args.lr}",
        "--model.optimizer.weight_decay=0.01", f"--data.train_file={Path(args.data) / 'train.jsonl'}",
        f"--data.batch_size={args.batch_size}", "--data.group_by_length=true", "--data.num_workers=0",
        f"--data.seed={args.seed}", f"--trainer.max_steps={args.warmup + args.steps}", "--trainer.precision=32",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.log_every_n_steps=10",
        "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={work}", f"--trainer.default_root_dir={work}",
    ], step=meter)
    (checkpoint,) = Path(work).rglob("*.ckpt")
    return figures(meter, cli.model.model, dir_size_mb(checkpoint))


def classifier(task_type: str = "SEQ_CLS") -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = model_dir(MINILM)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(LABELS))
    return with_lora(model, task_type, **LORA, target_modules=["query", "value"]), AutoTokenizer.from_pretrained(path)


def tokenize(tokenizer: Any, max_length: int, batch: dict[str, list]) -> dict[str, list]:
    features = dict(tokenizer(batch["text"], truncation=True, max_length=max_length))
    features["labels"] = [LABELS.index(label) for label in batch["label"]]
    return features


def run_loop(args: argparse.Namespace, work: Path, meter: StepMeter, grouped: bool) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from finetune.sampling import LengthGroupedBatchSampler

    torch.manual_seed(args.seed)
    model, tokenizer = classifier()
    encoding = tokenize(tokenizer, args.max_length, columns(read_jsonl(Path(args.data) / "train.jsonl")))
    features = [dict(zip(encoding, values)) for values in zip(*encoding.values())]
    lengths = [len(f["input_ids"]) for f in features]
    batches = LengthGroupedBatchSampler(lengths, args.batch_size, args.seed, shuffle=True, group=grouped)
    loader = DataLoader(features, batch_sampler=batches, collate_fn=DataCollatorWithPadding(tokenizer))
    hand_loop.train(model, loader, args.warmup + args.steps, args.lr, 0.01, meter)
    model.save_pretrained(work / "adapter")  # safetensors
    return figures(meter, model, dir_size_mb(work / "adapter"))


def run_hf_trainer(args: argparse.Namespace, work: Path, meter: StepMeter) -> dict[str, Any]:
    import datasets
    from transformers import DataCollatorWithPadding, TrainingArguments

    from benchmarks.systems import hf_trainer  # (here: the other systems' processes do not import Trainer)

    model, tokenizer = classifier()
    raw = datasets.load_dataset("json", data_files=str(Path(args.data) / "train.jsonl"), split="train")
    data = raw.map(partial(tokenize, tokenizer, args.max_length), batched=True, remove_columns=raw.column_names)
    total = args.warmup + args.steps
    training_args = TrainingArguments(**hf_trainer.settings(
        work, args.batch_size, total, args.lr, 0.01, args.seed, save_strategy="steps", save_steps=total,
        train_sampling_strategy="group_by_length"))
    hf_trainer.train(model, data, DataCollatorWithPadding(tokenizer), training_args, meter, processing_class=tokenizer)
    return {**figures(meter, model, dir_size_mb(work / f"checkpoint-{total}")), "optimizer": training_args.optim.value}


def child(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    if args.child == "matmul":
        emit(matmul_peak(args.threads))
        return
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.child}-"))
    meter = StepMeter(args.warmup, args.steps)
    try:
        if args.child == "finetune":
            emit(run_finetune(args, work, meter))
        elif args.child in ("loop_grouped", "loop_random"):
            emit(run_loop(args, work, meter, grouped=args.child == "loop_grouped"))
        else:
            emit(run_hf_trainer(args, work, meter))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the driver --------------------------------------------------------------------------------------
def help_wall_time(threads: int, repeats: int = 5) -> dict[str, Any]:
    """`finetune --help`, as typed (the console script next to this Python)."""
    script = Path(sys.executable).with_name("finetune")
    command = [str(script)] if script.exists() else finetune_cli.command()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([*command, "--help"], check=True, capture_output=True, env=child_env(threads))
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA / "sentiment"), help="folder with train.jsonl")
    parser.add_argument("--steps", type=int, default=100, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="optimizer steps before the timed ones")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    add_run_arguments(parser, "train_throughput", repeats=3, warmup_rounds=1)
    parser.add_argument("--systems", default=",".join(["matmul", *SYSTEMS]))
    parser.add_argument("--child", choices=["matmul", *SYSTEMS], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    options = [f"--data={args.data}", f"--steps={args.steps}", f"--warmup={args.warmup}",
               f"--batch_size={args.batch_size}", f"--max_length={args.max_length}", f"--lr={args.lr}",
               f"--seed={args.seed}", f"--threads={args.threads}"]
    systems = child_commands(__spec__.name, args.systems.split(","), options)
    started = time.time()
    help_time = help_wall_time(args.threads)
    runs, summary, info = compare(systems, args, Path(tempfile.mkdtemp(prefix="bench-train-")))
    publish(args.output, {
        "machine": info, "versions": versions("torch", "lightning", "transformers", "peft", "accelerate", "datasets"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "output")},
        "wall_s": time.time() - started, "finetune_help": help_time, "summary": summary, "runs": runs,
    }, report(summary, help_time, args) + "\n" + interference_note(summary, runs))


def report(summary: dict[str, Any], help_time: dict[str, Any], args: argparse.Namespace) -> str:
    peak = summary["matmul"]["matmul_gflops_per_s"]["median"] if "matmul" in summary else None
    rows = []
    for name, label in SYSTEMS.items():
        if name not in summary:
            continue
        s = summary[name]
        row = [label, cell(s["samples_per_s"], ".1f"), cell(s["real_tokens_per_s"], ".0f"),
               f"{100 * s['padding_fraction']['median']:.1f}%", cell(s["peak_rss_mb"], ".0f"),
               cell(s["startup_to_first_step_s"], ".1f"), f"{s['checkpoint_mb']['median']:.2f}",
               cell(s["gflops_per_s"], ".1f")]
        row.append(f"{100 * s['gflops_per_s']['median'] / peak:.0f}%" if peak else "–")
        rows.append(row)
    header = ["system", "samples/s", "real tokens/s", "padding", "peak RSS (MB)", "start → 1st step (s)",
              "checkpoint (MB)", "model GFLOP/s", "of matmul peak"]
    lines = [markdown_table(header, rows), ""]
    if peak:
        lines.append(f"Dense fp32 matmul peak (2048², {args.threads} threads, median of rounds): {peak:.1f} GFLOP/s. "
                     f"`finetune --help`: {help_time['median_s']:.2f} s (median of {help_time['repeats']}).")
    if "finetune" in summary:
        for other in ("loop_grouped", "loop_random", "hf_trainer"):
            if other in summary:
                samples, tokens, memory = (ratio(summary, "finetune", other, key)
                                           for key in ("samples_per_s", "real_tokens_per_s", "peak_rss_mb"))
                lines.append(f"finetune / {SYSTEMS[other]}: samples/s ×{samples:.3f}, real tokens/s ×{tokens:.3f}, "
                             f"peak RSS ×{memory:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
