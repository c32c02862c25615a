"""finetune as a compared system: `finetune.cli.run([...])` in this process (the code path of the `finetune`
command, with the meters attached as callbacks named by class path, as a user names a callback), the `finetune`
command in a child process, and `finetune serve` as a server in a child process."""

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

from lightning.pytorch import Callback

from benchmarks.harness import REPO, child_env
from benchmarks.meter import GenerationMeter, StepMeter

# The meters of this process's runs: jsonargparse builds the callbacks from their class paths, without arguments.
ATTACHED: dict[str, Any] = {"step": None, "losses": False, "generation": None}


class StepMeterCallback(Callback):
    """Every training step to the attached StepMeter (and, when asked, the mean loss of the step's items: the
    training step returns the batch's sum, as finetune divides the gradients by the step's items)."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        meter = ATTACHED["step"]
        if meter.pad_id is None:
            meter.pad_id = pl_module.tokenizer.pad_token_id

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: dict, batch_idx: int) -> None:
        ATTACHED["step"].begin_step()
        ATTACHED["step"].record(batch)  # (finetune calls a causal LM's decoder and output layer apart: no model hook)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: dict, batch_idx: int) -> None:
        loss = outputs["loss"].detach() / pl_module.task.loss_weight(batch) if ATTACHED["losses"] else None
        ATTACHED["step"].end_step(loss)


class GenerationMeterCallback(Callback):
    """The attached GenerationMeter over finetune's validation or prediction loop (collation, generation, decoding,
    metrics or writing the predictions; the inputs were tokenized at setup)."""

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        ATTACHED["generation"].start(pl_module.model, pl_module.tokenizer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        ATTACHED["generation"].stop()

    on_predict_start = on_validation_start
    on_predict_end = on_validation_end


def run(argv: list[str], step: Optional[StepMeter] = None, losses: bool = False,
        generation: Optional[GenerationMeter] = None) -> Any:
    """`finetune ARGV` in this process, with the given meters attached; returns the CLI (its trainer, model and
    data module, as the command leaves them)."""
    from finetune.cli import run as finetune

    ATTACHED.update(step=step, losses=losses, generation=generation)
    callbacks = [f"--trainer.callbacks+={__name__}.{callback.__name__}"
                 for callback, meter in ((StepMeterCallback, step), (GenerationMeterCallback, generation)) if meter]
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`finetune serve ARGS` in a child process (its own process group), ready once GET /health answers 200."""

    def __init__(self, args: list[str], log: Path, timeout: float = 300) -> None:
        self.port = free_port()
        with log.open("w") as out:
            self.process = subprocess.Popen(command("serve", *args, f"--port={self.port}"), stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
                                            env=child_env())
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
