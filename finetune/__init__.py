"""finetune: fine-tune Hugging Face models with LoRA through Lightning, with plugin tasks."""

from finetune.data import DataModule
from finetune.lora import LoraSettings
from finetune.module import FineTuneModule
from finetune.task import Task

__all__ = ["DataModule", "FineTuneModule", "LoraSettings", "Task"]
