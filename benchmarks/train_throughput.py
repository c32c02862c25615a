"""Training throughput head to head: `finetune` vs a hand-written PyTorch + PEFT loop vs Hugging Face
`Trainer` + PEFT, on the same model, data, batch size, sequence length, LoRA settings, precision and
number of optimizer steps.

Every system runs in a fresh process per repeat, alternately (finetune, loop, ..., finetune, loop,
...), after one discarded warm-up round; the table gives the median and (min–max) of the repeats.

- finetune: `finetune.cli.run(["fit", ...])`, the code path of the `finetune` command (length-grouped
  batches, its defaults: CSV logger, progress bar, a checkpoint at the end).
- loop (grouped): the floor, no framework: the same batches as finetune (its length-grouping rule,
  same seed), forward, backward, `AdamW.step`, a linear schedule.
- loop (random): what a minimal loop does: shuffled batches, padded to their longest item.
- HF Trainer: `Trainer` + PEFT with `train_sampling_strategy="group_by_length"`.

Figures per system: training samples/s and real (non-padding) tokens/s over the steps after the
warm-up steps, the fraction of padding tokens, peak resident memory (ru_maxrss), the time from the
command's start to the end of its first optimizer step, the checkpoint size on disk, and the model
FLOP/s of the training step, 4 N per computed (padded) token (forward 2N + backward through the frozen
weights 2N, N = the encoder's linear weights; attention scores and LoRA matrices not counted), as a
fraction of this machine's dense fp32 matmul peak measured in the same run. Also `finetune --help`.

    python benchmarks/train_throughput.py --data ../shared/data/sentiment --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SHARED,
    StepClock,
    add_run_arguments,
    alternate,
    cell,
    child_commands,
    child_env,
    dir_size_mb,
    emit,
    interference_note,
    machine,
    markdown_table,
    matmul_peak,
    minilm_path,
    peak_rss_mb,
    per_token_matmul_params,
    set_threads,
    summarize,
    versions,
    write_results,
)

SYSTEMS = {
    "finetune": "finetune (length-grouped)",
    "loop_grouped": "hand loop, same batches as finetune",
    "loop_random": "hand loop, random batches",
    "hf_trainer": "HF Trainer (group_by_length)",
}
LABELS = ["negative", "positive"]  # sorted: the ids finetune learns from the data
CLOCK = StepClock()


# --- the systems (each in its own process) ---------------------------------------------------------
def read_rows(data: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (Path(data) / "train.jsonl").read_text(encoding="utf-8").splitlines()]


def lora_config(task_type: Any) -> Any:
    """finetune's LoRA for BERT: PEFT's default targets (query, value), the new head trained in full."""
    from peft import LoraConfig

    return LoraConfig(task_type=task_type, r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"])


def run_finetune(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from lightning.pytorch import Callback

    from finetune.cli import run

    class FinetuneClock(Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            CLOCK.attach(pl_module.model)

        def on_train_batch_end(self, *args: Any) -> None:
            CLOCK.step()

    setattr(sys.modules[__name__], "FinetuneClock", FinetuneClock)  # named by its class_path below
    cli = run([
        "fit", f"--seed_everything={args.seed}",
        "--model.backbone=sentence-transformers/all-MiniLM-L6-v2", "--model.task=TextClassification",
        f"--model.task.max_length={args.max_length}", "--model.lora.r=8", "--model.lora.alpha=16",
        "--model.lora.dropout=0.1", "--model.optimizer=torch.optim.AdamW", f"--model.optimizer.lr={args.lr}",
        "--model.optimizer.weight_decay=0.01", f"--data.train_file={Path(args.data) / 'train.jsonl'}",
        f"--data.batch_size={args.batch_size}", "--data.group_by_length=true", "--data.num_workers=0",
        f"--data.seed={args.seed}", f"--trainer.max_steps={args.warmup + args.steps}", "--trainer.precision=32",
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.log_every_n_steps=10",
        "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={work}", f"--trainer.default_root_dir={work}",
        f"--trainer.callbacks+={__name__}.FinetuneClock",
    ])
    checkpoints = [Path(p) for p in Path(work).rglob("*.ckpt")]
    assert len(checkpoints) == 1, checkpoints
    model = cli.model.model
    return {"checkpoint_mb": checkpoints[0].stat().st_size / 2**20, "matmul_params": per_token_matmul_params(model),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """finetune's length grouping (finetune.data.LengthGroupedBatchSampler, epoch 0), restated: a seeded
    shuffle cut into chunks of 50 batches, each sorted by length and cut into batches, batches shuffled."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), 50 * batch_size):
        part = sorted(order[start : start + 50 * batch_size], key=lambda i: -lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def run_loop(args: argparse.Namespace, work: Path, grouped: bool) -> dict[str, Any]:
    import torch
    from peft import get_peft_model
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    torch.manual_seed(args.seed)
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = read_rows(args.data)
    encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=args.max_length)
    features = [{**{k: encoded[k][i] for k in encoded}, "labels": LABELS.index(r["label"])} for i, r in enumerate(rows)]
    lengths = [len(f["input_ids"]) for f in features]
    batches = (grouped_batches(lengths, args.batch_size, args.seed) if grouped
               else random_batches(len(features), args.batch_size, args.seed))
    loader = DataLoader(features, batch_sampler=batches, collate_fn=DataCollatorWithPadding(tokenizer))
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(LABELS))
    model = get_peft_model(model, lora_config("SEQ_CLS"))
    model.train()
    CLOCK.attach(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    total = args.warmup + args.steps
    warm = max(1, int(0.1 * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / (total - warm)))
    for step, batch in enumerate(loader, start=1):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        CLOCK.step()
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}", file=sys.stderr)
        if step == total:
            break
    model.save_pretrained(work / "adapter")  # safetensors
    return {"checkpoint_mb": dir_size_mb(work / "adapter"), "matmul_params": per_token_matmul_params(model),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_hf_trainer(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import datasets
    from peft import get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    class HFClock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            CLOCK.attach(model)

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            CLOCK.step()

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    raw = datasets.load_dataset("json", data_files=str(Path(args.data) / "train.jsonl"), split="train")

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        features = tokenizer(batch["text"], truncation=True, max_length=args.max_length)
        features["labels"] = [LABELS.index(label) for label in batch["label"]]
        return features

    train = raw.map(tokenize, batched=True, remove_columns=raw.column_names)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(LABELS))
    model = get_peft_model(model, lora_config("SEQ_CLS"))
    total = args.warmup + args.steps
    training_args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=args.batch_size, max_steps=total, learning_rate=args.lr,
        weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=0.1, logging_steps=10,
        save_strategy="steps", save_steps=total, report_to="none", train_sampling_strategy="group_by_length",
        dataloader_num_workers=0, seed=args.seed, use_cpu=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=[HFClock()])
    trainer.train()
    checkpoint = work / f"checkpoint-{total}"
    return {"checkpoint_mb": dir_size_mb(checkpoint), "matmul_params": per_token_matmul_params(model),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "optimizer": training_args.optim.value}


