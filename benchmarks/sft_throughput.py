"""Instruction tuning (LoRA SFT) throughput head to head: `finetune`'s `InstructionTuning` vs a hand-written
PyTorch + PEFT loop vs Hugging Face `Trainer` + PEFT vs TRL's `SFTTrainer`, on SmolLM2-135M-Instruct, the same
Alpaca rows, tokens, batches, LoRA, optimizer, schedule and number of optimizer steps, in three precisions (a
system is named `system@precision`):
- fp32: every weight fp32.
- bf16: the frozen weights loaded in bf16, the LoRA weights fp32, the forward under bf16 autocast (finetune:
  `model.backbone_dtype: bfloat16`; the loop: the same by hand; Trainer and SFTTrainer: the model loaded in bf16
  and `bf16=True`, their autocast).
- 4bit: the frozen linear weights 4-bit NF4 with double quantization (bitsandbytes), the rest bf16 computing in
  bf16, PEFT's `prepare_model_for_kbit_training` (finetune: `model.quantization: 4bit`).

Every system runs in a fresh process per repeat, alternately, after one discarded warm-up round; the
table gives the median and (min–max) of the repeats (the harness, meter and systems of this package, as
train_throughput).

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
a fraction of this machine's dense fp32 and bf16 matmul peaks measured in the same run; and each run's per-step
losses (finetune bf16 vs fp32: the largest relative difference of the curves).

    python -m benchmarks.sft_throughput --repeats 2
    python -m benchmarks.sft_throughput --systems finetune@fp32,finetune@bf16 --steps 19 --repeats 1  # loss curves
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.data import DATA, columns, read_jsonl, subset
from benchmarks.harness import add_run_arguments, child_commands, emit, set_threads
from benchmarks.meter import IGNORE, StepMeter, matmul_peak, matmul_weights, peak_rss_mb, trainable_params
from benchmarks.models import SMOLLM2, model_dir, task_for, with_lora
from benchmarks.results import cell, compare, interference_note, markdown_table, publish, ratio, versions
from benchmarks.systems import finetune_cli, hand_loop

LORA = {"r": 16, "alpha": 32, "dropout": 0.05}  # target_modules: all-linear
PROGRAMS = {
    "finetune": "finetune",
    "finetune_packed": "finetune, packing",
    "loop": "hand loop (PyTorch + PEFT)",
    "hf_trainer": "HF Trainer + PEFT",
    "trl": "TRL SFTTrainer",
    "trl_packed": "TRL SFTTrainer, packing (bfd)",
    "trl_padding_free": "TRL SFTTrainer, padding_free",
}
PRECISIONS = ("fp32", "bf16", "4bit")
SYSTEMS = {f"{program}@{precision}": f"{label} · {precision}" for precision in PRECISIONS
           for program, label in PROGRAMS.items()}
DEFAULT_SYSTEMS = ["matmul", *(f"{p}@{precision}" for precision in PRECISIONS for p in ("finetune", "loop")),
                   "finetune_packed@bf16", "hf_trainer@bf16", "trl@bf16", "trl_packed@bf16"]


# --- the systems (each in its own process) ---------------------------------------------------------
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


def prepared(args: argparse.Namespace) -> tuple[Any, list[dict], list[list[int]]]:
    """The tokenizer, the tokenized rows and finetune's training batches of epoch 0 (its length-grouped sampler,
    as `finetune fit` builds it: lists of row indices)."""
    from transformers import AutoTokenizer

    from finetune.sampling import LengthGroupedBatchSampler

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    examples = encode_rows(tokenizer, read_jsonl(args.train_file), args.max_length)
    lengths = [len(e["input_ids"]) for e in examples]
    return tokenizer, examples, list(LengthGroupedBatchSampler(lengths, args.batch_size, args.seed, shuffle=True,
                                                               group=True))


def peft_model(args: argparse.Namespace, precision: str) -> Any:
    """SmolLM2 with LoRA: fp32; the frozen weights in bf16 (LoRA fp32); or 4-bit NF4 (QLoRA, PEFT's preparation)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if precision == "4bit":
        from peft import prepare_model_for_kbit_training

        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16,
                                                     quantization_config=quantization, device_map="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16 if precision == "bf16"
                                                     else torch.float32)
    model = with_lora(model, "CAUSAL_LM", **LORA, target_modules="all-linear")
    for parameter in model.parameters():  # (PEFT keeps adapters fp32 on bf16 weights already: made sure)
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return model


