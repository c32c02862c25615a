"""Kill -9 a real fit at a random moment, resume it, and compare with an uninterrupted run.

The demo fit (MiniLM + LoRA on data/support_tickets, configs/classification.yaml) with a checkpoint
every 10 steps; one run uninterrupted, one killed with SIGKILL after a random delay and resumed
from its last checkpoint. Prints both runs' final validation metrics and the largest difference
between their final adapter weights.

    python -m benchmarks.kill_resume [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch


def fit(root: Path, *extra: str) -> subprocess.Popen:
    # (imported here: tests load this file by path to check `saved_step`, where the package may not be importable)
    from benchmarks.harness import REPO, child_env
    from benchmarks.systems.finetune_cli import command

    args = command("fit", "--config", str(REPO / "configs/classification.yaml"),
                   "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false",
                   f"--trainer.default_root_dir={root}",
                   f"--trainer.callbacks.dirpath={root}/best", "--trainer.callbacks+=ModelCheckpoint",
                   f"--trainer.callbacks.dirpath={root}/steps", "--trainer.callbacks.every_n_train_steps=10",
                   "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_top_k=0", *extra)
    return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=child_env())


def final(root: Path) -> tuple[dict, list[str]]:
    out = (root / "log.txt").read_text()
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    return torch.load(root / "steps" / "last.ckpt", weights_only=True), epochs


def saved_step(root: Path) -> Optional[int]:
    """The step of the killed run's last checkpoint; None when it was killed before saving one."""
    last = root / "steps" / "last.ckpt"
    return torch.load(last, weights_only=True)["global_step"] if last.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    rng = random.Random(parser.parse_args().seed)
    work = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    a, b = work / "uninterrupted", work / "killed"
    start = time.perf_counter()
    run = fit(a)
    (a.mkdir(parents=True, exist_ok=True), (a / "log.txt").write_text(run.communicate()[0]))
    seconds = time.perf_counter() - start
    delay = rng.uniform(0.3, 0.8) * seconds
    run = fit(b)
    time.sleep(delay)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    saved = saved_step(b)
    total = torch.load(a / "steps" / "last.ckpt", weights_only=True)["global_step"]
    reached = min(total, round(total * delay / seconds))  # (an estimate: the run's start-up counts as steps)
    if saved is None:
        print(f"killed after {delay:.1f}s of a {seconds:.1f}s run, before the first checkpoint: every step done "
              f"(about {reached}) is lost; the run starts again from step 0")
        resumed = fit(b)
    else:
        print(f"killed after {delay:.1f}s of a {seconds:.1f}s run; last checkpoint at step {saved}: about "
              f"{max(0, reached - saved)} steps lost")
        resumed = fit(b, f"--ckpt_path={b}/steps/last.ckpt")
    (b / "log.txt").write_text(resumed.communicate()[0])
    (state_a, log_a), (state_b, log_b) = final(a), final(b)
    diff = max((state_a["state_dict"][k] - state_b["state_dict"][k]).abs().max().item() for k in state_a["state_dict"])
    print("uninterrupted:", log_a[-1])
    print("resumed:      ", log_b[-1])
    print(f"final step {state_a['global_step']} vs {state_b['global_step']}; max |weight difference| = {diff:.3g}")


if __name__ == "__main__":
    main()
