"""Validation generation throughput head to head: `finetune validate` on a translation task vs Hugging
Face `Seq2SeqTrainer(predict_with_generate=True).evaluate`, greedy and beam search 4.

Same model, same LoRA adapter (query/value, r=8, freshly initialised, so both generate with exactly the
same weights), same validation sentences, batch size, source length, max_new_tokens and num_beams; both
compute the validation loss, generate, decode and score BLEU and chrF (sacrebleu). The model is the
pretrained MiniLM warm-started as a BERT2BERT encoder-decoder (`benchmarks.models.minilm_seq2seq`, with its
seeded random cross-attention saved, so both systems load identical weights; offline). Untrained, it
rarely emits [SEP], so most sequences run to max_new_tokens: the table gives generated tokens per
sequence to show both did the same work.

Every (system, decoding) runs in a fresh process per repeat, alternately, after a discarded warm-up round.

    python -m benchmarks.generation_throughput --data ../shared/data/multi30k --sentences 300 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.data import DATA, subset
from benchmarks.harness import add_run_arguments, child_commands, emit, set_threads
from benchmarks.meter import GenerationMeter
from benchmarks.models import minilm_seq2seq, with_lora
from benchmarks.results import cell, compare, interference_note, markdown_table, publish, ratio, versions
from benchmarks.systems import finetune_cli

SYSTEMS = {"finetune": "finetune validate", "hf": "HF Seq2SeqTrainer.evaluate(predict_with_generate)"}
DECODING = {"greedy": 1, "beam4": 4}
LORA = {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["query", "value"]}


# --- the systems (each in its own process) ---------------------------------------------------------
def run_finetune(args: argparse.Namespace, beams: int, work: Path, meter: GenerationMeter) -> float:
    """`finetune validate` of a translation task; its BLEU."""
    cli = finetune_cli.run([
        "validate", f"--seed_everything={args.seed}", f"--model.backbone={args.model}",
        "--model.task=Translation", f"--model.task.max_source_length={args.max_source_length}",
        f"--model.task.max_target_length={args.max_target_length}",
        f"--model.task.generation.max_new_tokens={args.max_new_tokens}",
        f"--model.task.generation.num_beams={beams}", f"--model.lora.r={LORA['r']}",
        f"--model.lora.alpha={LORA['alpha']}", f"--model.lora.dropout={LORA['dropout']}",
        "--model.lora.target_modules=[query,value]", f"--data.val_file={args.val_file}",
        f"--data.eval_batch_size={args.batch_size}", "--data.num_workers=0", "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--trainer.precision=32", "--trainer.logger=false",
        f"--trainer.default_root_dir={work}",
    ], generation=meter)
    return finetune_cli.metrics(cli)["val/bleu"]


def run_hf(args: argparse.Namespace, beams: int, work: Path, meter: GenerationMeter) -> float:
    """`Seq2SeqTrainer.evaluate` with generation, the same loss, decoding and metrics; its BLEU."""
    import datasets
    import numpy as np
    import sacrebleu
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, Seq2SeqTrainingArguments

    from benchmarks.systems import hf_trainer  # (here: the other systems' processes do not import Trainer)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = with_lora(AutoModelForSeq2SeqLM.from_pretrained(args.model), "SEQ_2_SEQ_LM", **LORA)
    raw = datasets.load_dataset("json", data_files=args.val_file, split="train")

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        features = tokenizer(batch["source"], max_length=args.max_source_length, truncation=True)
        features["labels"] = tokenizer(text_target=batch["target"], max_length=args.max_target_length,
                                       truncation=True)["input_ids"]
        return features

    def compute_metrics(prediction: Any) -> dict[str, float]:
        predicted, labels = (np.where(a == -100, tokenizer.pad_token_id, a)
                             for a in (prediction.predictions, prediction.label_ids))
        hypotheses = [t.strip() for t in tokenizer.batch_decode(predicted, skip_special_tokens=True)]
        references = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
                "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}

    data = raw.map(tokenize, batched=True, remove_columns=raw.column_names)
    arguments = Seq2SeqTrainingArguments(
        output_dir=str(work), per_device_eval_batch_size=args.batch_size, predict_with_generate=True,
        report_to="none", use_cpu=True, dataloader_num_workers=0, seed=args.seed,
        train_sampling_strategy="group_by_length",  # (also groups evaluation batches by length)
    )
    found = hf_trainer.evaluate_with_generate(model, tokenizer, data, arguments, compute_metrics, meter,
                                              max_new_tokens=args.max_new_tokens, num_beams=beams)
    return found["eval_bleu"]


def child(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    system, decoding = args.child.split(":")
    work = Path(tempfile.mkdtemp(prefix=f"bench-gen-{system}-"))
    meter = GenerationMeter()
    try:
        bleu = (run_finetune if system == "finetune" else run_hf)(args, DECODING[decoding], work, meter)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit({**meter.result(), "bleu": bleu})


# --- the driver --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA / "multi30k"), help="folder with validation.jsonl")
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_source_length", type=int, default=128)
    parser.add_argument("--max_target_length", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    add_run_arguments(parser, "generation_throughput", repeats=3, warmup_rounds=1)
    parser.add_argument("--decoding", default="greedy,beam4")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--val_file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    started = time.time()
    set_threads(args.threads)
    minilm_seq2seq(work / "model", args.seed)
    val_file = subset(Path(args.data) / "validation.jsonl", work / "validation.jsonl", args.sentences)
    options = [f"--model={work / 'model'}", f"--val_file={val_file}", f"--batch_size={args.batch_size}",
               f"--max_source_length={args.max_source_length}", f"--max_target_length={args.max_target_length}",
               f"--max_new_tokens={args.max_new_tokens}", f"--seed={args.seed}", f"--threads={args.threads}"]
    systems = child_commands(__spec__.name, [f"{system}:{decoding}" for decoding in args.decoding.split(",")
                                             for system in SYSTEMS], options)
    runs, summary, info = compare(systems, args, work)
    publish(args.output, {
        "machine": info, "versions": versions("torch", "lightning", "transformers", "peft", "datasets"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "model", "val_file", "output")},
        "wall_s": time.time() - started, "summary": summary, "runs": runs,
    }, report(summary, args) + "\n" + interference_note(summary, runs))
    shutil.rmtree(work / "model", ignore_errors=True)


def report(summary: dict[str, Any], args: argparse.Namespace) -> str:
    rows = []
    for decoding in args.decoding.split(","):
        for system, label in SYSTEMS.items():
            s = summary[f"{system}:{decoding}"]
            rows.append([label, decoding, cell(s["sequences_per_s"], ".1f"), cell(s["seconds"], ".1f"),
                         f"{s['tokens_per_sequence']['median']:.1f}", cell(s["peak_rss_mb"], ".0f")])
    header = ["system", "decoding", "sequences/s", "seconds", "generated tokens/seq", "peak RSS (MB)"]
    lines = [markdown_table(header, rows), ""]
    for decoding in args.decoding.split(","):
        relative = ratio(summary, f"finetune:{decoding}", f"hf:{decoding}", "sequences_per_s")
        lines.append(f"finetune / HF, {decoding}: sequences/s ×{relative:.3f}")
    lines.append(f"{args.sentences} Multi30k validation sentences, batch {args.batch_size}, max_new_tokens "
                 f"{args.max_new_tokens}, {args.threads} thread(s) per process.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
