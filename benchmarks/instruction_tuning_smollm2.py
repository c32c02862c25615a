"""Instruction tuning and language modelling on SmolLM2-135M-Instruct, through `finetune` itself:

1. LoRA on alpaca-style rows (../shared/data/alpaca): validation perplexity before and after a short fit,
   and the replies to three validation prompts before and after;
2. raw text (../shared/data/c4): perplexity before and after a short fit on text windows;
3. packing: the padding share of finetune's training batches over the whole alpaca train split (its sampler and
   the task's collate), with and without packing, random and length-grouped; and training tokens/s (real tokens:
   forward, backward and AdamW step, `finetune fit` with the step meter) with and without packing.

    python -m benchmarks.instruction_tuning_smollm2    # ~10 min on 2 CPU cores, ~3 GB of memory
    python -m benchmarks.instruction_tuning_smollm2 --backbone gemma-3-270m --parts alpaca \
        --chat_template configs/gemma3_chat_template.jinja --output instruction_tuning_gemma3

(Another backbone with `--backbone`; a base model such as Gemma 3 270M learns the chat template `--chat_template`.)

(SmolLM2's activations take ~2 MB per token in training: batch 16 x 256 tokens needs ~15 GB.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.data import DATA, columns, read_jsonl, write_jsonl
from benchmarks.harness import set_threads
from benchmarks.meter import StepMeter
from benchmarks.models import SMOLLM2, task_for
from benchmarks.results import write_results
from benchmarks.systems import finetune_cli


def fit_and_compare(work: Path, task: list[str], train: list[dict], val: list[dict], args: argparse.Namespace,
                    predict: Optional[list[dict]] = None) -> dict[str, Any]:
    """Validation before (a fresh LoRA adapter is zero: the backbone itself) and after one epoch of LoRA."""
    files = {"train": write_jsonl(work / "train.jsonl", train), "val": write_jsonl(work / "val.jsonl", val)}
    common = [f"--model.backbone={args.backbone}", *task, f"--data.batch_size={args.batch_size}",
              "--model.lora.target_modules=all-linear", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--trainer.logger=false", "--seed_everything=0",
              f"--trainer.default_root_dir={work}"]
    result: dict[str, Any] = {}
    before = finetune_cli.metrics(finetune_cli.run(["validate", *common, f"--data.val_file={files['val']}"]))
    result["perplexity_before"] = before["val/perplexity"]
    if predict:
        result["predictions_before"] = predictions(common, work / "before.jsonl", predict)
    start = time.perf_counter()
    after = finetune_cli.metrics(finetune_cli.run([
        "fit", *common, f"--data.train_file={files['train']}", f"--data.val_file={files['val']}",
        "--trainer.max_epochs=1", f"--model.optimizer.lr={args.lr}"]))
    result["fit_seconds"] = time.perf_counter() - start
    result["perplexity_after"] = after["val/perplexity"]
    result["token_accuracy_after"] = after["val/token_accuracy"]
    if predict:
        (ckpt,) = [p for p in work.rglob("*.ckpt") if p.name != "last.ckpt"][:1]
        result["predictions_after"] = predictions([*common, f"--ckpt_path={ckpt}"], work / "after.jsonl", predict)
    return result


def predictions(common: list[str], out: Path, rows: list[dict]) -> list[str]:
    finetune_cli.run(["predict", *common, f"--data.predict_file={write_jsonl(out.with_suffix('.in.jsonl'), rows)}",
                      f"--predictions.output_file={out}", "--model.task.generation.max_new_tokens=48"])
    return [row["generated_text"] for row in read_jsonl(out)]


def padding_shares(args: argparse.Namespace) -> dict[str, float]:
    """The padding share of one epoch of finetune's training batches over the alpaca train split: its sampler
    (plain shuffled or length-grouped; with packing, best-fit rows) and the task's collate."""
    from finetune.sampling import LengthGroupedBatchSampler
    from tasks.instruction_tuning import InstructionTuning

    train = read_jsonl(DATA / "alpaca" / "train.jsonl")
    task, tokenizer = task_for(InstructionTuning(format="prompt", max_length=args.max_length), args.backbone)
    made = task.preprocess(columns(train), tokenizer, True)
    features = [{k: v[i] for k, v in made.items()} for i in range(len(made["input_ids"]))]
    lengths = [len(f["input_ids"]) for f in features]
    shares = {}
    for packed in (task, task.with_options(packing=True)):
        for grouped in (False, True):
            real = total = 0
            for batch in LengthGroupedBatchSampler(lengths, args.batch_size, 0, shuffle=True, group=grouped,
                                                   row_tokens=packed.packed_row_length()):
                real += sum(lengths[i] for i in batch)
                total += packed.collate([dict(features[i]) for i in batch], tokenizer, True)["input_ids"].numel()
            key = f"padding_{'packed' if packed.packing else 'unpacked'}_{'grouped' if grouped else 'random'}"
            shares[key] = 1 - real / total
    return shares


