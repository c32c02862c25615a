"""Strategy configs compose with every task config. (DeepSpeed needs GPUs to run; DDP runs on CPU processes in
test_distributed.py, FSDP2 in test_fsdp2.py.)"""

import pytest

from conftest import REPO
from finetune.cli import run
from finetune.errors import InputError

STRATEGIES = sorted(p.name for p in (REPO / "configs" / "strategies").glob("*.yaml"))
TASKS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("task", TASKS)
def test_strategy_configs_compose_with_task_configs(task, strategy, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_:
        run(["fit", "--config", f"configs/{task}", "--config", f"configs/strategies/{strategy}", "--print_config"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert "model:" in printed
    # (the config's settings win over the task's: a GPU strategy asks for GPUs; QLoRA runs on any device)
    gpu = "accelerator: gpu" in (REPO / "configs" / "strategies" / strategy).read_text()
    assert ("accelerator: gpu" in printed) == gpu


def test_qlora_with_fsdp2_is_refused_with_a_message(tiny_bert, toy_files, tmp_path):
    """torch's fully_shard cannot shard bitsandbytes' packed 4-bit weights (it fails inside fully_shard, on a
    reshape); the strategy says so before any process loads the model, naming both settings."""
    with pytest.raises(InputError, match=r"^model.quantization='4bit' with trainer.strategy FSDP2Strategy: "):
        run(["fit", "--config", str(REPO / "configs" / "strategies" / "fsdp.yaml"), f"--model.backbone={tiny_bert}",
             "--model.task=TextClassification", "--model.quantization=4bit", f"--data.train_file={toy_files['train']}",
             "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32",
             f"--trainer.default_root_dir={tmp_path}"])
