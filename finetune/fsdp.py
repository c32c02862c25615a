"""FSDP for LoRA fine-tuning: shard the frozen backbone block by block, keep trainable weights apart."""

from __future__ import annotations

from typing import Any, Callable, Optional

from lightning.pytorch.strategies import FSDPStrategy
from peft.utils.other import fsdp_auto_wrap_policy
from torch import nn
from transformers import PreTrainedModel

from finetune.errors import InputError


class LoraWrapPolicy:
    """FSDP's wrapping policy read from the model it wraps (a callable policy, as FSDP accepts): each of
    the backbone's transformer blocks (the classes its `_no_split_modules` names) is one FSDP unit, and
    each leaf layer with trainable weights (LoRA matrices, the head) another, so no unit mixes frozen and
    trainable parameters (PEFT's policy). FSDP calls it on the root module first."""

    def __init__(self) -> None:
        self.policy: Optional[Callable[..., bool]] = None

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if self.policy is None:
            backbone = next(m for m in module.modules() if isinstance(m, PreTrainedModel))
            self.policy = fsdp_auto_wrap_policy(backbone)
        return self.policy(module=module, recurse=recurse, nonwrapped_numel=nonwrapped_numel)


class LoraFSDPStrategy(FSDPStrategy):
    """Lightning's `FSDPStrategy` with `LoraWrapPolicy` unless `auto_wrap_policy` is given. Keep
    `state_dict_type: full` (the default) for checkpoints that load in one process."""

    def __init__(self, *args: Any, auto_wrap_policy: Optional[Any] = None, **kwargs: Any) -> None:
        super().__init__(*args, auto_wrap_policy=auto_wrap_policy or LoraWrapPolicy(), **kwargs)

    def setup_environment(self) -> None:
        if self.root_device.type == "cpu":  # (torch: "FSDP needs a non-CPU accelerator device", as a traceback)
            raise InputError("trainer.strategy: FSDP shards the model over accelerator devices (GPUs) and torch "
                             "refuses CPU processes; on CPUs use DDP (configs/strategies/ddp.yaml)")
        super().setup_environment()
