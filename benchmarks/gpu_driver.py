"""The GPU check's driver (benchmarks/gpu_check.py): every check a child process with its own timeout, all within
the time budget, recorded as it ends (the JSON rewritten, a line printed); and the strategy checks (a shipped
strategy config from `finetune fit` to its checkpoint to `finetune predict`)."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks.harness import child_env, launch
from benchmarks.results import command_line, markdown_table, write_results
from benchmarks.systems import finetune_cli

STRATEGY_STEPS, STRATEGY_BATCH, STRATEGY_MAX_LENGTH = 20, 8, 256


class Driver:
    """The checks' child processes (each with its timeout, within the budget) and their records, written to
    `<out>/gpu_check.json` as they come."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.logs = self.out / "gpu_check_logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.name = "gpu_check_dry_run" if args.dry_run else "gpu_check"
        self.json_path = self.out / f"{self.name}.json"
        self.deadline = time.time() + args.budget
        self.started = time.time()
        self.checks: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}
        self.ports = itertools.count(29500 + os.getpid() % 1000, 7)

    def remaining(self) -> float:
        return self.deadline - time.time()

    def env(self, work: Path) -> dict[str, str]:
        extra = {"MASTER_PORT": str(next(self.ports)),  # (each strategy check's process group its own)
                 "HF_DATASETS_CACHE": str(work / "datasets-cache")}  # (parallel checks never share a cache file)
        if self.args.dry_run_cpu:
            return child_env(2, CUDA_VISIBLE_DEVICES="", **extra)
        return child_env(**extra)

    def run(self, name: str, command: list[str], timeout: float, work: Path) -> dict[str, Any]:
        """One child with its own timeout, within the budget; its output in <logs>/<name>.log."""
        limit = min(timeout, self.remaining())
        if limit < 15:
            return {"status": "not run", "seconds": 0.0, "error": "the time budget (--budget) is spent"}
        log = self.logs / f"{name}.log"
        log.unlink(missing_ok=True)
        return launch(command, log, self.env(work), limit)

    def record(self, check: dict[str, Any]) -> None:
        self.checks.append(check)
        extra = f" ({check['error'].splitlines()[0]})" if check.get("error") else ""
        print(f"[{time.time() - self.started:5.0f} s] {check['name']}: {check['status']} in "
              f"{check['seconds']:.1f} s{extra}", flush=True)
        self.write()

    def write(self) -> None:
        payload = {"command": command_line(), "dry_run": self.args.dry_run,
                   "machine": self.info, "wall_s": time.time() - self.started, "checks": self.checks,
                   "settings": {k: v for k, v in vars(self.args).items() if k not in ("child",)},
                   "mfu_formula": f"6 * N * real_tokens_per_s / ({self.args.peak_tflops} TFLOP/s); N = base model "
                                  "parameters (embeddings included, tied head once, LoRA excluded)",
                   "table": self.table()}
        write_results(self.name, payload, self.out)

    def table(self) -> str:
        bench = [c for c in self.checks if c["kind"] == "bench"]
        rows = []
        for c in bench:
            r = c.get("result") or {}
            rows.append([c["model"], c["system"], c["status"],
                         f"{r['real_tokens_per_s']:,.0f}" if r else "–", f"{r['step_ms']:.0f}" if r else "–",
                         f"{r['peak_memory_gib']:.2f}" if r.get("peak_memory_gib") is not None else "–",
                         f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "–",
                         f"{r['syncs_per_step']:.1f}" if r.get("syncs_per_step") is not None else "–",
                         f"{c['seconds']:.0f}"])
        lines = []
        if rows:
            lines += ["Training, bf16-mixed, LoRA r=16 all-linear (real tokens; MFU = 6·N·tokens/s / peak)",
                      markdown_table(["model", "system", "status", "real tok/s", "step ms", "peak GiB", "MFU",
                                      "syncs/step", "wall s"], rows), ""]
        strategies = sorted((c for c in self.checks if c["kind"] == "strategy"), key=lambda c: c["strategy"])
        if strategies:
            rows = [[c["strategy"], c.get("devices", "–"), c["stages"].get("fit", "–"),
                     c["stages"].get("predict", "–"),
                     c["status"], f"{c['seconds']:.0f}", (c.get("note") or "")[:90]] for c in strategies]
            lines += [f"Strategies: configs/instruction_tuning.yaml + configs/strategies/<name>.yaml, fit "
                      f"{self.args.strategy_steps} steps -> last.ckpt -> single-process predict",
                      markdown_table(["strategy", "devices", "fit", "predict", "status", "wall s", "note / error"],
                                     rows), ""]
        other = [[c["name"], c["status"], f"{c['seconds']:.0f}", (c.get("note") or "")[:120]]
                 for c in self.checks if c["kind"] == "setup"]
        if other:
            lines += [markdown_table(["check", "status", "wall s", "note"], other)]
        return "\n".join(lines)