def figures(meter: StepMeter, model: Any) -> dict[str, Any]:
    """The meter's figures, the model FLOP/s counting the decoder's linear weights per computed token and the
    output layer's per target token."""
    decoder, head = matmul_weights(model)
    return {**meter.result(decoder, head), "head_params": head, "trainable_params": trainable_params(model)}


FINETUNE_PRECISION = {"fp32": ["--model.backbone_dtype=float32"], "bf16": ["--model.backbone_dtype=bfloat16"],
                      "4bit": ["--model.backbone_dtype=bfloat16", "--model.quantization=4bit"]}


def run_finetune(args: argparse.Namespace, work: Path, meter: StepMeter, packing: bool,
                 precision: str) -> dict[str, Any]:
    cli = finetune_cli.run([
        "fit", f"--seed_everything={args.seed}", f"--model.backbone={SMOLLM2}", "--model.task=InstructionTuning",
        "--model.task.init_args.format=prompt", f"--model.task.init_args.max_length={args.max_length}",
        f"--model.task.init_args.packing={str(packing).lower()}", f"--model.lora.r={LORA['r']}",
        f"--model.lora.alpha={LORA['alpha']}", f"--model.lora.dropout={LORA['dropout']}",
        "--model.lora.target_modules=all-linear", *FINETUNE_PRECISION[precision], "--model.optimizer=torch.optim.AdamW",
        f"--model.optimizer.lr={args.lr}", "--model.optimizer.weight_decay=0.0",
        f"--data.train_file={args.train_file}", f"--data.batch_size={args.batch_size}", "--data.group_by_length=true",
        "--data.num_workers=0", f"--data.seed={args.seed}", f"--trainer.max_steps={args.warmup + args.steps}",
        "--trainer.precision=32", "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.log_every_n_steps=10",
        "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={work}", f"--trainer.default_root_dir={work}",
    ], step=meter, losses=True)
    return figures(meter, cli.model.model)


def run_loop(args: argparse.Namespace, work: Path, meter: StepMeter, precision: str) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorForSeq2Seq

    torch.manual_seed(args.seed)
    tokenizer, examples, batches = prepared(args)
    loader = DataLoader(examples, batch_sampler=batches, collate_fn=DataCollatorForSeq2Seq(tokenizer))
    model = peft_model(args, precision)
    hand_loop.train(model, loader, args.warmup + args.steps, args.lr, 0.0, meter,
                    autocast=torch.bfloat16 if precision != "fp32" else None)
    model.save_pretrained(work / "adapter")  # (as the others, a checkpoint at the end)
    return figures(meter, model)


