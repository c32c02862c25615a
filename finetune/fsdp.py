"""FSDP for LoRA fine-tuning: shard the frozen backbone block by block, keep trainable weights apart."""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy
from peft.utils.other import fsdp_auto_wrap_policy
from torch import nn


class LoraFSDPStrategy(FSDPStrategy):
    """Lightning's `FSDPStrategy` with a wrapping policy read from the model, unless
    `auto_wrap_policy` is given: each of the backbone's transformer blocks (the classes its
    `_no_split_modules` names) is one FSDP unit, and each leaf layer with trainable weights (LoRA
    matrices, the head) another, so no unit mixes frozen and trainable parameters (PEFT's policy).
    Keep `state_dict_type: full` (the default) for checkpoints that load in one process."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = fsdp_auto_wrap_policy(self.lightning_module.model)
        return super()._setup_model(model)
