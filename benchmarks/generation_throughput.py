"""Validation generation throughput head to head: `finetune validate` on a translation task vs Hugging
Face `Seq2SeqTrainer(predict_with_generate=True).evaluate`, greedy and beam search 4.

Same model, same LoRA adapter (query/value, r=8, freshly initialised, so both generate with exactly the
same weights), same validation sentences, batch size, source length, max_new_tokens and num_beams; both
compute the validation loss, generate, decode and score BLEU and chrF (sacrebleu). The model is the
pretrained MiniLM warm-started as a BERT2BERT encoder-decoder (as in make_minilm_seq2seq.py, but with its
seeded random cross-attention saved, so both systems load identical weights; offline). Untrained, it
rarely emits [SEP], so most sequences run to max_new_tokens: the table gives generated tokens per
sequence to show both did the same work.

Every (system, decoding) runs in a fresh process per repeat, alternately, after a discarded warm-up round.

    python benchmarks/generation_throughput.py --data ../shared/data/multi30k --sentences 300 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SHARED,
    add_run_arguments,
    alternate,
    cell,
    child_commands,
    emit,
    interference_note,
    machine,
    markdown_table,
    minilm_path,
    peak_rss_mb,
    set_threads,
    subset,
    summarize,
    versions,
    write_results,
)

SYSTEMS = {"finetune": "finetune validate", "hf": "HF Seq2SeqTrainer.evaluate(predict_with_generate)"}
DECODING = {"greedy": 1, "beam4": 4}


class GenerationCount:
    """Wraps a model's `generate`: counts the sequences and the tokens generated (not padding)."""

    def __init__(self, model: Any, pad_token_id: int) -> None:
        self.sequences = self.tokens = 0
        self.pad_token_id = pad_token_id
        original = model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            self.sequences += output.shape[0]
            self.tokens += int((output != pad_token_id).sum()) - output.shape[0]  # minus the decoder start token
            return output

        model.generate = generate


def build_model(out: Path, seed: int) -> None:
    import torch
    from transformers import AutoTokenizer, EncoderDecoderModel

    torch.manual_seed(seed)
    minilm = minilm_path()
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(minilm, minilm)
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = tokenizer.cls_token_id
        config.eos_token_id = tokenizer.sep_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# --- the systems (each in its own process) ---------------------------------------------------------
def run_finetune(args: argparse.Namespace, beams: int, work: Path) -> dict[str, Any]:
    from lightning.pytorch import Callback

    from finetune.cli import run

    marks: dict[str, Any] = {}

    class GenerationClock(Callback):
        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            marks["count"] = GenerationCount(pl_module.model, pl_module.tokenizer.pad_token_id)
            marks["start"] = time.perf_counter()

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            marks["end"] = time.perf_counter()

    setattr(sys.modules[__name__], "GenerationClock", GenerationClock)  # named by its class_path below
    cli = run([
        "validate", f"--seed_everything={args.seed}", f"--model.backbone={args.model}",
        "--model.task=Translation", f"--model.task.max_source_length={args.max_source_length}",
        f"--model.task.max_target_length={args.max_target_length}",
        f"--model.task.generation.max_new_tokens={args.max_new_tokens}",
        f"--model.task.generation.num_beams={beams}", "--model.lora.r=8", "--model.lora.alpha=16",
        "--model.lora.dropout=0.1", "--model.lora.target_modules=[query,value]", f"--data.val_file={args.val_file}",
        f"--data.eval_batch_size={args.batch_size}", "--data.num_workers=0", "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--trainer.precision=32", "--trainer.logger=false",
        f"--trainer.default_root_dir={work}", f"--trainer.callbacks+={__name__}.GenerationClock",
    ])
    metrics = cli.trainer.callback_metrics
    return {"seconds": marks["end"] - marks["start"], "sequences": marks["count"].sequences,
            "generated_tokens": marks["count"].tokens, "bleu": float(metrics["val/bleu"])}


def run_hf(args: argparse.Namespace, beams: int, work: Path) -> dict[str, Any]:
    import datasets
    import numpy as np
    import sacrebleu
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSeq2SeqLM.from_pretrained(args.model)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_2_SEQ_LM", r=8, lora_alpha=16, lora_dropout=0.1,
                                             target_modules=["query", "value"]))
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
    training_args = Seq2SeqTrainingArguments(
        output_dir=str(work), per_device_eval_batch_size=args.batch_size, predict_with_generate=True,
        report_to="none", use_cpu=True, dataloader_num_workers=0, seed=args.seed,
        train_sampling_strategy="group_by_length",  # (also groups evaluation batches by length)
    )
    trainer = Seq2SeqTrainer(model=model, args=training_args, eval_dataset=data, processing_class=tokenizer,
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
                             compute_metrics=compute_metrics)
    count = GenerationCount(trainer.model, tokenizer.pad_token_id)
    start = time.perf_counter()
    metrics = trainer.evaluate(max_new_tokens=args.max_new_tokens, num_beams=beams)
    return {"seconds": time.perf_counter() - start, "sequences": count.sequences, "generated_tokens": count.tokens,
            "bleu": metrics["eval_bleu"]}


def child(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    system, decoding = args.child.split(":")
    work = Path(tempfile.mkdtemp(prefix=f"bench-gen-{system}-"))
    try:
        result = (run_finetune if system == "finetune" else run_hf)(args, DECODING[decoding], work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update(sequences_per_s=result["sequences"] / result["seconds"],
                  tokens_per_sequence=result["generated_tokens"] / result["sequences"], peak_rss_mb=peak_rss_mb())
    emit(result)


# --- the driver --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "multi30k"), help="folder with validation.jsonl")
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
    info = machine(args.threads)
    set_threads(args.threads)
    build_model(work / "model", args.seed)
    val_file = subset(Path(args.data) / "validation.jsonl", work / "validation.jsonl", args.sentences)
    common = [f"--model={work / 'model'}", f"--val_file={val_file}", f"--batch_size={args.batch_size}",
              f"--max_source_length={args.max_source_length}", f"--max_target_length={args.max_target_length}",
              f"--max_new_tokens={args.max_new_tokens}", f"--seed={args.seed}", f"--threads={args.threads}"]
    script = str(Path(__file__).resolve())
    systems = child_commands(script, [f"{system}:{decoding}" for decoding in args.decoding.split(",")
                                      for system in SYSTEMS], common)
    log = work / "children.log"
    print(f"children's output: {log}", file=sys.stderr)
    runs = alternate(systems, args.repeats, args.warmup_rounds, args.threads, log, args.quiet, args.max_wait)
    summary = summarize(runs)
    info["load_average_at_end"] = os.getloadavg()
    payload = {
        "command": "python " + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]]), "machine": info,
        "versions": versions("torch", "lightning", "transformers", "peft", "datasets"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "model", "val_file", "output")},
        "wall_s": time.time() - started, "summary": summary, "runs": runs,
    }
    payload["table"] = report(summary, args) + "\n" + interference_note(summary, runs)
    path = write_results(args.output, payload)
    print(payload["table"])
    print(f"\nwritten: {path}")
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
        ratio = (summary[f"finetune:{decoding}"]["sequences_per_s"]["median"]
                 / summary[f"hf:{decoding}"]["sequences_per_s"]["median"])
        lines.append(f"finetune / HF, {decoding}: sequences/s ×{ratio:.3f}")
    lines.append(f"{args.sentences} Multi30k validation sentences, batch {args.batch_size}, max_new_tokens "
                 f"{args.max_new_tokens}, {args.threads} thread(s) per process.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
