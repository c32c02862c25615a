"""Instruction tuning (LoRA SFT) throughput head to head: `finetune`'s `InstructionTuning` vs a hand-written
PyTorch + PEFT loop vs Hugging Face `Trainer` + PEFT vs TRL's `SFTTrainer`, on SmolLM2-135M-Instruct in fp32,
the same Alpaca rows, tokens, batches, LoRA, optimizer, schedule and number of optimizer steps.

Every system runs in a fresh process per repeat, alternately, after one discarded warm-up round; the
table gives the median and (min–max) of the repeats (methodology and helpers: common.py, as
train_throughput.py).

The data: the first `--rows` rows of the Alpaca train split, each the user turn "{instruction}\\n\\n{input}"
(trailing whitespace stripped) in the tokenizer's chat template (with its default system turn) and the
reply plus <|im_end|>, the only tokens in the loss; truncated to `--max_length`. The driver checks that
the examples tokenized here are finetune's, token for token. The batches: finetune's (its length-grouped
sampler, `--seed`); the other systems get the rows in that order with a sequential sampler, so every
system but the packing ones (finetune's and TRL's) trains on the very same batches (same examples, same tokens
per step).

- finetune: `finetune.cli.run(["fit", ...])`, the code path of the `finetune` command (CSV logger,
  progress bar, a checkpoint at the end), with `model.task.packing` false and true (packing: whole examples
  packed best-fit into rows of max_length tokens, a batch of `--batch_size` such rows, as TRL counts them;
  attention kept within each example).
- loop: the floor, no framework: the batches padded to their longest example, `model(**batch).loss`
  (transformers' causal-LM loss over the full logits), backward, `AdamW.step`, the same linear schedule.
- HF Trainer: `Trainer` + PEFT, `DataCollatorForSeq2Seq` padding, the same pre-tokenized rows.
- TRL: `SFTTrainer` on the same pre-tokenized rows (`input_ids` and `labels`, which it keeps as they are),
  fp32 and without gradient checkpointing (SFTConfig's defaults are bf16 and checkpointing on); without
  packing, with packing (TRL's default "bfd" strategy packs the whole data set into rows of max_length and
  trains them padding-free; its batch size is set so that a step has about as many tokens as the others'),
  and padding-free without packing (all examples of a batch flattened into one row).
LoRA everywhere: r 16, alpha 32, dropout 0.05, target_modules all-linear (configs/instruction_tuning.yaml);
AdamW, lr 2e-4, weight decay 0, linear decay from the first step (finetune's LinearWarmupDecay: 10% of 7
steps is no warm-up step).

Figures per system, over the optimizer steps after `--warmup`: real (non-padding) tokens/s, the padding
share of the computed tokens, peak resident memory (ru_maxrss), the time from the command's start to the
end of its first optimizer step, the loss of the last step and the mean loss of all steps, and the model
FLOP/s: 4 N per computed token (forward 2N + backward through the frozen weights 2N; N = the decoder's
linear weights, LoRA and attention scores not counted) plus 4 N_head per target token (the output layer is
needed at target positions only; a system that computes it everywhere does more work than is counted), as
a fraction of this machine's dense fp32 matmul peak measured in the same run.

    python benchmarks/sft_throughput.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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
    emit,
    interference_note,
    machine,
    markdown_table,
    matmul_peak,
    peak_rss_mb,
    set_threads,
    subset,
    summarize,
    versions,
    write_results,
)

BACKBONE = "HuggingFaceTB/SmolLM2-135M-Instruct"  # offline: finetune's packaged copy (finetune/gguf.py)
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}  # target_modules: all-linear
IGNORE = -100
SYSTEMS = {
    "finetune": "finetune",
    "finetune_packed": "finetune, packing",
    "loop": "hand loop (PyTorch + PEFT)",
    "hf_trainer": "HF Trainer + PEFT",
    "trl": "TRL SFTTrainer",
    "trl_packed": "TRL SFTTrainer, packing (bfd)",
    "trl_padding_free": "TRL SFTTrainer, padding_free",
}


class TokenClock(StepClock):
    """StepClock for batches with or without an attention mask (packed rows carry position ids instead),
    which also counts each batch's target tokens and records each step's loss."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[int] = []
        self.losses: list[float] = []
        self.pad_id = 0

    def attach(self, model: Any) -> None:  # loop, HF Trainer, TRL: their batches reach the model as keywords
        model.register_forward_pre_hook(lambda module, args, kwargs: self.record(kwargs) if module.training else None,
                                        with_kwargs=True)

    def record(self, batch: dict[str, Any]) -> None:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        computed = ids.numel()
        real = int(mask.sum()) if mask is not None else computed - self.row_end_padding(ids, batch["position_ids"])
        self.batches.append((ids.shape[0], real, computed))
        self.targets.append(int((batch["labels"][:, 1:] != IGNORE).sum()))

    def row_end_padding(self, ids: Any, positions: Any) -> int:
        """Padding of packed rows: the pad tokens that end a row, less the first of them if it continues an
        example (its end-of-turn token, which is also the pad token); padding restarts the position ids."""
        padding = 0
        for row, row_positions in zip(ids.tolist(), positions.tolist()):
            start = len(row)
            while start > 0 and row[start - 1] == self.pad_id:
                start -= 1
            if start < len(row) and row_positions[start] != 0:
                start += 1
            padding += len(row) - start
        return padding

    def result(self, warmup: int, matmul_params: int, head_params: int) -> dict[str, Any]:
        result = super().result(warmup, matmul_params)
        head_flops = 4 * head_params * sum(self.targets[warmup:len(self.times)])
        result["gflops_per_s"] += head_flops / result["seconds"] / 1e9
        return {**result, "target_tokens_per_step": statistics.mean(self.targets[:len(self.times)]),
                "computed_tokens_per_step": statistics.mean(b[2] for b in self.batches[:len(self.times)]),
                "last_loss": self.losses[-1], "mean_loss": statistics.mean(self.losses)}


