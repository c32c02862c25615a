"""FSDP2 (configs/strategies/fsdp.yaml: finetune.fsdp.FSDP2Strategy) on two CPU processes over gloo: the same
training as one process, checkpoints that resume on two processes and on one, exact evaluation and prediction,
the export of one process, and half the frozen weights in each process."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_distributed import TASKS, data_for, finetune, fit_on_two

from conftest import REPO, reversal_rows, write_jsonl
from finetune.cli import run
from finetune.export import export
from finetune.testing import _close as close

pytestmark = pytest.mark.slow

FSDP2 = ["--config", str(REPO / "configs" / "strategies" / "fsdp.yaml"), "--trainer.accelerator=cpu",
         "--trainer.devices=2"]
ONE = ["--trainer.accelerator=cpu", "--trainer.devices=1"]


def step_losses(root: Path) -> dict[int, float]:
    (path,) = root.rglob("metrics.csv")
    return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(path.open()) if r.get("train/loss")}


def gradients(checkpoints: list[Path]) -> list[list[torch.Tensor]]:
    """Each step's gradients, in the optimizer's order, from AdamW's first moments m_t = b1 m_(t-1) + (1 - b1) g_t
    in the checkpoints of consecutive steps (from the first)."""
    grads, previous = [], None
    for path in checkpoints:
        optimizer = torch.load(path, weights_only=True)["optimizer_states"][0]
        beta1 = optimizer["param_groups"][0]["betas"][0]
        ids = [i for group in optimizer["param_groups"] for i in group["params"]]
        moments = [optimizer["state"][i]["exp_avg"] for i in ids]
        grads.append([(m - beta1 * p) / (1 - beta1) if previous else m / (1 - beta1)
                      for m, p in zip(moments, previous or moments)])
        previous = moments
    return grads


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_fsdp2_trains_as_one_process_resumes_on_two_and_on_one_and_exports_the_same(tiny_llama, tmp_path):
    """A decoder LM with LoRA on every linear layer (the core's chunked loss on target tokens): 4 steps of 16 rows
    as one process x 16 and as two FSDP2 processes x 8 give the same losses, gradients and weights; the checkpoint
    of step 2 resumes on two processes and on one to the same step 4, and one process's on two; the exports are
    equal; each process holds half of the frozen weights."""
    train = write_jsonl(tmp_path / "train.jsonl", reversal_rows(32, seed=7))
    common = [f"--model.backbone={tiny_llama}", "--model.task=Translation", "--model.lora.target_modules=all-linear",
              "--model.lora.dropout=0", "--model.optimizer.lr=0.01", f"--data.train_file={train}",
              "--data.group_by_length=false", "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1",
              "--trainer.enable_progress_bar=false", "--seed_everything=0"]

    def fit(name: str, *args: str) -> Path:
        root = tmp_path / name
        finetune("fit", *common, *args, "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={root}",
                 f"--trainer.default_root_dir={root}", "--trainer.callbacks+=ModelCheckpoint",
                 f"--trainer.callbacks.dirpath={root}/ckpt", "--trainer.callbacks.filename={step}",
                 "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1", cwd=tmp_path)
        return root

    one = fit("one", *ONE, "--data.batch_size=16")
    two = fit("two", *FSDP2, "--trainer.precision=32", "--data.batch_size=8",
              "--trainer.callbacks+=shard_bytes.FrozenBytes", f"--trainer.callbacks.output={tmp_path}/bytes")

    # each process holds half of the frozen weights
    for rank in (0, 1):
        held = json.loads(Path(f"{tmp_path}/bytes-{rank}.json").read_text())
        print(f"rank {rank}: frozen weights held {held['held']} of {held['whole']} bytes "
              f"({held['held'] / held['whole']:.3f})")
        assert held["held"] == pytest.approx(held["whole"] / 2, rel=0.05)

    # the same losses, gradients and weights at every step
    losses = {name: step_losses(root) for name, root in (("one", one), ("two", two))}
    assert len(losses["one"]) == 4 and losses["one"].keys() == losses["two"].keys()
    steps = [f"step={s}.ckpt" for s in range(1, 5)]
    grads = {name: gradients([root / "ckpt" / s for s in steps]) for name, root in (("one", one), ("two", two))}
    grad_diff = max(float((a - b).abs().max()) for g1, g2 in zip(grads["one"], grads["two"]) for a, b in zip(g1, g2))
    weights = {name: [torch.load(root / "ckpt" / s, weights_only=True)["state_dict"] for s in steps]
               for name, root in (("one", one), ("two", two))}
    weight_diff = max(max_difference(a, b) for a, b in zip(weights["one"], weights["two"]))
    loss_diff = max(abs(losses["one"][s] - losses["two"][s]) for s in losses["one"])
    print(f"one vs two FSDP2 processes, 4 steps, max abs diff: losses {loss_diff:.2e}, LoRA gradients "
          f"{grad_diff:.2e}, weights {weight_diff:.2e}")
    assert max(float(g.abs().max()) for g in grads["one"][1]) > 1e-3  # (gradients, not zeros)
    assert loss_diff < 1e-5 and grad_diff < 1e-5 and weight_diff < 1e-5

    # step 2's checkpoint resumes on two processes (as the uninterrupted run) and on one (as the one-process run);
    # so does the one-process run's on two FSDP2 processes (the checkpoints have one format)
    middle = two / "ckpt" / "step=2.ckpt"
    resumed_two = fit("resumed-two", *FSDP2, "--trainer.precision=32", "--data.batch_size=8", f"--ckpt_path={middle}")
    resumed_one = fit("resumed-one", *ONE, "--data.batch_size=16", f"--ckpt_path={middle}")
    one_on_two = fit("one-on-two", *FSDP2, "--trainer.precision=32", "--data.batch_size=8",
                     f"--ckpt_path={one / 'ckpt' / 'step=2.ckpt'}")
    for resumed, reference in ((resumed_two, two), (resumed_one, one), (one_on_two, two)):
        assert step_losses(resumed).keys() == {2, 3}  # (logged before the step: global steps 2 and 3 -> 3 and 4)
        assert max(abs(step_losses(resumed)[s] - step_losses(reference)[s]) for s in (2, 3)) < 1e-5
        final = torch.load(resumed / "ckpt" / "step=4.ckpt", weights_only=True)["state_dict"]
        assert max_difference(final, weights[reference.name][-1]) < 1e-5, resumed.name
        print(f"resumed on {resumed.name}: step 4 weights within "
              f"{max_difference(final, weights[reference.name][-1]):.2e} of {reference.name}'s")

    # the exported FSDP2 checkpoint is the one-process export
    for name in ("one", "two"):
        export(str(tmp_path / name / "ckpt" / "step=4.ckpt"), str(tmp_path / f"export-{name}"))
    merged = {name: load_file(tmp_path / f"export-{name}" / "merged" / "model.safetensors") for name in ("one", "two")}
    adapters = {name: load_file(tmp_path / f"export-{name}" / "adapter" / "adapter_model.safetensors")
                for name in ("one", "two")}
    assert max_difference(*merged.values()) < 1e-5 and max_difference(*adapters.values()) < 1e-5
    print(f"exports: merged weights within {max_difference(*merged.values()):.2e}")


PREDICT_COLUMNS = {"classification": ["text"], "translation": ["source"],
                   "question_answering": ["id", "question", "context"]}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_fsdp2_evaluates_and_predicts_exactly(task, request, tmp_path):
    """Every task trains with FSDP2 on two processes (accumulating and clipping gradients), and its validation
    metrics and predictions (generation included: the processes generate in step) are those of one process."""
    fixture, task_args = TASKS[task]
    backbone = request.getfixturevalue(fixture)
    files = data_for(task, tmp_path)
    rows = [json.loads(line) for line in Path(files["val"]).read_text().splitlines()]
    predict = write_jsonl(tmp_path / "predict.jsonl", [{k: r[k] for k in PREDICT_COLUMNS[task]} for r in rows])
    common = [f"--model.backbone={backbone}", *task_args, "--data.batch_size=4", "--data.eval_batch_size=4",
              "--trainer.enable_progress_bar=false", "--seed_everything=0"]
    two = [*FSDP2, "--trainer.precision=32"]
    ckpt, two_metrics = fit_on_two(common, two, files, tmp_path)  # (one file, which one process loads)
    one = run(["validate", *common, *ONE, f"--ckpt_path={ckpt}", f"--data.val_file={files['val']}",
               f"--trainer.default_root_dir={tmp_path}/one"]).trainer.callback_metrics
    assert two_metrics.keys() == {k for k in one if k.startswith("val/")}
    for name, value in two_metrics.items():
        assert math.isclose(value, float(one[name]), abs_tol=1e-6), name

    outputs = {}
    for name, args in (("one", ONE), ("two", two)):
        outputs[name] = tmp_path / f"predictions-{name}.jsonl"
        output = finetune("predict", *common, *args, f"--ckpt_path={ckpt}", f"--data.predict_file={predict}",
                          f"--predictions.output_file={outputs[name]}", "--trainer.logger=false",
                          f"--trainer.default_root_dir={tmp_path}/predict", cwd=tmp_path)
        assert "Warning" not in output, output
    predicted = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in outputs.items()}
    assert len(predicted["two"]) == len(rows)
    assert close(predicted["two"], predicted["one"])  # (probabilities to 1e-5: the batches differ)
    print(task, {name: round(value, 6) for name, value in two_metrics.items()})


# (not bf16-true: under FSDP2 its shards stay fp32, see the closing note of stop 32; its losses matched)
@pytest.mark.parametrize("precision", ["bf16-mixed", "backbone_dtype=bfloat16"])
def test_fsdp2_in_bf16_trains_as_one_process(precision, tiny_llama, tmp_path):
    """bf16 and FSDP2 together (Lightning's precisions; the frozen weights in bf16 beside fp32 LoRA weights, which
    FSDP2 shards in units of their own): the losses of 4 steps on two processes are one process's in the same
    precision (to bf16's rounding: the processes' batches are padded to other lengths), and fall."""
    train = write_jsonl(tmp_path / "train.jsonl", reversal_rows(32, seed=7))
    common = [f"--model.backbone={tiny_llama}", "--model.task=Translation", "--model.lora.target_modules=all-linear",
              "--model.lora.dropout=0", "--model.optimizer.lr=0.01", f"--data.train_file={train}",
              "--data.group_by_length=false", "--trainer.max_epochs=2", "--trainer.log_every_n_steps=1",
              "--trainer.enable_progress_bar=false", "--seed_everything=0",
              f"--model.{precision}" if "=" in precision else f"--trainer.precision={precision}"]
    losses = {}
    bytes_file = ["--trainer.callbacks+=shard_bytes.FrozenBytes", f"--trainer.callbacks.output={tmp_path}/bytes"]
    for name, args in (("one", [*ONE, "--data.batch_size=16"]), ("two", [*FSDP2, "--data.batch_size=8", *bytes_file])):
        root = tmp_path / name
        finetune("fit", *common, *args, "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={root}",
                 f"--trainer.default_root_dir={root}", cwd=tmp_path)
        losses[name] = step_losses(root)
    relative = max(abs(losses["one"][s] - losses["two"][s]) / losses["one"][s] for s in losses["one"])
    print(f"{precision}: losses one process {losses['one']}, two FSDP2 processes {losses['two']}, "
          f"max relative difference {relative:.2e}")
    held = json.loads(Path(f"{tmp_path}/bytes-0.json").read_text())
    assert held["dtypes"] == ["float32" if precision == "bf16-mixed" else "bfloat16"]  # (bf16-mixed: autocast)
    assert held["held"] == pytest.approx(held["whole"] / 2, rel=0.05)
    assert losses["one"].keys() == losses["two"].keys() == {0, 1, 2, 3}
    assert relative < 2e-2
    assert losses["two"][3] < losses["two"][0]