def child(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    if args.child == "matmul":
        emit(matmul_peak(args.threads))
        return
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.child}-"))
    try:
        if args.child == "finetune":
            extra = run_finetune(args, work)
        elif args.child in ("loop_grouped", "loop_random"):
            extra = run_loop(args, work, grouped=args.child == "loop_grouped")
        else:
            extra = run_hf_trainer(args, work)
        emit({**CLOCK.result(args.warmup, extra.pop("matmul_params")), **extra, "peak_rss_mb": peak_rss_mb()})
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the driver --------------------------------------------------------------------------------------
def help_wall_time(threads: int, repeats: int = 5) -> dict[str, Any]:
    """`finetune --help`, as typed (the console script next to this Python)."""
    script = Path(sys.executable).with_name("finetune")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "finetune"]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([*command, "--help"], check=True, capture_output=True, env=child_env(threads))
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "sentiment"), help="folder with train.jsonl")
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

    script = str(Path(__file__).resolve())
    common = [f"--data={args.data}", f"--steps={args.steps}", f"--warmup={args.warmup}",
              f"--batch_size={args.batch_size}", f"--max_length={args.max_length}", f"--lr={args.lr}",
              f"--seed={args.seed}", f"--threads={args.threads}"]
    names = args.systems.split(",")
    systems = child_commands(script, names, common)
    log = Path(tempfile.mkdtemp(prefix="bench-train-")) / "children.log"
    print(f"children's output: {log}", file=sys.stderr)
    started = time.time()
    info = machine(args.threads)
    help_time = help_wall_time(args.threads)
    runs = alternate(systems, args.repeats, args.warmup_rounds, args.threads, log, args.quiet, args.max_wait)
    summary = summarize(runs)
    info["load_average_at_end"] = os.getloadavg()
    payload = {
        "command": "python " + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]]), "machine": info,
        "versions": versions("torch", "lightning", "transformers", "peft", "accelerate", "datasets"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "output")},
        "wall_s": time.time() - started, "finetune_help": help_time, "summary": summary, "runs": runs,
    }
    payload["table"] = report(summary, help_time, args) + "\n" + interference_note(summary, runs)
    path = write_results(args.output, payload)
    print(payload["table"])
    print(f"\nwritten: {path}")


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
        ft = summary["finetune"]
        for other in ("loop_grouped", "loop_random", "hf_trainer"):
            if other in summary:
                ratio = ft["samples_per_s"]["median"] / summary[other]["samples_per_s"]["median"]
                tokens = ft["real_tokens_per_s"]["median"] / summary[other]["real_tokens_per_s"]["median"]
                memory = ft["peak_rss_mb"]["median"] / summary[other]["peak_rss_mb"]["median"]
                lines.append(f"finetune / {SYSTEMS[other]}: samples/s ×{ratio:.3f}, real tokens/s ×{tokens:.3f}, "
                             f"peak RSS ×{memory:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