CLOCK = TokenClock()


# --- the systems (each in its own process) ---------------------------------------------------------
def matmul_weights(model: Any) -> tuple[int, int]:
    """(the decoder's linear weights, the output layer's): what every token, and every target token, meets."""
    from torch import nn

    head = model.get_output_embeddings().weight.numel()
    decoder = sum(m.weight.numel() for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and "lora_" not in name and not name.endswith("lm_head"))
    return decoder, head


def encode_rows(tokenizer: Any, rows: list[dict[str, str]], max_length: int) -> list[dict[str, list[int]]]:
    """The chat-template prompt (not in the loss) and the reply with <|im_end|> (in the loss), truncated."""
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    examples = []
    for row in rows:
        user = [{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}".rstrip()}]
        prompt = tokenizer(tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True),
                           add_special_tokens=False)["input_ids"]
        reply = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [stop]
        ids, labels = (prompt + reply)[:max_length], ([IGNORE] * len(prompt) + reply)[:max_length]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return examples


def finetune_order(examples: list[dict], batch_size: int, seed: int) -> list[list[int]]:
    """finetune's training batches of epoch 0 (its length-grouped sampler, as `finetune fit` builds it)."""
    from finetune.sampling import LengthGroupedBatchSampler

    lengths = [len(e["input_ids"]) for e in examples]
    return list(LengthGroupedBatchSampler(lengths, batch_size, seed, shuffle=True, group=True))


