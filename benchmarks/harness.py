"""Child processes: each measured run in a fresh process (so its peak memory and start-up are its own), systems
taking turns across repeats (A, B, C, A, B, C, ...), each run started once the machine is quiet and repeated when
other processes disturbed it. A child reports with one line `BENCH_RESULT {json}` (`emit`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MARKER = "BENCH_RESULT "
START_ENV = "BENCH_COMMAND_START"  # wall-clock time at which the driver started the child
PROCESS_START = time.time()


# --- in a child ------------------------------------------------------------------------------------------
def emit(result: dict[str, Any]) -> None:
    print(MARKER + json.dumps(result, default=str), flush=True)


def since_command_start() -> float:
    """Seconds since the driver started this process (since this module's import when run by hand)."""
    return time.time() - float(os.environ.get(START_ENV, PROCESS_START))


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# --- in the driver -----------------------------------------------------------------------------------------
def add_run_arguments(parser: argparse.ArgumentParser, output: str, repeats: int,
                      warmup_rounds: Optional[int] = None) -> None:
    """The options every head-to-head driver shares: the results file, the rounds, seed, threads and how quiet
    the machine must be."""
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


def module_command(module: str, *options: str) -> list[str]:
    """`python -m MODULE OPTIONS` with this interpreter (children run from the repository root)."""
    return [sys.executable, "-m", module, *options]


def child_commands(module: str, names: list[str], options: list[str]) -> dict[str, Callable[[], list[str]]]:
    """{name: the command line of a fresh `python -m module --child=name OPTIONS`}, as `alternate` takes them."""
    return {name: (lambda name=name: module_command(module, f"--child={name}", *options)) for name in names}


def child_env(threads: Optional[int] = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(extra)
    return env


def cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores (/proc/stat)."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - fields[3] - fields[4]) / ticks, sum(fields) / ticks  # idle and iowait are not busy


def busy_fraction(seconds: float = 2.0) -> float:
    """How busy the machine's cores are over `seconds`, while this process sleeps."""
    busy, total = cpu_seconds()
    time.sleep(seconds)
    busy2, total2 = cpu_seconds()
    return (busy2 - busy) / max(total2 - total, 1e-9)


def wait_until_quiet(threshold: float, max_wait: float) -> float:
    """Wait (up to `max_wait` s) until other processes use less than `threshold` of the cores."""
    deadline = time.time() + max_wait
    while (busy := busy_fraction()) >= threshold and time.time() < deadline:
        print(f"  waiting: other processes use {100 * busy:.0f}% of the CPU", file=sys.stderr, flush=True)
        time.sleep(8)
    return busy


def launch(command: list[str], log: Path, env: dict[str, str], timeout: float = 1800) -> dict[str, Any]:
    """Runs one child to its end in its own process group (killed whole after `timeout` s), its output appended to
    `log`. Returns its status ("ok", "failed", "timeout"), wall time, last result line (or None), the tail of its
    output when it did not succeed, and the share of the machine's CPU that other processes used meanwhile."""
    env = {**env, START_ENV: repr(time.time()), "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        offset = out.tell()
        busy, _ = cpu_seconds()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                   start_new_session=True)
        try:
            code: Optional[int] = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
            stop_group(process)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    other = max(0.0, cpu_seconds()[0] - busy - own) / (seconds * (os.cpu_count() or 1))
    with open(log, errors="replace") as out:
        out.seek(offset)
        lines = out.read().splitlines()
    results = [line[len(MARKER):] for line in lines if line.startswith(MARKER)]
    run: dict[str, Any] = {"status": "ok" if code == 0 else "failed" if code is not None else "timeout",
                           "seconds": seconds, "result": json.loads(results[-1]) if results else None,
                           "other_cpu_fraction": other, "log": str(log)}
    if code != 0:
        why = f"exit {code}" if code is not None else f"killed after {timeout:.0f} s"
        run["error"] = why + "\n" + "\n".join(lines[-15:])
    return run


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the child's process group, SIGKILL if it is still there 10 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def measured(command: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """One child's result line, with the command's wall time and the other processes' CPU share; an error
    naming the log when the child failed or printed no result."""
    run = launch(command, log, env)
    if run["status"] != "ok" or run["result"] is None:
        raise RuntimeError(f"{' '.join(command)} {run['status']} without a result; see {log}\n{run.get('error', '')}")
    return {**run["result"], "command_wall_s": run["seconds"], "other_cpu_fraction": run["other_cpu_fraction"]}


def alternate(systems: dict[str, Callable[[], list[str]]], repeats: int, warmup_rounds: int, threads: int,
              log: Path, quiet: float = 0.15, max_wait: float = 600, tries: int = 3) -> dict[str, list[dict[str, Any]]]:
    """Rounds of every system in turn (A, B, C, A, B, C, ...); the first `warmup_rounds` are discarded
    (they fill the OS page cache and the datasets cache, which every later round finds full).

    The machine may be shared: each child starts once other processes use less than `quiet` of the CPU
    (waiting up to `max_wait` s), and a run during which they used more is repeated (up to `tries` runs;
    the disturbed ones are kept under "disturbed", the last one counts)."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    runs["disturbed"] = []
    env = child_env(threads)
    for round_ in range(warmup_rounds + repeats):
        for name, command in systems.items():
            for attempt in range(1, tries + 1):
                wait_until_quiet(quiet, max_wait)
                result = measured(command(), log, env)
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
