"""Instruction tuning and language modelling on SmolLM2-135M-Instruct, through `finetune` itself:

1. LoRA on alpaca-style rows (../shared/data/alpaca): validation perplexity before and after a short fit,
   and the replies to three validation prompts before and after;
2. raw text (../shared/data/c4): perplexity before and after a short fit on text windows;
3. packing: the padding share of training batches over the whole alpaca train split, with and without
   packing (random and length-grouped batches), and training tokens/s (real tokens, forward + backward +
   AdamW step) on the same batches with and without packing.

    python benchmarks/instruction_tuning_smollm2.py            # ~10 min on 2 CPU cores, ~3 GB of memory

(SmolLM2's activations take ~2 MB per token in training: batch 16 x 256 tokens needs ~15 GB.)
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # (the Hub's SmolLM2 when cached, else the packaged copy)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BACKBONE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def metric(cli, name: str) -> float:
    return float(cli.trainer.callback_metrics[name])


def fit_and_compare(work: Path, task: list[str], train: list[dict], val: list[dict], args, predict=None) -> dict:
    """Validation before (a fresh LoRA adapter is zero: the backbone itself) and after one epoch of LoRA."""
    from finetune.cli import run

    files = {"train": write(work / "train.jsonl", train), "val": write(work / "val.jsonl", val)}
    common = [f"--model.backbone={BACKBONE}", *task, f"--data.batch_size={args.batch_size}",
              "--model.lora.target_modules=all-linear", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--trainer.logger=false", "--seed_everything=0",
              f"--trainer.default_root_dir={work}"]
    result = {}
    before = run(["validate", *common, f"--data.val_file={files['val']}"])
    result["perplexity_before"] = metric(before, "val/perplexity")
    if predict:
        result["predictions_before"] = predictions(run, common, work / "before.jsonl", predict)
    start = time.perf_counter()
    cli = run(["fit", *common, f"--data.train_file={files['train']}", f"--data.val_file={files['val']}",
               "--trainer.max_epochs=1", f"--model.optimizer.lr={args.lr}"])
    result["fit_seconds"] = time.perf_counter() - start
    result["perplexity_after"] = metric(cli, "val/perplexity")
    result["token_accuracy_after"] = metric(cli, "val/token_accuracy")
    if predict:
        (ckpt,) = [p for p in work.rglob("*.ckpt") if p.name != "last.ckpt"][:1]
        result["predictions_after"] = predictions(run, [*common, f"--ckpt_path={ckpt}"], work / "after.jsonl",
                                                  predict)
    return result


def predictions(run, common: list[str], out: Path, rows: list[dict]) -> list[str]:
    run(["predict", *common, f"--data.predict_file={write(out.with_suffix('.in.jsonl'), rows)}",
         f"--predictions.output_file={out}", "--model.task.generation.max_new_tokens=48"])
    return [json.loads(line)["generated_text"] for line in out.read_text().splitlines()]


def padding_share(task, tokenizer, features: list[dict], batch_size: int, grouped: bool, seed: int = 0) -> float:
    order = list(range(len(features)))
    random.Random(seed).shuffle(order)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if grouped:  # (as the length-grouped sampler: similar lengths together)
        by_length = sorted(order, key=lambda i: len(features[i]["input_ids"]))
        batches = [by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size)]
    real = total = 0
    for batch in batches:
        collated = task.collate([dict(features[i]) for i in batch], tokenizer, True)
        real += sum(len(features[i]["input_ids"]) for i in batch)
        total += collated["input_ids"].numel()
    return 1 - real / total


def packing(args) -> dict:
    import torch

    from finetune.lora import LoraSettings
    from finetune.module import FineTuneModule
    from tasks.instruction_tuning import InstructionTuning

    train = rows_of(SHARED / "alpaca" / "train.jsonl")
    task = InstructionTuning(format="prompt", max_length=args.max_length)
    module = FineTuneModule(BACKBONE, task, lora=LoraSettings(target_modules="all-linear"))
    module.configure_model()
    task, tokenizer, model = module.task, module.tokenizer, module.model
    features = task.preprocess({k: [r[k] for r in train] for k in train[0]}, tokenizer, True)
    features = [{k: v[i] for k, v in features.items()} for i in range(len(train))]
    packed = task.with_options(packing=True)
    result = {f"padding_{'packed' if p.packing else 'unpacked'}_{'grouped' if g else 'random'}":
              padding_share(p, tokenizer, features, args.batch_size, g) for p in (task, packed) for g in (False, True)}

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(1)
    batches = [rng.sample(features, args.batch_size) for _ in range(args.throughput_steps + 1)]
    model.train()
    for which in (task, packed):
        seconds = tokens = 0.0
        for step, batch in enumerate(batches):
            collated = which.collate([dict(f) for f in batch], tokenizer, True)
            start = time.perf_counter()
            loss = which.loss(which.forward(model, collated), collated)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step:  # (the first step warms up)
                seconds += time.perf_counter() - start
                tokens += sum(len(f["input_ids"]) for f in batch)
        result[f"tokens_per_second_{'packed' if which.packing else 'unpacked'}"] = tokens / seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alpaca_train", type=int, default=48)
    parser.add_argument("--alpaca_val", type=int, default=24)
    parser.add_argument("--c4_train", type=int, default=8)
    parser.add_argument("--c4_val", type=int, default=4)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--throughput_steps", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="instruction-bench-"))
    started = time.perf_counter()

    alpaca_val = rows_of(SHARED / "alpaca" / "validation.jsonl")
    prompts = [{"instruction": r["instruction"], "input": r["input"]} for r in alpaca_val[:3]]
    (work / "alpaca").mkdir()
    alpaca = fit_and_compare(
        work / "alpaca", ["--model.task=InstructionTuning", "--model.task.format=prompt", "--model.task.packing=true",
                          f"--model.task.max_length={args.max_length}"],
        rows_of(SHARED / "alpaca" / "train.jsonl")[:args.alpaca_train], alpaca_val[:args.alpaca_val], args, prompts)
    (work / "c4").mkdir()
    c4 = fit_and_compare(
        work / "c4", ["--model.task=InstructionTuning", "--model.task.format=text", "--model.task.packing=true",
                      f"--model.task.max_length={args.max_length}"],
        rows_of(SHARED / "c4" / "train.jsonl")[:args.c4_train],
        rows_of(SHARED / "c4" / "validation.jsonl")[:args.c4_val], args)
    packed = packing(args)

    print(f"\nSmolLM2-135M-Instruct, LoRA r=8 all-linear, lr {args.lr}, batch {args.batch_size}, max_length "
          f"{args.max_length}, one epoch, packing on; {torch.get_num_threads()} threads")
    print(f"alpaca ({args.alpaca_train} train / {args.alpaca_val} validation rows): val perplexity "
          f"{alpaca['perplexity_before']:.3f} -> {alpaca['perplexity_after']:.3f} (token accuracy after "
          f"{alpaca['token_accuracy_after']:.3f}; fit {alpaca['fit_seconds']:.0f} s)")
    for prompt, before, after in zip(prompts, alpaca["predictions_before"], alpaca["predictions_after"]):
        print(f"  prompt: {prompt['instruction']!r} {prompt['input']!r}\n    before: {before!r}\n    after:  {after!r}")
    print(f"c4 raw text ({args.c4_train} train / {args.c4_val} validation documents, windows of {args.max_length}): "
          f"val perplexity {c4['perplexity_before']:.3f} -> {c4['perplexity_after']:.3f} "
          f"(fit {c4['fit_seconds']:.0f} s)")
    print(f"padding share, alpaca train (800 rows, batch {args.batch_size}): "
          + ", ".join(f"{k.removeprefix('padding_').replace('_', ' ')} {v:.1%}" for k, v in packed.items()
                      if k.startswith("padding")))
    print(f"training tokens/s (real tokens, {args.throughput_steps} timed steps of the same random batches): unpacked "
          f"{packed['tokens_per_second_unpacked']:.0f}, packed {packed['tokens_per_second_packed']:.0f}")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