def packing_throughput(work: Path, args: argparse.Namespace) -> dict[str, float]:
    """Real training tokens/s of `finetune fit` without and with packing (one warm-up step, then the timed ones)."""
    train = write_jsonl(work / "packing_train.jsonl", read_jsonl(DATA / "alpaca" / "train.jsonl"))
    found = {}
    for packing in (False, True):
        meter = StepMeter(1, args.throughput_steps)
        finetune_cli.run([
            "fit", f"--model.backbone={args.backbone}", "--model.task=InstructionTuning", "--model.task.format=prompt",
            f"--model.task.packing={str(packing).lower()}", f"--model.task.max_length={args.max_length}",
            "--model.lora.target_modules=all-linear", f"--model.optimizer.lr={args.lr}",
            f"--data.train_file={train}", f"--data.batch_size={args.batch_size}",
            f"--trainer.max_steps={1 + args.throughput_steps}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
            "--seed_everything=1", f"--trainer.default_root_dir={work / 'packing'}"], step=meter)
        found[f"tokens_per_second_{'packed' if packing else 'unpacked'}"] = meter.result()["real_tokens_per_s"]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alpaca_train", type=int, default=48)
    parser.add_argument("--alpaca_val", type=int, default=24)
    parser.add_argument("--c4_train", type=int, default=8)
    parser.add_argument("--c4_val", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--throughput_steps", type=int, default=2)
    parser.add_argument("--backbone", default=SMOLLM2)
    parser.add_argument("--chat_template", help="a Jinja file: the chat template a base model learns")
    parser.add_argument("--parts", default="alpaca,c4,packing", help="comma-separated: alpaca, c4, packing")
    parser.add_argument("--output", default="instruction_tuning_smollm2", help="the JSON file in benchmarks/results")
    args = parser.parse_args()
    parts = args.parts.split(",")
    set_threads(2)
    work = Path(tempfile.mkdtemp(prefix="instruction-bench-"))
    started = time.perf_counter()

    alpaca_val = read_jsonl(DATA / "alpaca" / "validation.jsonl")
    prompts = [{"instruction": r["instruction"], "input": r["input"]} for r in alpaca_val[:3]]
    (work / "alpaca").mkdir()
    template = [f"--model.task.init_args.chat.chat_template={args.chat_template}"] if args.chat_template else []
    alpaca = c4 = packed = None
    if "alpaca" in parts:
        alpaca = fit_and_compare(
            work / "alpaca", ["--model.task=InstructionTuning", "--model.task.format=prompt",
                              "--model.task.packing=true", f"--model.task.max_length={args.max_length}", *template],
            read_jsonl(DATA / "alpaca" / "train.jsonl", args.alpaca_train), alpaca_val[:args.alpaca_val], args,
            prompts)
    if "c4" in parts:
        (work / "c4").mkdir()
        c4 = fit_and_compare(
            work / "c4", ["--model.task=InstructionTuning", "--model.task.format=text", "--model.task.packing=true",
                          f"--model.task.max_length={args.max_length}"],
            read_jsonl(DATA / "c4" / "train.jsonl", args.c4_train),
            read_jsonl(DATA / "c4" / "validation.jsonl", args.c4_val), args)
    if "packing" in parts:
        packed = {**padding_shares(args), **packing_throughput(work, args)}

    print(f"\n{args.backbone}, LoRA r=8 all-linear, lr {args.lr}, batch {args.batch_size}, max_length "
          f"{args.max_length}, one epoch, packing on; 2 threads")
    if alpaca:
        print(f"alpaca ({args.alpaca_train} train / {args.alpaca_val} validation rows): val perplexity "
              f"{alpaca['perplexity_before']:.3f} -> {alpaca['perplexity_after']:.3f} (token accuracy after "
              f"{alpaca['token_accuracy_after']:.3f}; fit {alpaca['fit_seconds']:.0f} s)")
        for prompt, before, after in zip(prompts, alpaca["predictions_before"], alpaca["predictions_after"]):
            print(f"  prompt: {prompt['instruction']!r} {prompt['input']!r}\n    before: {before!r}\n"
                  f"    after:  {after!r}")
    if c4:
        print(f"c4 raw text ({args.c4_train} train / {args.c4_val} validation documents, windows of "
              f"{args.max_length}): val perplexity {c4['perplexity_before']:.3f} -> {c4['perplexity_after']:.3f} "
              f"(fit {c4['fit_seconds']:.0f} s)")
    if packed:
        print(f"padding share, alpaca train (800 rows, batch {args.batch_size}): "
              + ", ".join(f"{k.removeprefix('padding_').replace('_', ' ')} {v:.1%}" for k, v in packed.items()
                          if k.startswith("padding")))
        print(f"training tokens/s (real tokens, {args.throughput_steps} timed steps of `finetune fit`): unpacked "
              f"{packed['tokens_per_second_unpacked']:.0f}, packed {packed['tokens_per_second_packed']:.0f}")
    print(f"total {time.perf_counter() - started:.0f} s")
    write_results(args.output, {"settings": vars(args), "alpaca": alpaca, "c4": c4, "packing": packed})


if __name__ == "__main__":
    main()
