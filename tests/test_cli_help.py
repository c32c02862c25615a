"""`finetune --help` and `finetune tasks` answer without importing torch, Lightning or PEFT (which take
seconds): checked by what a fresh interpreter has imported, not by timing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

COMMANDS = ("fit", "validate", "test", "predict", "tasks", "export")
REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "peft", "transformers", "datasets")


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_help_lists_the_commands():
    for flag in ("--help", "-h"):
        result = subprocess.run([sys.executable, "-m", "finetune", flag], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        for command in COMMANDS:
            assert f"  {command} " in result.stdout, (command, result.stdout)
        assert "finetune fit --help" in result.stdout


def test_no_command_prints_the_usage_and_fails():
    result = subprocess.run([sys.executable, "-m", "finetune"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "usage: finetune" in result.stderr and "fit" in result.stderr


def test_help_and_tasks_import_no_heavy_module():
    code = f"""
import json, sys
import finetune.cli
for argv in (["--help"], ["tasks"]):
    try:
        finetune.cli.main(argv)
    except SystemExit as stop:
        assert stop.code == 0, stop.code
print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({list(HEAVY)!r}))))
"""
    result = python(code)
    assert result.returncode == 0, result.stderr
    *printed, imported = result.stdout.strip().splitlines()
    assert json.loads(imported) == [], f"imported by `finetune --help` / `finetune tasks`: {imported}"
    assert any(line.startswith("classification") for line in printed)  # `tasks` still lists the tasks


def test_lazy_package_attributes():
    result = python(
        "import finetune; from finetune import DataModule, FineTuneModule, LoraSettings, Task; "
        "from finetune.cli import run; from finetune.lightning_cli import FineTuneCLI, FineTuneParser; "
        "assert issubclass(FineTuneModule, __import__('lightning').pytorch.LightningModule); "
        "assert FineTuneCLI.__name__ == 'FineTuneCLI' and set(finetune.__all__) <= set(dir(finetune))"
    )
    assert result.returncode == 0, result.stderr


def test_importing_every_task_does_not_import_rouge():
    """Configs may name any task by its class name, so every run imports every task: none may be costly
    to import (ROUGE pulls in nltk, 1.3 s); it is imported when a metric is built."""
    result = python("import sys, tasks.summarization, tasks.translation, tasks.question_answering\n"
                    "print('nltk' in sys.modules, 'rouge_score' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