def last_error_line(check: dict[str, Any]) -> str:
    lines = [line for line in (check.get("error") or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def strategy_batch(args: argparse.Namespace) -> int:
    return 2 if args.dry_run else STRATEGY_BATCH


def strategy_check(driver: Driver, name: str, config: Optional[Path], backbone: str, files: dict[str, Any],
                   gpu: bool) -> dict[str, Any]:
    """fit (~20 steps) with the strategy config -> last.ckpt (DeepSpeed: converted to one file) -> predict."""
    args = driver.args
    work = Path(args.work) / f"strategy-{name}"
    work.mkdir(parents=True, exist_ok=True)
    check: dict[str, Any] = {"kind": "strategy", "name": f"strategy {name}", "strategy": name, "stages": {},
                             "seconds": 0.0, "status": "ok", "devices": "1"}
    text = config.read_text() if config else ""
    multi = "devices: -1" in text
    if multi:
        check["devices"] = "1 (config: all GPUs)" if gpu else "1 (CPU)"
    needs = {"quantization: 4bit": "bitsandbytes", "DeepSpeedStrategy": "deepspeed"}
    for marker, package in needs.items():
        if marker in text and importlib.util.find_spec(package) is None:
            check.update(status="skipped", note=f"{package} is not installed (pip install {package})")
            return check
    configs = ["--config", "configs/instruction_tuning.yaml", *(["--config", str(config)] if config else [])]
    common = [f"--model.task.max_length={STRATEGY_MAX_LENGTH if not args.dry_run else 64}",
              f"--data.train_file={files['strategy_train']}", f"--data.val_file={files['strategy_val']}",
              "--trainer.devices=1", "--trainer.enable_progress_bar=false"]
    if gpu:
        common += ["--trainer.precision=bf16-mixed"]
    else:  # (the configs name the GPU accelerator; the dry run checks the same plumbing on the CPU)
        common += ["--trainer.accelerator=cpu", "--trainer.precision=bf16-mixed"]
    if args.dry_run:
        common += [f"--model.backbone={backbone}"]  # (the tiny Llama; on a GPU the config's SmolLM2)
    fit = driver.run(f"strategy_{name}_fit", [
        *finetune_cli.command("fit", *configs), *common, f"--data.batch_size={strategy_batch(args)}",
        f"--trainer.max_steps={args.strategy_steps}", "--trainer.max_epochs=1", "--trainer.log_every_n_steps=5",
        f"--trainer.default_root_dir={work / 'runs'}"], args.fit_timeout, work)
    check["seconds"] += fit["seconds"]
    check["stages"]["fit"] = fit["status"]
    if fit["status"] != "ok":
        check.update(status=fit["status"], error=fit.get("error"), note=last_error_line(fit), log=fit.get("log"))
        return check
    found = sorted((work / "runs").rglob("last.ckpt"))
    if not found:
        check.update(status="failed", note="fit wrote no last.ckpt")
        return check
    ckpt = found[-1]
    if ckpt.is_dir():  # DeepSpeed: a directory of shards; its config's own conversion to one file
        single = work / "last-single.ckpt"
        convert = driver.run(f"strategy_{name}_convert", [
            sys.executable, "-c", "import sys; from lightning.pytorch.utilities.deepspeed import "
            "convert_zero_checkpoint_to_fp32_state_dict as c; c(sys.argv[1], sys.argv[2])", str(ckpt), str(single)],
            120, work)
        check["seconds"] += convert["seconds"]
        check["stages"]["convert"] = convert["status"]
        if convert["status"] != "ok":
            check.update(status=convert["status"], error=convert.get("error"),
                         note="convert: " + last_error_line(convert))
            return check
        ckpt = single
    check["checkpoint"] = str(ckpt)
    check["checkpoint_mb"] = ckpt.stat().st_size / 2**20
    output = work / "predictions.jsonl"
    predict = driver.run(f"strategy_{name}_predict", [
        *finetune_cli.command("predict", "--config", "configs/instruction_tuning.yaml", f"--ckpt_path={ckpt}"),
        *common[:3], f"--data.predict_file={files['predict']}", f"--predictions.output_file={output}",
        "--trainer.devices=1", *(["--trainer.precision=bf16-mixed"] if gpu else ["--trainer.accelerator=cpu"]),
        "--trainer.enable_progress_bar=false", "--model.task.generation.max_new_tokens=16"],
        args.predict_timeout, work)
    check["seconds"] += predict["seconds"]
    check["stages"]["predict"] = predict["status"]
    if predict["status"] != "ok":
        check.update(status=predict["status"], error=predict.get("error"), note="predict: " + last_error_line(predict))
        return check
    lines = output.read_text().splitlines() if output.is_file() else []
    texts = [json.loads(line).get("generated_text", "") for line in lines]
    check["predictions"] = texts
    expected = sum(1 for _ in open(files["predict"]))
    if len(texts) != expected:
        check.update(status="failed", note=f"predict wrote {len(texts)} lines for {expected} rows")
    else:
        check["note"] = f"{len(texts)} predictions, first: {texts[0][:40]!r}" + (
            "; devices=1 on this machine" if multi else "")
    return check