def prepared(args: argparse.Namespace) -> tuple[Any, list[dict], list[list[int]]]:
    """The tokenizer, the tokenized rows and finetune's batches (lists of row indices)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    CLOCK.pad_id = tokenizer.pad_token_id
    rows = [json.loads(line) for line in Path(args.train_file).read_text(encoding="utf-8").splitlines()]
    examples = encode_rows(tokenizer, rows, args.max_length)
    return tokenizer, examples, finetune_order(examples, args.batch_size, args.seed)


def peft_model(args: argparse.Namespace) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype="float32")
    config = LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                        target_modules="all-linear")
    return get_peft_model(model, config)


def facts(model: Any) -> dict[str, Any]:
    decoder, head = matmul_weights(model)
    return {"matmul_params": decoder, "head_params": head,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_finetune(args: argparse.Namespace, work: Path, packing: bool) -> dict[str, Any]:
    from lightning.pytorch import Callback

    from finetune.cli import run

    class FinetuneClock(Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            CLOCK.pad_id = pl_module.tokenizer.pad_token_id

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: dict, batch_idx: int) -> None:
            CLOCK.record(batch)  # (its forward calls the decoder and the output layer apart: no model hook)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: dict, batch_idx: int) -> None:
            CLOCK.step()
            # (the step's loss is the batch's sum: finetune divides the gradients by the step's target tokens)
            CLOCK.losses.append(float(outputs["loss"]) / pl_module.task.loss_weight(batch))

    setattr(sys.modules[__name__], "FinetuneClock", FinetuneClock)  # named by its class_path below
    cli = run([
        "fit", f"--seed_everything={args.seed}", f"--model.backbone={BACKBONE}", "--model.task=InstructionTuning",
        "--model.task.init_args.format=prompt", f"--model.task.init_args.max_length={args.max_length}",
        f"--model.task.init_args.packing={str(packing).lower()}", f"--model.lora.r={LORA['r']}",
        f"--model.lora.alpha={LORA['alpha']}", f"--model.lora.dropout={LORA['dropout']}",
        "--model.lora.target_modules=all-linear", "--model.optimizer=torch.optim.AdamW",
        f"--model.optimizer.lr={args.lr}", "--model.optimizer.weight_decay=0.0",
        f"--data.train_file={args.train_file}", f"--data.batch_size={args.batch_size}", "--data.group_by_length=true",
        "--data.num_workers=0", f"--data.seed={args.seed}", f"--trainer.max_steps={args.warmup + args.steps}",
        "--trainer.precision=32", "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.log_every_n_steps=10",
        "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={work}", f"--trainer.default_root_dir={work}",
        f"--trainer.callbacks+={__name__}.FinetuneClock",
    ])
    return facts(cli.model.model)


def run_loop(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq

    torch.manual_seed(args.seed)
    tokenizer, examples, batches = prepared(args)
    loader = DataLoader(examples, batch_sampler=batches, collate_fn=DataCollatorForSeq2Seq(tokenizer))
    model = peft_model(args)
    model.train()
    CLOCK.attach(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    total = args.warmup + args.steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (total - step) / total)
    for step, batch in enumerate(loader, start=1):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        CLOCK.step()
        CLOCK.losses.append(loss.item())
        if step == total:
            break
    model.save_pretrained(work / "adapter")  # (as the others, a checkpoint at the end)
    return facts(model)


def trainer_callback() -> Any:
    from transformers import TrainerCallback

    class HFClock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            CLOCK.attach(model)

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            CLOCK.step()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:  # (logging_steps=1: each step's loss)
                CLOCK.losses.append(logs["loss"])

    return HFClock()


def ordered_dataset(examples: list[dict], batches: list[list[int]]) -> Any:
    """The rows in finetune's batch order: a sequential sampler then yields finetune's batches."""
    import datasets

    return datasets.Dataset.from_list([examples[i] for batch in batches for i in batch])


def trainer_settings(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    total = args.warmup + args.steps
    return dict(output_dir=str(work), per_device_train_batch_size=args.batch_size, max_steps=total,
                learning_rate=args.lr, weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0, logging_steps=1,
                save_strategy="steps", save_steps=total, report_to="none", train_sampling_strategy="sequential",
                dataloader_num_workers=0, seed=args.seed, use_cpu=True)


def run_hf_trainer(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer, examples, batches = prepared(args)
    model = peft_model(args)
    training_args = TrainingArguments(**trainer_settings(args, work))
    trainer = Trainer(model=model, args=training_args, train_dataset=ordered_dataset(examples, batches),
                      processing_class=tokenizer, data_collator=DataCollatorForSeq2Seq(tokenizer),
                      callbacks=[trainer_callback()])
    trainer.train()
    return {**facts(model), "optimizer": str(training_args.optim)}


def run_trl(args: argparse.Namespace, work: Path, variant: str) -> dict[str, Any]:
    from trl import SFTConfig, SFTTrainer

    tokenizer, examples, batches = prepared(args)
    model = peft_model(args)
    data = ordered_dataset(examples, batches).remove_columns("attention_mask")
    settings = trainer_settings(args, work)
    if variant == "packed":  # packed rows of ~max_length: about as many tokens per step as the others' batches
        mean_length = statistics.mean(len(e["input_ids"]) for e in examples)
        settings["per_device_train_batch_size"] = max(1, round(args.batch_size * mean_length / args.max_length))
    config = SFTConfig(**settings, bf16=False, gradient_checkpointing=False, packing=variant == "packed",
                       padding_free=variant == "padding_free",
                       # (padding-free without packing refuses a max_length: the rows are truncated already)
                       max_length=None if variant == "padding_free" else args.max_length)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         callbacks=[trainer_callback()])
    trainer.train()
    return {**facts(model), "optimizer": str(config.optim), "batch_rows": settings["per_device_train_batch_size"]}


def child(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    if args.child == "matmul":
        emit(matmul_peak(args.threads))
        return
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.child}-"))
    try:
        if args.child.startswith("finetune"):
            extra = run_finetune(args, work, packing=args.child == "finetune_packed")
        elif args.child == "loop":
            extra = run_loop(args, work)
        elif args.child == "hf_trainer":
            extra = run_hf_trainer(args, work)
        elif args.child == "trl_padding_free":
            try:  # (an expected outcome to report, not a benchmark failure)
                extra = run_trl(args, work, "padding_free")
            except Exception as err:  # noqa: BLE001
                emit({"error": f"{type(err).__name__}: {err}"[:500], "peak_rss_mb": peak_rss_mb()})
                return
        else:
            extra = run_trl(args, work, args.child.removeprefix("trl").lstrip("_") or "plain")
        emit({**CLOCK.result(args.warmup, extra.pop("matmul_params"), extra.pop("head_params")), **extra,
              "peak_rss_mb": peak_rss_mb()})
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the driver --------------------------------------------------------------------------------------
def check_same_examples(args: argparse.Namespace) -> dict[str, Any]:
    """The examples tokenized here against finetune's own preprocessing of the same rows: identical tokens
    and labels, or the benchmark stops. Returns their token statistics."""
    from transformers import AutoConfig

    from tasks.instruction_tuning import InstructionTuning

    tokenizer, examples, _ = prepared(args)
    rows = [json.loads(line) for line in Path(args.train_file).read_text(encoding="utf-8").splitlines()]
    task = InstructionTuning(format="prompt", max_length=args.max_length)
    task = task.with_options(**task.backbone_options(AutoConfig.from_pretrained(args.model_dir), tokenizer))
    theirs = task.preprocess({k: [r[k] for r in rows] for k in rows[0]}, tokenizer, with_targets=True)
    mine = {k: [e[k] for e in examples] for k in ("input_ids", "labels")}
    assert mine == {k: theirs[k] for k in mine}, "the benchmark's tokenization differs from finetune's"
    lengths = [len(ids) for ids in mine["input_ids"]]
    targets = [sum(label != IGNORE for label in labels[1:]) for labels in mine["labels"]]
    return {"examples": len(lengths), "mean_tokens": statistics.mean(lengths), "max_tokens": max(lengths),
            "mean_target_tokens": statistics.mean(targets), "truncated": sum(n >= args.max_length for n in lengths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "alpaca"), help="folder with train.jsonl")
    parser.add_argument("--rows", type=int, default=64, help="first rows of train.jsonl (a multiple of batch_size)")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps before the timed ones")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    add_run_arguments(parser, "sft_throughput", repeats=2, warmup_rounds=1)
    parser.add_argument("--systems", default=",".join(["matmul", *SYSTEMS]))
    parser.add_argument("--child", choices=["matmul", *SYSTEMS], help=argparse.SUPPRESS)
    parser.add_argument("--train_file", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    os.environ["HF_HUB_OFFLINE"] = "1"
    from finetune.gguf import packaged_smollm2

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    args.train_file = subset(Path(args.data) / "train.jsonl", work / "train.jsonl", args.rows)
    # The directory finetune converts its packaged SmolLM2 into (once, before any timing; $FINETUNE_CACHE):
    # the other systems load it, so every system trains the same weights.
    args.model_dir = packaged_smollm2()
    data = check_same_examples(args)
    script = str(Path(__file__).resolve())
    common = [f"--train_file={args.train_file}", f"--model_dir={args.model_dir}", f"--steps={args.steps}",
              f"--warmup={args.warmup}", f"--batch_size={args.batch_size}", f"--max_length={args.max_length}",
              f"--lr={args.lr}", f"--seed={args.seed}", f"--threads={args.threads}"]
    names = args.systems.split(",")
    systems = child_commands(script, names, common)
    log = work / "children.log"
    print(f"children's output: {log}", file=sys.stderr)
    info = machine(args.threads)
    runs = alternate(systems, args.repeats, args.warmup_rounds, args.threads, log, args.quiet, args.max_wait)
    summary = summarize(runs)
    info["load_average_at_end"] = os.getloadavg()
    errors = {name: runs[name][-1]["error"] for name in names if "error" in runs[name][-1]}
    payload = {
        "command": "python " + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]]), "machine": info,
        "versions": versions("torch", "lightning", "transformers", "peft", "trl", "accelerate", "datasets"),
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("child", "output")},
                     "backbone": BACKBONE, "lora": {**LORA, "target_modules": "all-linear"}},
        "data": data, "wall_s": time.time() - started, "errors": errors, "summary": summary, "runs": runs,
    }
    payload["table"] = report(summary, errors, data, args) + "\n" + interference_note(summary, runs)
    path = write_results(args.output, payload)
    print(payload["table"])
    print(f"\nwritten: {path}")


def ratio(summary: dict[str, Any], a: str, b: str, key: str) -> float:
    return summary[a][key]["median"] / summary[b][key]["median"]


def report(summary: dict[str, Any], errors: dict[str, str], data: dict[str, Any], args: argparse.Namespace) -> str:
    peak = summary["matmul"]["matmul_gflops_per_s"]["median"] if "matmul" in summary else None
    rows = []
    for name, label in SYSTEMS.items():
        if name in errors:
            rows.append([label, f"failed: {errors[name]}", *["–"] * 8])
        elif name in summary:
            s = summary[name]
            rows.append([label, cell(s["real_tokens_per_s"], ".0f"), f"{100 * s['padding_fraction']['median']:.1f}%",
                         f"{s['computed_tokens_per_step']['median']:.0f}", cell(s["peak_rss_mb"], ".0f"),
                         cell(s["startup_to_first_step_s"], ".1f"), cell(s["gflops_per_s"], ".1f"),
                         f"{100 * s['gflops_per_s']['median'] / peak:.0f}%" if peak else "–",
                         cell(s["last_loss"], ".3f"), cell(s["mean_loss"], ".3f")])
    header = ["system", "real tokens/s", "padding", "tokens/step", "peak RSS (MB)", "start → 1st step (s)",
              "model GFLOP/s", "of matmul peak", "last-step loss", "mean loss"]
    lines = [markdown_table(header, rows), ""]
    lines.append(f"{data['examples']} Alpaca rows ({data['mean_tokens']:.0f} tokens on average, "
                 f"{data['mean_target_tokens']:.0f} of them targets; {data['truncated']} truncated at "
                 f"{args.max_length}), batch {args.batch_size}, {args.steps} timed steps after {args.warmup}.")
    if peak:
        lines.append(f"Dense fp32 matmul peak (2048², {args.threads} threads, median of rounds): {peak:.1f} GFLOP/s.")
    targets = []
    if {"finetune", "loop"} <= summary.keys():
        targets.append(("finetune tokens/s ≥ 0.97 × hand loop", ratio(summary, "finetune", "loop", "real_tokens_per_s"),
                        0.97, True))
    for other, packed in (("hf_trainer", False), ("trl", False), ("trl_packed", True)):
        mine = "finetune_packed" if packed else "finetune"
        if {mine, other} <= summary.keys() and other not in errors:
            targets.append((f"{SYSTEMS[mine]} tokens/s ≥ 1.0 × {SYSTEMS[other]}",
                            ratio(summary, mine, other, "real_tokens_per_s"), 1.0, True))
    if "finetune_packed" in summary:
        targets.append(("finetune packing: padding ≤ 2%", summary["finetune_packed"]["padding_fraction"]["median"],
                        0.02, False))
    for mine in ("finetune", "finetune_packed"):
        if {mine, "hf_trainer"} <= summary.keys():
            targets.append((f"{SYSTEMS[mine]} peak RSS ≤ HF Trainer's",
                            ratio(summary, mine, "hf_trainer", "peak_rss_mb"), 1.0, False))
    for text, value, bound, at_least in targets:
        met = value >= bound if at_least else value <= bound
        lines.append(f"- {text}: {value:.3f} — {'met' if met else 'MISSED'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
