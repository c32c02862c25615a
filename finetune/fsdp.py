"""FSDP2 for LoRA fine-tuning: torch's `fully_shard` on each of the backbone's blocks, then on the backbone, over
the processes of Lightning's `ModelParallelStrategy`; checkpoints hold the trained weights whole, in one file."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Optional

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from transformers import PreTrainedModel


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (torch's FSDP2) for finetune's module: Lightning's `ModelParallelStrategy`, whose
    device mesh is nodes x processes per node; the module's `configure_model` shards the model over it
    (`shard_models`): each process holds 1/N of every frozen weight of its node's N processes, and each node one
    copy (on one node: fully sharded). Runs on GPUs (NCCL) and on CPU processes (gloo).

    Checkpoints are one file: the trained weights (LoRA, heads) gathered whole on rank 0, and the optimizer state,
    so `predict`, `export` and `--ckpt_path` load them in one process or with any strategy.

    Args:
        process_group_backend: `nccl` on GPUs, `gloo` on CPUs by default.
        timeout: how long a collective waits for the other processes.
    """

    def __init__(self, process_group_backend: Optional[str] = None,
                 timeout: Optional[timedelta] = default_pg_timeout) -> None:
        super().__init__(save_distributed_checkpoint=False, process_group_backend=process_group_backend,
                         timeout=timeout)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        # Only what is trained (checkpoints hold nothing else): gathering the frozen backbone would need it whole
        # in rank 0's memory.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)


def shard_module(module: LightningModule, mesh: DeviceMesh) -> None:
    """Shards finetune's module over `mesh`: each transformer block of its model (and of its reference copy, if it
    keeps one), the classes the backbone's `_no_split_modules` names, is one unit, all-gathered for its forward
    and backward and freed after; the module itself is the root unit, holding every other weight (embeddings,
    final norm, heads), all-gathered for a whole step: the core calls parts of the model directly (the decoder,
    then the output layer on chunks of target tokens; generation), so the step is the forward FSDP sees.
    LoRA weights are sharded with their block and stay trainable."""
    for model in (module.model, module.reference_model):
        if model is None:
            continue
        backbone = next(m for m in model.modules() if isinstance(m, PreTrainedModel))
        blocks = set(backbone._no_split_modules or ())
        for block in [m for m in backbone.modules() if type(m).__name__ in blocks]:
            fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    for step in ("training_step", "validation_step", "test_step", "predict_step"):
        register_fsdp_forward_method(module, step)
