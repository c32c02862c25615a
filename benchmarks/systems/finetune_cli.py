"""finetune as a compared system: `finetune.cli.run([...])` in this process (the code path of the `finetune`
command, with the meters attached as callbacks named by class path: `lightning_meters`), the `finetune` command in
a child process, and `finetune serve` as a server in a child process. (Lightning is imported only by a run, so that
the processes of the other systems do not pay for it in start-up time and memory.)"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional
from unittest import mock

from benchmarks.harness import REPO, child_env
from benchmarks.meter import GenerationMeter, StepMeter


def run(argv: list[str], step: Optional[StepMeter] = None, losses: bool = False,
        generation: Optional[GenerationMeter] = None) -> Any:
    """`finetune ARGV` in this process, with the given meters attached; returns the CLI (its trainer, model and
    data module, as the command leaves them)."""
    from benchmarks.systems import lightning_meters
    from finetune.cli import run as finetune

    lightning_meters.ATTACHED.update(step=step, losses=losses, generation=generation)
    callbacks = [f"--trainer.callbacks+={lightning_meters.__name__}.{callback.__name__}"
                 for callback, meter in ((lightning_meters.StepMeterCallback, step),
                                         (lightning_meters.GenerationMeterCallback, generation)) if meter]
    with mock.patch.object(sys, "argv", ["finetune"]):  # (the benchmark's own options are not finetune's)
        return finetune([*argv, *callbacks])


def metrics(cli: Any) -> dict[str, float]:
    """The metrics of the CLI's last fit, validation or test, as numbers."""
    return {key: float(value) for key, value in cli.trainer.callback_metrics.items()}


def last_checkpoint(cli: Any) -> str:
    """The checkpoint a fit left: its last, else its best."""
    callback = cli.trainer.checkpoint_callback
    return callback.last_model_path or callback.best_model_path


def command(*args: str) -> list[str]:
    """The `finetune` command as a user types it (this interpreter's)."""
    return [sys.executable, "-m", "finetune", *args]


def run_command_in(code: Path, *args: str) -> None:
    """`finetune ARGS` in a child process, with the finetune source tree `code` (e.g. a checkout of an earlier
    commit, to compare versions): its directory is the child's current one, so `python -m finetune` imports it."""
    subprocess.run(command(*args), cwd=code, env=child_env(PYTHONPATH=str(code)), check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`finetune serve ARGS` in a child process (its own process group), ready once GET /health answers 200."""

    def __init__(self, args: list[str], log: Path, timeout: float = 300, code: Path = REPO) -> None:
        self.port = free_port()
        with log.open("w") as out:  # (`code`: the finetune source tree to serve with, as the current directory)
            self.process = subprocess.Popen(command("serve", *args, f"--port={self.port}"), stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True, cwd=code,
                                            env=child_env(PYTHONPATH=str(code)))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise SystemExit(f"the server did not start in {timeout:.0f} s; see {log}")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
