"""Two CPU processes (DDP over gloo), as `finetune` runs on several GPUs or nodes: training works and
its checkpoint loads in one process, with the same metrics. (Evaluation and prediction with two
processes, for every task, are part of the conformance kit: tests/test_conformance.py.)"""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_question_answering import code_rows

from conftest import make_rows, reversal_rows, write_jsonl
from finetune.cli import run
from finetune.testing import processes_env

pytestmark = pytest.mark.slow


def finetune(*args: str, cwd: Path) -> str:
    # (this checkout's finetune, where the installed one may be another's: a git worktree)
    path = os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent)])
    result = subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, env=processes_env(path),
                            capture_output=True, text=True, timeout=300)  # (a hang fails, not blocks)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def last_validation(root: Path) -> dict[str, float]:
    (path,) = root.rglob("metrics.csv")
    rows = [r for r in csv.DictReader(path.open()) if r.get("val/loss")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


TASKS = {
    "classification": ("tiny_bert", ["--model.task=TextClassification", "--model.lora.target_modules=all-linear",
                                      "--model.optimizer.lr=0.01"]),
    "translation": ("tiny_t5", ["--model.task=Translation", "--model.lora=null", "--model.optimizer.lr=0.01"]),
    "question_answering": ("tiny_bert", ["--model.task=QuestionAnswering", "--model.task.version_2_with_negative=true",
                                         "--model.task.max_length=64", "--model.task.doc_stride=16",
                                         "--model.lora.target_modules=all-linear", "--model.optimizer.lr=0.01"]),
}


def data_for(task: str, tmp_path: Path) -> dict[str, str]:
    if task == "classification":
        train, val = make_rows(64, seed=1), make_rows(31, seed=2)  # 31: not divisible by 2 processes
    elif task == "translation":
        train, val = reversal_rows(16) * 2, reversal_rows(31, seed=5)
    else:  # contexts long enough that one example's windows land on different processes
        train, val = code_rows(64, seed=1), code_rows(31, seed=2)
    return {"train": write_jsonl(tmp_path / "train.jsonl", train), "val": write_jsonl(tmp_path / "val.jsonl", val)}


def fit_on_two(common: list[str], two: list[str], files: dict[str, str], tmp_path: Path) -> tuple[Path, dict]:
    """Fits on two processes (accumulating and clipping gradients) into tmp_path/two: the loss falls. Returns the
    one checkpoint and the last validation's metrics (all 31 examples, once)."""
    finetune("fit", *common, *two, f"--data.train_file={files['train']}", f"--data.val_file={files['val']}",
             "--trainer.max_epochs=3", "--trainer.accumulate_grad_batches=2", "--trainer.gradient_clip_val=1.0",
             "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}/two",
             f"--trainer.default_root_dir={tmp_path}/two", cwd=tmp_path)
    (path,) = (tmp_path / "two").rglob("metrics.csv")
    losses = [float(r["train/loss_epoch"]) for r in csv.DictReader(path.open()) if r.get("train/loss_epoch")]
    assert losses[-1] < losses[0]
    (ckpt,) = (tmp_path / "two").rglob("*.ckpt")
    return ckpt, last_validation(tmp_path / "two")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_two_processes_train_and_evaluate_exactly(task, request, tmp_path):
    fixture, task_args = TASKS[task]
    backbone = request.getfixturevalue(fixture)
    files = data_for(task, tmp_path)
    common = [f"--model.backbone={backbone}", *task_args, "--data.batch_size=4", "--data.eval_batch_size=4",
              "--trainer.enable_progress_bar=false", "--seed_everything=0"]
    two = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]

    ckpt, two_metrics = fit_on_two(common, two, files, tmp_path)
    # the checkpoint written by 2 processes loads in one; one process gets the same numbers
    one = run(["validate", *common, f"--ckpt_path={ckpt}", f"--data.val_file={files['val']}",
               f"--trainer.default_root_dir={tmp_path}/one"]).trainer.callback_metrics
    assert two_metrics.keys() == {k for k in one if k.startswith("val/")}
    for name, value in two_metrics.items():
        assert value == pytest.approx(float(one[name]), abs=1e-6), name
    print(task, {name: round(value, 6) for name, value in two_metrics.items()})



