"""Conformance kit for task plugins: one call checks a task against the contract in `finetune.task`.

    from finetune.testing import check_task

    def test_my_task_conforms(tmp_path):
        rows = [{"text": "...", "label": "..."}, ...]   # a few dozen rows of your task's data
        report = check_task(MyTask(), rows, workdir=tmp_path)
        assert report.train_losses[-1] < report.train_losses[0]   # optional: it learns

`check_task` builds a tiny backbone offline (a BERT, T5, GPT-2 or Llama with a tokenizer trained on your
rows, or any model directory you pass) and runs your task the way `finetune` runs it:
  1. the task's config rebuilds an equal task and is plain data (what checkpoints store);
  2. `finetune fit` for a few epochs, and in its first step, on real batches: `forward` -> `loss`
     is a finite scalar whose gradient reaches every trainable weight; `loss_weight` is positive (and, after
     training, counts what `loss` averages over: the halves of a batch add up to the whole);
     the metrics update, compute finite values and reset to a clean state; `predict` returns one
     JSON-serialisable dict per feature and `merge_predictions` one row per example;
  3. `finetune predict` from the saved checkpoint writes the same predictions as the model in memory;
  4. with `processes=2`: `finetune validate` and `finetune predict` in two CPU processes (DDP over
     gloo, on a validation set that does not split evenly) give the same metrics and the same file
     as one process.
A violation raises `ConformanceError` (an `AssertionError`) that names the hook to look at.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics import Metric, MetricCollection

from finetune.columns import declared_columns
from finetune.pipeline import collate, connect
from finetune.registry import build_task
from finetune.task import Task
from finetune.tiny import ARCHITECTURES, Architecture, texts_of, tiny_backbone


class ConformanceError(AssertionError):
    """A task breaks the contract; the message names the hook and what was expected."""


@dataclass
class ConformanceReport:
    train_losses: list[float]  # `train/loss` per epoch of the short fit
    metrics: dict[str, float]  # `finetune validate` in one process
    metrics_by_processes: dict[int, dict[str, float]] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)  # the predict file's rows
    checkpoint: Optional[Path] = None


# --- checks inside the first training step ---------------------------------------------------------
def _fail(hook: str, problem: str) -> NoReturn:
    raise ConformanceError(f"Task.{hook}: {problem}")


class ContractChecks(Callback):
    """Runs the hook checks once, on the first training batch and a validation and predict batch; and, once the
    model has learned something (its items' losses differ), whether `loss` is the mean over `loss_weight` items."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step > 0 or batch_idx > 0:
            return
        task, model, tokenizer = pl_module.task, pl_module.model, pl_module.tokenizer
        check_loss(task, pl_module, rolled_out(pl_module, batch, 0))
        datamodule = trainer.datamodule
        model.eval()
        with torch.inference_mode():
            val_batch = trainer.strategy.batch_to_device(next(iter(datamodule.val_dataloader())))
            val_batch = rolled_out(pl_module, val_batch, None)
            check_metrics(task, pl_module, val_batch, datamodule.contexts.get("val"))
            datamodule.connect(task, tokenizer, "predict")
            predict_batch = trainer.strategy.batch_to_device(next(iter(datamodule.predict_dataloader())))
            check_predict(task, model, tokenizer, predict_batch, datamodule.contexts.get("predict"))
        model.train()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.model.eval()
        with torch.inference_mode():
            check_loss_weight(pl_module.task, pl_module, trainer.datamodule.features["train"],
                              trainer.strategy.batch_to_device)
        pl_module.model.train()


def rolled_out(module: Any, batch: dict[str, Any], step: Optional[int]) -> dict[str, Any]:
    """The batch the core trains (`step`) or evaluates (None) on: the task's rollout of it, for a task that makes
    one (`Task.rollout`)."""
    training = module.model.training
    module.model.eval()
    with torch.no_grad():
        rollout = module.task.rollout(module.model, batch, module.tokenizer, step)
    module.model.train(training)
    if rollout is None:
        return batch
    rollout.pop("samples", None)
    return rollout


def check_loss(task: Task, module: Any, batch: dict[str, torch.Tensor]) -> None:
    loss = task.loss(module.task_outputs(batch), batch)
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
        _fail("loss", f"must return a scalar tensor, got {type(loss).__name__} {getattr(loss, 'shape', '')}")
    if not torch.isfinite(loss):
        _fail("loss", f"is {loss.item()} on the first training batch of the tiny backbone")
    if not loss.requires_grad:
        _fail("loss", "has no gradient: is it computed from the model's outputs (not under no_grad)?")
    loss.backward()
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    unreached = [name for name, p in trainable if p.grad is None]
    if unreached:  # (DDP also refuses to train such parameters)
        _fail("loss", f"its gradient reaches none of {len(unreached)} trainable weights, e.g. {unreached[:3]}: is "
                      "a module in `head_modules` unused by `forward`, or an output left out of the loss?")
    norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for _, p in trainable))
    if not torch.isfinite(norm) or norm == 0:
        _fail("loss", f"gradient norm is {norm.item()}")
    module.zero_grad(set_to_none=True)
    weight = task.loss_weight(batch)
    if not int(weight) > 0:
        _fail("loss_weight", f"must be a positive count of what the loss averages over, got {weight!r}")