def trainer_inputs(args: argparse.Namespace, work: Path, precision: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(tokenizer, the rows in finetune's batch order, so that a sequential sampler yields finetune's batches, the
    model, the Trainer settings)."""
    import datasets

    from benchmarks.systems import hf_trainer  # (here: the other systems' processes do not import Trainer)

    tokenizer, examples, batches = prepared(args)
    data = datasets.Dataset.from_list([examples[i] for batch in batches for i in batch])
    total = args.warmup + args.steps
    settings = hf_trainer.settings(work, args.batch_size, total, args.lr, 0.0, args.seed, warmup_steps=0,
                                   logging_steps=1, save_strategy="steps", save_steps=total,
                                   train_sampling_strategy="sequential", bf16=precision != "fp32")
    return tokenizer, data, peft_model(args, precision), settings


def run_hf_trainer(args: argparse.Namespace, work: Path, meter: StepMeter, precision: str) -> dict[str, Any]:
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    from benchmarks.systems import hf_trainer

    tokenizer, data, model, settings = trainer_inputs(args, work, precision)
    training_args = TrainingArguments(**settings)
    hf_trainer.train(model, data, DataCollatorForSeq2Seq(tokenizer), training_args, meter, processing_class=tokenizer)
    return {**figures(meter, model), "optimizer": str(training_args.optim)}


def run_trl(args: argparse.Namespace, work: Path, meter: StepMeter, variant: str, precision: str) -> dict[str, Any]:
    from benchmarks.systems import trl

    tokenizer, data, model, settings = trainer_inputs(args, work, precision)
    meter.pad_id = tokenizer.pad_token_id  # (packed rows: their padding is found by it)
    if variant == "packed":  # packed rows of ~max_length: about as many tokens per step as the others' batches
        mean_length = statistics.mean(len(ids) for ids in data["input_ids"])
        settings["per_device_train_batch_size"] = max(1, round(args.batch_size * mean_length / args.max_length))
    config = trl.sft(model, data.remove_columns("attention_mask"), tokenizer, settings, args.max_length, variant,
                     meter)
    return {**figures(meter, model), "optimizer": str(config.optim),
            "batch_rows": settings["per_device_train_batch_size"]}


def child(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    if args.child == "matmul":
        emit({**matmul_peak(args.threads), **{f"bf16_{k}": v for k, v in
                                              matmul_peak(args.threads, dtype="bfloat16").items()}})
        return
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.child}-"))
    meter = StepMeter(args.warmup, args.steps)
    program, precision = args.child.split("@")
    try:
        if program.startswith("finetune"):
            emit(run_finetune(args, work, meter, packing=program == "finetune_packed", precision=precision))
        elif program == "loop":
            emit(run_loop(args, work, meter, precision))
        elif program == "hf_trainer":
            emit(run_hf_trainer(args, work, meter, precision))
        elif program == "trl_padding_free":
            try:  # (an expected outcome to report, not a benchmark failure)
                emit(run_trl(args, work, meter, "padding_free", precision))
            except Exception as err:  # noqa: BLE001
                emit({"error": f"{type(err).__name__}: {err}"[:500], "peak_rss_mb": peak_rss_mb()})
        else:
            emit(run_trl(args, work, meter, program.removeprefix("trl").lstrip("_") or "plain", precision))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the driver --------------------------------------------------------------------------------------
def check_same_examples(args: argparse.Namespace) -> dict[str, Any]:
    """The examples tokenized here against finetune's own preprocessing of the same rows: identical tokens
    and labels, or the benchmark stops. Returns their token statistics."""
    from tasks.instruction_tuning import InstructionTuning

    _, examples, _ = prepared(args)
    task, tokenizer = task_for(InstructionTuning(format="prompt", max_length=args.max_length), args.model_dir)
    theirs = task.preprocess(columns(read_jsonl(args.train_file)), tokenizer, with_targets=True)
    mine = {k: [e[k] for e in examples] for k in ("input_ids", "labels")}
    assert mine == {k: theirs[k] for k in mine}, "the benchmark's tokenization differs from finetune's"
    lengths = [len(ids) for ids in mine["input_ids"]]
    targets = [sum(label != IGNORE for label in labels[1:]) for labels in mine["labels"]]
    return {"examples": len(lengths), "mean_tokens": statistics.mean(lengths), "max_tokens": max(lengths),
            "mean_target_tokens": statistics.mean(targets), "truncated": sum(n >= args.max_length for n in lengths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA / "alpaca"), help="folder with train.jsonl")
    parser.add_argument("--rows", type=int, default=64, help="first rows of train.jsonl (a multiple of batch_size)")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=1, help="optimizer steps before the timed ones")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-4)
    add_run_arguments(parser, "sft_throughput", repeats=2, warmup_rounds=1)
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                        help=f"matmul and any of {', '.join(SYSTEMS)}")
    parser.add_argument("--child", choices=["matmul", *SYSTEMS], help=argparse.SUPPRESS)
    parser.add_argument("--train_file", help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    args.train_file = subset(Path(args.data) / "train.jsonl", work / "train.jsonl", args.rows)
    args.model_dir = model_dir(SMOLLM2)  # what finetune trains: the other systems load the same weights
    data = check_same_examples(args)
    options = [f"--train_file={args.train_file}", f"--model_dir={args.model_dir}", f"--steps={args.steps}",
               f"--warmup={args.warmup}", f"--batch_size={args.batch_size}", f"--max_length={args.max_length}",
               f"--lr={args.lr}", f"--seed={args.seed}", f"--threads={args.threads}"]
    names = args.systems.split(",")
    systems = child_commands(__spec__.name, names, options)
    runs, summary, info = compare(systems, args, work)
    data["loss_curves"] = {name: runs[name][0].get("losses") for name in names if runs.get(name)}
    errors = {name: runs[name][-1]["error"] for name in names if "error" in runs[name][-1]}
    publish(args.output, {
        "machine": info,
        "versions": versions("torch", "lightning", "transformers", "peft", "trl", "accelerate", "datasets"),
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("child", "output")},
                     "backbone": SMOLLM2, "lora": {**LORA, "target_modules": "all-linear"}},
        "data": data, "wall_s": time.time() - started, "errors": errors, "summary": summary, "runs": runs,
    }, report(summary, errors, data, args) + "\n" + interference_note(summary, runs))


def report(summary: dict[str, Any], errors: dict[str, str], data: dict[str, Any], args: argparse.Namespace) -> str:
    peaks = {kind: summary["matmul"][key]["median"] if "matmul" in summary else None
             for kind, key in (("fp32", "matmul_gflops_per_s"), ("bf16", "bf16_matmul_gflops_per_s"))}
    rows = []
    for name, label in SYSTEMS.items():
        if name in errors:
            rows.append([label, f"failed: {errors[name]}", *["–"] * 9])
        elif name in summary:
            s = summary[name]
            of_peak = [f"{100 * s['gflops_per_s']['median'] / peak:.0f}%" if peak else "–" for peak in peaks.values()]
            rows.append([label, cell(s["real_tokens_per_s"], ".0f"), f"{100 * s['padding_fraction']['median']:.1f}%",
                         f"{s['computed_tokens_per_step']['median']:.0f}", cell(s["peak_rss_mb"], ".0f"),
                         cell(s["startup_to_first_step_s"], ".1f"), cell(s["gflops_per_s"], ".1f"), *of_peak,
                         cell(s["last_loss"], ".3f"), cell(s["mean_loss"], ".3f")])
    header = ["system", "real tokens/s", "padding", "tokens/step", "peak RSS (MB)", "start → 1st step (s)",
              "model GFLOP/s", "of fp32 peak", "of bf16 peak", "last-step loss", "mean loss"]
    lines = [markdown_table(header, rows), ""]
    lines.append(f"{data['examples']} Alpaca rows ({data['mean_tokens']:.0f} tokens on average, "
                 f"{data['mean_target_tokens']:.0f} of them targets; {data['truncated']} truncated at "
                 f"{args.max_length}), batch {args.batch_size}, {args.steps} timed steps after {args.warmup}.")
    if peaks["fp32"]:
        lines.append(f"Dense matmul peaks (2048², {args.threads} threads, median of rounds): fp32 {peaks['fp32']:.1f}, "
                     f"bf16 {peaks['bf16']:.1f} GFLOP/s.")
    curves = data["loss_curves"]
    if curves.get("finetune@fp32") and curves.get("finetune@bf16"):
        gaps = [abs(b - a) / abs(a) for a, b in zip(curves["finetune@fp32"], curves["finetune@bf16"])]
        lines.append(f"finetune loss curves, bf16 vs fp32 over {len(gaps)} steps: largest relative difference "
                     f"{max(gaps):.4f} (step {gaps.index(max(gaps))}), mean {statistics.mean(gaps):.4f}.")
    targets = []
    for precision in PRECISIONS:
        mine, loop = f"finetune@{precision}", f"loop@{precision}"
        if {mine, loop} <= summary.keys():
            targets.append((f"{SYSTEMS[mine]} tokens/s ≥ 0.97 × {SYSTEMS[loop]}",
                            ratio(summary, mine, loop, "real_tokens_per_s"), 0.97, True))
    if {"finetune@bf16", "finetune@fp32"} <= summary.keys():
        targets.append(("finetune bf16 tokens/s ≥ 1.8 × fp32",
                        ratio(summary, "finetune@bf16", "finetune@fp32", "real_tokens_per_s"), 1.8, True))
        targets.append(("finetune bf16 peak RSS ≤ 0.65 × fp32",
                        ratio(summary, "finetune@bf16", "finetune@fp32", "peak_rss_mb"), 0.65, False))
    for precision in PRECISIONS:
        for other, packed in (("hf_trainer", False), ("trl", False), ("trl_packed", True)):
            mine, theirs = f"finetune{'_packed' if packed else ''}@{precision}", f"{other}@{precision}"
            if {mine, theirs} <= summary.keys() and theirs not in errors:
                targets.append((f"{SYSTEMS[mine]} tokens/s ≥ 1.0 × {SYSTEMS[theirs]}",
                                ratio(summary, mine, theirs, "real_tokens_per_s"), 1.0, True))
    if "finetune_packed@bf16" in summary:
        targets.append(("finetune packing: padding ≤ 2%",
                        summary["finetune_packed@bf16"]["padding_fraction"]["median"], 0.02, False))
    for text, value, bound, at_least in targets:
        met = value >= bound if at_least else value <= bound
        lines.append(f"- {text}: {value:.3f} — {'met' if met else 'MISSED'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
