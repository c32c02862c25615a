"""TRL's `SFTTrainer` (through the Trainer runner, its base class): in the precision the settings say (`bf16`;
SFTConfig's default is on) and without gradient checkpointing (SFTConfig's default is on), plain, packed (TRL's
"bfd" strategy: the whole data set in rows of max_length, trained padding-free) or padding-free without packing
(all examples of a batch in one row)."""

from __future__ import annotations

from typing import Any

from benchmarks.meter import StepMeter
from benchmarks.systems import hf_trainer

VARIANTS = ("plain", "packed", "padding_free")


def sft(model: Any, data: Any, tokenizer: Any, settings: dict[str, Any], max_length: int, variant: str,
        meter: StepMeter) -> Any:
    """SFT on pre-tokenized rows (`input_ids` and `labels`, which TRL keeps as they are); returns the config."""
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(**{"bf16": False, **settings}, gradient_checkpointing=False, packing=variant == "packed",
                       padding_free=variant == "padding_free",
                       # (padding-free without packing refuses a max_length: the rows are truncated already)
                       max_length=None if variant == "padding_free" else max_length)
    hf_trainer.train(model, data, None, config, meter, processing_class=tokenizer, trainer_class=SFTTrainer)
    return config