def check_loss_weight(task: Task, module: Any, features: Any, to_device: Any) -> None:
    """`loss` is the mean over `loss_weight(batch)` items: on two halves of a batch of training features, the losses
    times their weights add up to the whole batch's (the core's exact means across micro-batches and processes
    rely on it). A sum for a mean always shows; a mean over other items than those counted (rows for tokens) shows
    only where the items' losses differ, hence after training."""
    rows = [features[i] for i in range(min(6, len(features)))]
    if len(rows) < 2:
        return
    batches = [to_device(collate(part, task, module.tokenizer, with_targets=True))
               for part in (rows, rows[:len(rows) // 2], rows[len(rows) // 2:])]
    if type(task).rollout is not Task.rollout:  # (sampled anew, the halves would differ: halves of one rollout)
        rollout = rolled_out(module, batches[0], 0)
        half = len(rollout["index"]) // 2
        batches = [rollout, {k: v[:half] for k, v in rollout.items()}, {k: v[half:] for k, v in rollout.items()}]

    def loss_sum(batch: dict[str, Any]) -> tuple[float, int]:
        weight = task.loss_weight(batch)
        return float(task.loss(module.task_outputs(batch), batch)) * weight, weight

    (whole, items), (first, first_items), (second, second_items) = map(loss_sum, batches)
    if items != first_items + second_items or not math.isclose(whole, first + second, rel_tol=1e-3, abs_tol=1e-4):
        _fail("loss_weight", f"the batch's loss x loss_weight is {whole:.6g} over {items} items, its halves' "
                             f"{first:.6g} over {first_items} + {second:.6g} over {second_items}: `loss` must be the "
                             "mean over the `loss_weight(batch)` items it counts (rows, or target tokens)")


def check_metrics(task: Task, module: Any, batch: dict[str, torch.Tensor], context: Any) -> None:
    metrics = task.metrics("val", context)
    if not isinstance(metrics, (MetricCollection, Metric)):
        _fail("metrics", f"must return a torchmetrics MetricCollection, got {type(metrics).__name__}")
    if not task.computes_metrics("val", None):
        return
    outputs = module.task_outputs(batch)

    def computed() -> dict[str, torch.Tensor]:
        task.update_metrics(metrics, outputs, batch, module.model, module.tokenizer)
        values = metrics.compute()
        return values if isinstance(values, dict) else {"value": values}

    first = computed()
    if not first:
        _fail("metrics", "computes no values")
    for name, value in first.items():
        if not isinstance(value, torch.Tensor) or value.ndim or not torch.isfinite(value.float()):
            _fail("update_metrics", f"metric {name!r} computes {value!r}; expected a finite scalar tensor (name "
                                    "per-class values with torchmetrics' ClasswiseWrapper)")
    metrics.reset()
    again = computed()  # after a reset, one update must give the same values: no state survives `reset`
    for name, value in first.items():
        if not torch.allclose(value.float(), again[name].float(), equal_nan=True):
            _fail("metrics", f"metric {name!r} is {again[name]} after reset and the same update, {value} before: "
                             "declare all state with `add_state` so `reset` clears it")


def check_predict(task: Task, model: torch.nn.Module, tokenizer: Any, batch: dict[str, torch.Tensor],
                  context: Any) -> None:
    rows = task.predict(model, batch, tokenizer)
    indices = batch["index"].tolist()
    if not isinstance(rows, list) or len(rows) != len(indices) or not all(isinstance(r, dict) for r in rows):
        _fail("predict", f"must return one dict per feature of the batch ({len(indices)}), got "
                         f"{type(rows).__name__} of {len(rows) if isinstance(rows, list) else '?'}")
    for row in rows:
        try:
            json.dumps(row)
        except (TypeError, ValueError) as err:
            _fail("predict", f"row {row!r:.200} is not JSON-serialisable ({err}): return plain Python values")
    merged = task.merge_predictions(sorted(({**row, "index": i} for row, i in zip(rows, indices)),
                                           key=lambda row: row["index"]), context)
    merged_indices = [row.get("index") for row in merged]
    if merged_indices != sorted(set(indices)):
        _fail("merge_predictions", f"must return one row per example, with its `index`, in index order: got indices "
                                   f"{merged_indices[:10]} for examples {sorted(set(indices))[:10]}")


# --- the whole check ----------------------------------------------------------------------------------
def check_task(
    task: Union[Task, str, dict[str, Any]],
    rows: Sequence[dict[str, Any]],
    *,
    workdir: Union[str, Path],
    backbone: Union[Architecture, str] = "bert",
    predict_rows: Optional[Sequence[dict[str, Any]]] = None,
    processes: int = 2,
    epochs: int = 3,
    batch_size: int = 4,
    extra_args: Sequence[str] = (),
) -> ConformanceReport:
    """Check `task` (an instance, a registered name or `{"class_path", "init_args"}`) on `rows` (its
    training data: a few dozen rows; validation uses them too, minus one when that makes the split
    even). `backbone`: "bert", "t5" (encoder-decoder), "gpt2" or "llama" (decoder-only; the Llama has a
    ChatML chat template) builds a tiny one;
    anything else is a model name or directory. `predict_rows` default to `rows` without targets.
    `processes` > 1 also checks evaluation and prediction under DDP (the task's module must be
    importable: a subprocess runs it). `extra_args` are appended to every `finetune` command."""
    from finetune.cli import run

    workdir = Path(workdir)
    task = build_task(task)
    if not dataclasses.is_dataclass(task) or not _is_frozen(task):
        _fail("config", f"{type(task).__name__} must be a @dataclass(frozen=True): its fields are its options, and "
                        "nothing may be kept on it between hooks")
    try:
        config = task.config()
        json.dumps(config)
    except (TypeError, ValueError) as err:
        _fail("config", f"options must be plain data (checkpoints store them and load with weights_only=True): {err}")
    if build_task(config) != task:
        _fail("config", "does not rebuild an equal task from its stored options")
    if config["class_path"].startswith("__main__."):
        _fail("config", "the task class is defined in __main__; define it in an importable module")
    if not rows:
        raise ValueError("check_task needs some rows of data")
    inputs = {name for _, name in declared_columns(task, "predict")}
    val_rows = list(rows) if processes <= 1 or len(rows) % processes else list(rows)[:-1]
    predict_rows = predict_rows or [{k: v for k, v in row.items() if k in inputs} for row in rows]
    files = {name: _write_jsonl(workdir / "data" / f"{name}.jsonl", data)
             for name, data in (("train", rows), ("val", val_rows), ("predict", predict_rows))}
    if backbone in ARCHITECTURES:
        backbone = tiny_backbone(workdir / f"tiny-{backbone}", backbone, texts_of(rows))

    common = [f"--model.backbone={backbone}", f"--model.task={json.dumps(config)}", f"--data.batch_size={batch_size}",
              f"--data.eval_batch_size={batch_size}", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", "--seed_everything=0", *extra_args]
    checkpoints = workdir / "checkpoints"
    callbacks = [{"class_path": "finetune.testing.ContractChecks"},
                 {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(checkpoints), "filename": "{epoch}"}}]
    in_memory = workdir / "predictions-in-memory.jsonl"
    cli = run(["fit", *common, f"--data.train_file={files['train']}", f"--data.val_file={files['val']}",
               f"--data.predict_file={files['predict']}", f"--trainer.max_epochs={epochs}", "--trainer.devices=1",
               f"--trainer.callbacks={json.dumps(callbacks)}", "--trainer.logger=CSVLogger",
               f"--trainer.logger.save_dir={workdir / 'logs'}", "--trainer.log_every_n_steps=1",
               f"--trainer.default_root_dir={workdir}", f"--predictions.output_file={in_memory}"])
    train_losses = [float(r["train/loss_epoch"]) for r in _csv_rows(workdir / "logs") if r.get("train/loss_epoch")]
    (checkpoint,) = checkpoints.glob("*.ckpt")
    connect(cli.model, cli.datamodule, "predict")
    cli.trainer.predict(cli.model, datamodule=cli.datamodule)

    # a checkpoint restores the task and its weights: the same predictions as the model in memory
    reloaded = workdir / "predictions.jsonl"
    on_checkpoint = [*common, f"--ckpt_path={checkpoint}", "--trainer.logger=false"]
    run(["predict", *on_checkpoint, "--trainer.devices=1", f"--data.predict_file={files['predict']}",
         f"--predictions.output_file={reloaded}", f"--trainer.default_root_dir={workdir / 'predict'}"])
    predictions = _read_jsonl(reloaded)
    if not _close(predictions, _read_jsonl(in_memory)):
        _fail("config", "predictions from the saved checkpoint differ from the trained model's: does the task "
                        "return what it learns from data (e.g. its label set) from `learn`?")
    if len(predictions) != len(predict_rows):
        _fail("merge_predictions", f"{len(predictions)} predictions were written for {len(predict_rows)} inputs")
    validate = run(["validate", *on_checkpoint, "--trainer.devices=1", f"--data.val_file={files['val']}",
                    f"--trainer.default_root_dir={workdir / 'validate'}"])
    metrics = {k: float(v) for k, v in validate.trainer.callback_metrics.items() if k.startswith("val/")}
    report = ConformanceReport(train_losses, metrics, {1: metrics}, predictions, checkpoint)

    if processes > 1:  # several processes: every example counted once, predictions whole and in order
        ddp = [*common, f"--ckpt_path={checkpoint}", f"--trainer.devices={processes}", "--trainer.strategy=ddp"]
        logs = workdir / f"validate-{processes}"
        _finetune(["validate", *ddp, f"--data.val_file={files['val']}", "--trainer.logger=CSVLogger",
                   f"--trainer.logger.save_dir={logs}", f"--trainer.default_root_dir={logs}"], workdir)
        spread = {k: float(v) for k, v in _csv_rows(logs)[-1].items() if k.startswith("val/") and v}
        report.metrics_by_processes[processes] = spread
        for name, value in metrics.items():
            if name not in spread or not math.isclose(value, spread[name], rel_tol=1e-6, abs_tol=1e-6):
                _fail("metrics", f"{name} is {spread.get(name)} with {processes} processes but {value} with one: "
                                 "metric states must be sums or lists that torchmetrics syncs (`dist_reduce_fx`)")
        spread_file = workdir / f"predictions-{processes}.jsonl"
        _finetune(["predict", *ddp, "--trainer.logger=false", f"--data.predict_file={files['predict']}",
                   f"--predictions.output_file={spread_file}", f"--trainer.default_root_dir={workdir / 'predict'}"],
                  workdir)
        if not _close(_read_jsonl(spread_file), predictions):
            _fail("merge_predictions", f"predictions with {processes} processes differ from those with one")
    return report


def _is_frozen(task: Task) -> bool:
    fields = dataclasses.fields(task)
    if not fields:
        return True
    try:
        setattr(task, fields[0].name, getattr(task, fields[0].name))
    except dataclasses.FrozenInstanceError:
        return True
    return False


_LAUNCHER_VARIABLES = {"MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                       "LOCAL_WORLD_SIZE"}


def processes_env(pythonpath: Optional[str] = None) -> dict[str, str]:
    """The environment of a fresh `finetune` launch of one or several CPU processes on this machine: one thread
    each, offline, `pythonpath` (if given) to import from. Rank and rendezvous variables that an earlier
    in-process run left in `os.environ` are not passed on: a process that inherits LOCAL_RANK takes itself for
    one of an already launched job and waits for peers that never start, and an inherited MASTER_PORT may be
    taken (EADDRINUSE). The rendezvous port is a free one below the kernel's ephemeral range, where no
    outgoing connection can be given it while the processes start."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARIABLES}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MASTER_PORT=str(_free_port_below_ephemeral()))
    return env if pythonpath is None else {**env, "PYTHONPATH": pythonpath}


def _free_port_below_ephemeral() -> int:
    try:
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # (not Linux: its default range starts at 49152)
        first_ephemeral = 49152
    below = range(max(1024, min(first_ephemeral, 32768) - 12768), min(first_ephemeral, 32768))
    for port in random.Random().sample(below, min(200, len(below))):  # (a tuned range may leave few below it)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ConformanceError("no free port below the ephemeral range for the processes' rendezvous")


def _finetune(args: list[str], cwd: Path) -> None:
    # The subprocess must import the task as this process does.
    env = processes_env(os.pathsep.join(p for p in sys.path if p))
    try:
        result = subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, env=env, capture_output=True,
                                text=True, timeout=600)
    except subprocess.TimeoutExpired as err:  # (a process waiting for the others forever)
        raise ConformanceError(f"`finetune {args[0]}` in several processes did not finish in {err.timeout} s: "
                               f"does every process run the same collective operations?\n{err.stderr}") from err
    if result.returncode != 0:
        raise ConformanceError(f"`finetune {args[0]}` in several processes failed:\n{result.stderr[-4000:]}")


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _csv_rows(save_dir: Path) -> list[dict[str, str]]:
    (path,) = Path(save_dir).rglob("metrics.csv")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _close(a: Any, b: Any) -> bool:
    """Equal, with floats equal to 1e-5 (summation order differs between batchings)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-5,
                                                                                            abs_tol=1e-5)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b
