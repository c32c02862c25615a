"""finetune: fine-tune Hugging Face models with LoRA through Lightning, with plugin tasks."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from finetune.data import DataModule
    from finetune.lora import LoraSettings
    from finetune.module import FineTuneModule
    from finetune.task import Column, Task

__all__ = ["Column", "DataModule", "FineTuneModule", "LoraSettings", "Task"]

# Imported on first use (`from finetune import Task` works as ever): `import finetune.cli` for
# `finetune --help` then needs neither torch nor Lightning.
_SUBMODULES = {"Column": "finetune.task", "DataModule": "finetune.data",
               "FineTuneModule": "finetune.module", "LoraSettings": "finetune.lora",
               "Task": "finetune.task"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = getattr(importlib.import_module(_SUBMODULES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
