"""Strategy configs compose with every task config, and FSDP wraps what it should. (FSDP and
DeepSpeed need GPUs to run; DDP runs on CPU processes in test_distributed.py.)"""

import pytest

from conftest import REPO
from finetune.cli import run
from finetune.fsdp import LoraFSDPStrategy, LoraWrapPolicy
from finetune.module import FineTuneModule

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


def test_fsdp_wraps_each_transformer_block_and_each_trainable_layer(tiny_bert):
    module = FineTuneModule(tiny_bert, {"class_path": "tasks.classification.TextClassification",
                                        "init_args": {"labels": ["a", "b"]}})
    module.configure_model()
    policy = LoraFSDPStrategy().kwargs["auto_wrap_policy"]
    assert isinstance(policy, LoraWrapPolicy)
    # FSDP calls the policy on the root module first, then on each submodule
    wrapped = [(name, m) for name, m in module.named_modules() if policy(module=m, recurse=False, nonwrapped_numel=0)
               and name]
    assert sum(type(m).__name__ == "BertLayer" for _, m in wrapped) == 2  # the model's _no_split_modules
    leaves = [(name, m) for name, m in wrapped if not list(m.children())]
    assert leaves and all(m.weight.requires_grad for _, m in leaves)  # trainable layers apart from frozen ones
    assert {name.split(".")[-2] for name, _ in leaves} >= {"lora_A", "lora_B"}
    assert any("classifier" in name for name, _ in leaves)
    assert not any(name.endswith("base_layer") for name, _ in wrapped)  # frozen weights stay in their block


def test_fsdp_on_cpu_processes_is_refused_with_a_message(tiny_bert, toy_files, tmp_path):
    """torch's FSDP refuses CPU processes ("FSDP needs a non-CPU accelerator device"), as a traceback from
    inside FSDP's constructor; the strategy says so first, naming the setting."""
    from finetune.errors import InputError

    with pytest.raises(InputError, match="^trainer.strategy: FSDP shards the model over accelerator devices"):
        run(["fit", "--config", str(REPO / "configs" / "strategies" / "fsdp.yaml"), f"--model.backbone={tiny_bert}",
             "--model.task=TextClassification", f"--data.train_file={toy_files['train']}", "--trainer.accelerator=cpu",
             "--trainer.devices=1", "--trainer.precision=32", f"--trainer.default_root_dir={tmp_path}"])
