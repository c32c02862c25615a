"""Where one LoRA training step of SmolLM2-135M-Instruct spends its time, in fp32 or with the frozen weights in bf16
under autocast (finetune's `backbone_dtype: bfloat16`): torch.profiler's operators by their own CPU time. The loss is
finetune's, on target tokens (`finetune/target_tokens.py`); batch 8 x 176 tokens, the last 116 of each the targets;
LoRA r 16 all-linear with dropout 0.05 (configs/instruction_tuning.yaml).

    python -m benchmarks.step_profile --dtype bf16
    python -m benchmarks.step_profile --dtype fp32
"""

import argparse
import time

from benchmarks.models import SMOLLM2, model_dir, with_lora


def main() -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from finetune.precision import autocast
    from finetune.target_tokens import target_tokens

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lora_dropout", type=float, default=0.05)
    parser.add_argument("--rows", type=int, default=20, help="operators shown")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir(SMOLLM2), dtype=dtype)
    model = with_lora(model, "CAUSAL_LM", r=16, alpha=32, dropout=args.lora_dropout, target_modules="all-linear")
    for parameter in model.parameters():  # (as finetune keeps them: the trained weights in fp32)
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    torch.manual_seed(0)
    ids = torch.randint(10, 40000, (8, 176))
    labels = ids.clone()
    labels[:, :60] = -100

    def step() -> None:
        with autocast("cpu", dtype):
            scored = target_tokens(model, {"input_ids": ids}, labels)
        (-scored.logps.mean()).backward()

    step()  # (warm-up)
    start = time.perf_counter()
    step()
    print(f"{args.dtype}: one step {time.perf_counter() - start:.2f} s")
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        step()
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