def test_a_signal_to_one_process_stops_all_at_the_same_step_and_resumes(tiny_bert, tmp_path):
    """SLURM or torchrun may signal one process before the others: all must save at the same step
    (a checkpoint is a collective; a lone one would hang the run)."""
    files = data_for("classification", tmp_path)
    common = [f"--model.backbone={tiny_bert}", "--model.task=TextClassification", f"--data.train_file={files['train']}",
              "--data.batch_size=4", "--trainer.max_epochs=2", "--trainer.accelerator=cpu", "--trainer.devices=2",
              "--trainer.strategy=ddp", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks+=ModelCheckpoint",
              f"--trainer.callbacks.dirpath={tmp_path}/checkpoints", "--trainer.callbacks.save_last=true"]
    output = finetune("fit", *common, "--trainer.callbacks+=interrupt.SignalAtStep", "--trainer.callbacks.step=3",
                      "--trainer.callbacks.signal_name=SIGTERM", "--trainer.callbacks.rank=1", cwd=tmp_path)
    assert "Stopped by a signal to another process after step 3" in output
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    finetune("fit", *common, f"--ckpt_path={last}", cwd=tmp_path)
    assert torch.load(last, weights_only=True)["global_step"] == 16  # 2 epochs of 64 rows, 4 per step, 2 processes


@pytest.mark.parametrize("skip", [True, False])
def test_a_nonfinite_loss_in_one_process_is_decided_in_all(tiny_bert, toy_files, tmp_path, skip):
    """Skipping (or stopping on) a NaN loss seen by one process only: all processes take the same decision,
    where a lone skip would leave the others waiting in the gradient all-reduce."""
    env = processes_env(str(Path(__file__).parent))
    args = ["fit", f"--model.backbone={tiny_bert}", '--model.task={"class_path": "nan_on_one_rank.NanOnOneRank"}',
            f"--data.train_file={toy_files['train']}", "--data.batch_size=16", "--trainer.max_epochs=1",
            "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp",
            f"--model.skip_nonfinite_batches={str(skip).lower()}", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false", "--trainer.logger=false"]
    result = subprocess.run([sys.executable, "-m", "finetune", *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=240)  # (a hang fails, not blocks)
    if skip:
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        assert result.returncode == 1, result.stderr[-3000:]
        assert "the training loss is" in result.stderr and "at step 0" in result.stderr


def test_a_step_loss_is_the_mean_over_all_its_target_tokens_however_the_work_is_split(tiny_gpt2, tmp_path):
    """Token-level loss: one optimizer step over 16 examples whose targets run from 1 to 16 words gives the same
    gradients (SGD with lr 1: the weight change is the gradient) and the same logged loss as one batch of 16,
    as 4 accumulated micro-batches of 4 (length-grouped, so of very different token counts), and as 2 processes
    x 8. A mean of per-batch means would weight the tokens of short batches more."""
    import random

    rng = random.Random(3)
    words = [w for r in reversal_rows(40) for w in r["source"].split()]
    rows = [{"source": " ".join(rng.sample(words, 3)), "target": " ".join(rng.choices(words, k=n))}
            for n in range(1, 17)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    splits = {"one batch": ["--data.batch_size=16"],
              "accumulated": ["--data.batch_size=4", "--trainer.accumulate_grad_batches=4"],
              "two processes": ["--data.batch_size=8", "--trainer.devices=2", "--trainer.strategy=ddp"]}
    weights, losses = {}, {}
    for name, split in splits.items():
        root = tmp_path / name.replace(" ", "-")
        finetune("fit", f"--model.backbone={tiny_gpt2}", "--model.task=Translation", "--model.lora=null",
                 "--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=1.0", f"--data.train_file={train}",
                 "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
                 "--seed_everything=0", "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={root}",
                 "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={root}", *split, cwd=tmp_path)
        checkpoint = sorted(root.rglob("*.ckpt"))[0]
        weights[name] = torch.load(checkpoint, weights_only=True)["state_dict"]
        (path,) = root.rglob("metrics.csv")
        (losses[name],) = [float(r["train/loss"]) for r in csv.DictReader(path.open()) if r.get("train/loss")]
    reference = weights.pop("one batch")
    for name, state in weights.items():
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6, msg=f"{name}: {key}")
        assert losses[name] == pytest.approx(losses["one batch"], rel=1e-6), name


def test_the_command_ends_its_process_group(tmp_path):
    """Gloo's worker threads alive at interpreter exit abort a process whose run succeeded (exit -6,
    "terminate called without an active exception"); the command joins them before it returns."""
    import torch.distributed as dist

    from finetune.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    main(["tasks"])
    assert not dist.is_initialized()
