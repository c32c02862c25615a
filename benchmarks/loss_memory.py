"""Peak memory of a causal-LM training step against sequence length: the loss over the full logits (what
transformers computes for `model(..., labels=...)`, and so HF Trainer, TRL and a hand loop) vs finetune's
target-token scores (`finetune/target_tokens.py`: the output layer on chunks of target positions, never all
logits at once; LoRA leaves it frozen, so each chunk's gradient with respect to its hidden states is computed
in the forward pass and only scaled in the backward pass).

SmolLM2-135M-Instruct (a 49,152-token vocabulary; `--backbone gemma-3-270m`: Gemma 3 270M, 262,144 tokens) with
LoRA (r 16, all-linear), fp32 on this CPU; a batch of
random token ids, every position a target (language modelling: the worst case for finetune, which skips
prompt positions). Each method and length in a fresh process, which runs two steps (forward and backward):
the peak is the first step's, the highest resident memory a 1 ms sampler sees during it above what the process
held just before it, with glibc returning every freed block of 64 kB or more to the system at once
(MALLOC_MMAP_THRESHOLD_=65536, so that resident memory is live memory, not what the allocator keeps for
reuse); the time is the second step's. The two must agree: the loss to 1e-5 and every LoRA gradient (largest
difference relative to the largest gradient).

    python -m benchmarks.loss_memory --lengths 256,512,1024,2048 --batch_size 2
    python -m benchmarks.loss_memory --backbone gemma-3-270m --lengths 512,2048 --batch_size 1 \
        --output loss_memory_gemma3
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

from benchmarks.harness import add_run_arguments, emit, module_command, set_threads
from benchmarks.meter import PeakSampler, peak_rss_mb, rss_mb
from benchmarks.models import SMOLLM2, model_dir, with_lora
from benchmarks.results import compare, markdown_table, publish, versions

METHODS = {"full": "full logits (transformers' loss)", "chunked": "finetune (target tokens, chunked)"}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.target_tokens import target_tokens

    set_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    torch.manual_seed(args.seed)  # (the same LoRA initialisation in both methods' processes)
    model = with_lora(model, None, **LORA)
    model.train()
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.length), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}  # (as HF Trainer)

    def step() -> torch.Tensor:
        if args.child == "full":
            loss = model(**inputs, labels=ids).loss
        else:
            loss = -target_tokens(model, inputs, ids).logps.mean()
        loss.backward()
        return loss

    gc.collect()
    before = rss_mb()
    with PeakSampler() as sampler:
        loss = step()
    torch.save({name: p.grad for name, p in model.named_parameters() if p.grad is not None}, args.grads)
    model.zero_grad(set_to_none=True)
    gc.collect()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    emit({"loss": loss.item(), "step_peak_mb": sampler.peak - before, "rss_before_mb": before,
          "peak_rss_mb": peak_rss_mb(), "step_s": seconds})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,512,1024,2048", help="sequence lengths, comma-separated")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--backbone", default=SMOLLM2, help="a causal LM, as `model.backbone` names it")
    add_run_arguments(parser, "loss_memory", repeats=1)
    parser.add_argument("--child", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    import torch

    backbone = model_dir(args.backbone)  # what finetune trains
    work = Path(tempfile.mkdtemp(prefix="bench-loss-memory-"))
    lengths = [int(n) for n in args.lengths.split(",")]

    def command(method: str, length: int) -> list[str]:
        return module_command(__spec__.name, f"--child={method}", f"--length={length}", f"--model_dir={backbone}",
                              f"--grads={work / f'{method}-{length}.pt'}", f"--batch_size={args.batch_size}",
                              f"--seed={args.seed}", f"--threads={args.threads}")

    systems = {f"{method}@{length}": (lambda m=method, n=length: command(m, n))
               for length in lengths for method in METHODS}
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # (the children's environment is a copy of this one)
    runs, _, info = compare(systems, args, work)

    rows, figures = [], {}
    for length in lengths:
        full, chunked = (runs[f"{m}@{length}"][-1] for m in METHODS)
        grads = [torch.load(work / f"{m}-{length}.pt", weights_only=True) for m in METHODS]
        scale = max(g.abs().max().item() for g in grads[0].values())
        grad_diff = max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0]) / scale
        loss_diff = abs(full["loss"] - chunked["loss"])
        figures[length] = {"full": full, "chunked": chunked, "loss_difference": loss_diff,
                           "gradient_difference_relative": grad_diff}
        rows.append([str(length), str(args.batch_size * length), f"{full['step_peak_mb']:.0f}",
                     f"{chunked['step_peak_mb']:.0f}", f"{chunked['step_peak_mb'] / full['step_peak_mb']:.2f}",
                     f"{full['step_s']:.1f}", f"{chunked['step_s']:.1f}", f"{full['loss']:.6f}",
                     f"{loss_diff:.1e}", f"{grad_diff:.1e}"])
    header = ["length", "tokens", "full: step peak (MB)", "finetune: step peak (MB)", "ratio", "full: step (s)",
              "finetune: step (s)", "loss", "Δ loss", "max Δ grad / max grad"]
    publish(args.output, {
        "machine": info, "versions": versions("torch", "transformers", "peft"),
        "settings": {"batch_size": args.batch_size, "lengths": lengths, "backbone": args.backbone,
                     "model_dir": backbone,
                     "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"}},
        "figures": figures, "runs": runs}, markdown_table(header, rows))


if __name__ == "__main__":
    main()
