"""Interruption, bad numbers, unsafe files, reproducibility."""

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import fit_args, make_rows, save_tiny_bert, write_jsonl
from finetune.checkpointing import AtomicCheckpointIO
from finetune.cli import main, run
from finetune.errors import InputError
from finetune.module import FineTuneModule
from finetune.testing import processes_env

TESTS = Path(__file__).parent


def fit_in_subprocess(backbone: str, files: dict, root: Path, *extra: str) -> subprocess.CompletedProcess:
    args = fit_args(backbone, files, root, "--trainer.max_epochs=3", "--trainer.callbacks+=ModelCheckpoint",
                    f"--trainer.callbacks.dirpath={root}/checkpoints", "--trainer.callbacks.every_n_train_steps=4",
                    "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_top_k=0", *extra)
    env = processes_env(str(TESTS))
    return subprocess.run([sys.executable, "-m", "finetune", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def final_state(root: Path) -> dict:
    return torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    files = {"train": write_jsonl(root / "train.jsonl", make_rows(50, seed=1)),  # 7 batches: epochs end mid-way
             "val": write_jsonl(root / "val.jsonl", make_rows(30, seed=2))}
    result = fit_in_subprocess(tiny_bert, files, root)
    assert result.returncode == 0, result.stderr[-2000:]
    return files, final_state(root), epoch_metrics(root)


def epoch_metrics(root: Path) -> dict[int, dict[str, float]]:
    """The training epochs' metrics (loss and task metrics over the epoch) of the runs under `root`, by epoch."""
    import csv

    found: dict[int, dict[str, float]] = {}
    for path in sorted(root.glob("version_*/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("train/loss_epoch"):
                found[int(row["epoch"])] = {k: float(v) for k, v in row.items() if k.startswith("train/") and v}
    return found


@pytest.mark.slow
@pytest.mark.parametrize("signal_name, step", [("SIGKILL", 10), ("SIGTERM", 9)])
def test_interrupted_run_resumes_to_exactly_the_uninterrupted_result(uninterrupted, tiny_bert, tmp_path,
                                                                       signal_name, step):
    files, expected, expected_metrics = uninterrupted
    killed = fit_in_subprocess(tiny_bert, files, tmp_path, "--trainer.callbacks+=interrupt.SignalAtStep",
                               f"--trainer.callbacks.step={step}", f"--trainer.callbacks.signal_name={signal_name}")
    if signal_name == "SIGKILL":
        assert killed.returncode == -9
        assert final_state(tmp_path)["global_step"] == 8  # the last periodic checkpoint before the kill
    else:  # a clean stop: checkpoint at the step boundary, a message saying how to resume
        assert killed.returncode == 0, killed.stderr[-2000:]
        assert f"Stopped by SIGTERM after step {step}" in killed.stderr + killed.stdout
        assert final_state(tmp_path)["global_step"] == step
    resumed = fit_in_subprocess(tiny_bert, files, tmp_path, f"--ckpt_path={tmp_path}/checkpoints/last.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "not resumable" not in resumed.stderr  # (Lightning's warning: the training loader does resume)
    # the epoch interrupted mid-way reports the metrics of the whole epoch, as the uninterrupted run does
    metrics = epoch_metrics(tmp_path)
    assert metrics.keys() == expected_metrics.keys() == {0, 1, 2}
    for epoch, values in expected_metrics.items():
        assert values.keys() - {"train/loss"} <= metrics[epoch].keys()
        for name in values.keys() - {"train/loss"}:
            assert metrics[epoch][name] == pytest.approx(values[name], rel=1e-6), (epoch, name)
    state = final_state(tmp_path)
    assert state["global_step"] == expected["global_step"] == 20  # the last periodic checkpoint of 21 steps
    for key, value in expected["state_dict"].items():  # same data order, LR schedule and dropout masks
        torch.testing.assert_close(state["state_dict"][key], value, rtol=0, atol=0)


def test_kill_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # stands in for the kill

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1


def test_nonfinite_loss_stops_with_the_step_or_is_skipped(tiny_bert, toy_files, tmp_path, capsys):
    explode = ["--model.optimizer.lr=1e30", "--trainer.max_epochs=1", "--model.scheduler.warmup_ratio=0"]
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tiny_bert, toy_files, tmp_path, *explode))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "finetune: error: the training loss is nan at step" in err and "examples [" in err
    assert "model.skip_nonfinite_batches" in err and "Traceback" not in err

    cli = run(fit_args(tiny_bert, toy_files, tmp_path / "skip", *explode, "--model.skip_nonfinite_batches=true"))
    assert cli.model.skipped_batches > 0
    assert cli.trainer.callback_metrics["train/skipped_batches"] == cli.model.skipped_batches


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_checkpoint_with_a_pickle_payload_is_refused_without_running_it(tiny_bert, toy_files, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"backbone": Payload(str(marker))}}, evil)
    for command in (["validate", f"--model.backbone={tiny_bert}", "--model.task=classification",
                     f"--data.val_file={toy_files['val']}", f"--ckpt_path={evil}"],
                    ["export", f"--ckpt_path={evil}", f"--output_dir={tmp_path / 'out'}"]):
        with pytest.raises(SystemExit) as exit_info:
            main(command)
        assert exit_info.value.code == 2
        assert "refusing to load a checkpoint that holds pickled Python objects" in capsys.readouterr().err
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)


def test_pickle_backbone_weights_need_explicit_permission(tmp_path):
    path = tmp_path / "pickled-bert"
    save_tiny_bert(path)
    from safetensors.torch import load_file

    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")  # the old pickle format
    (path / "model.safetensors").unlink()
    module = FineTuneModule(str(path), "classification")
    module.task = module.task.with_options(labels=["a", "b"])
    with pytest.raises(InputError, match=r"has only pickle-based weights .* model.allow_pickle_weights: true"):
        module.configure_model()
    allowed = FineTuneModule(str(path), "classification", allow_pickle_weights=True)
    allowed.task = allowed.task.with_options(labels=["a", "b"])
    allowed.configure_model()
    assert allowed.model is not None


def test_same_seed_same_data_same_config_gives_identical_results(tiny_bert, toy_files, tmp_path):
    results = []
    for name in ("a", "b"):
        cli = run(fit_args(tiny_bert, toy_files, tmp_path / name, "--trainer.max_epochs=2"))
        results.append((cli.model.trainable_state_dict(), dict(cli.trainer.callback_metrics)))
    (weights_a, metrics_a), (weights_b, metrics_b) = results
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    assert {k: float(v) for k, v in metrics_a.items()} == {k: float(v) for k, v in metrics_b.items()}
