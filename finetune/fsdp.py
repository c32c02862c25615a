"""FSDP2 for LoRA fine-tuning: torch's `fully_shard` on each of the backbone's blocks, then on the module, over the
processes of Lightning's `ModelParallelStrategy`; checkpoints hold the trained weights whole, in one file."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Optional

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim import Optimizer
from transformers import PreTrainedModel

from finetune.errors import InputError


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (torch's FSDP2) for finetune's module: Lightning's `ModelParallelStrategy`, whose
    device mesh is nodes x processes per node; the module's `configure_model` shards the model over it
    (`shard_module`): each process holds 1/N of every frozen weight of its node's N processes, and each node one
    copy (on one node: fully sharded). Runs on GPUs (NCCL) and on CPU processes (gloo).

    Checkpoints are one file, written by rank 0: the trained weights (LoRA, heads) and their optimizer state,
    gathered whole, in the format of one process, so `predict`, `export` and `--ckpt_path` load them in one process,
    with any strategy, or with this one on any number of processes. `model.quantization` is refused.

    Args:
        process_group_backend: `nccl` on GPUs, `gloo` on CPUs by default.
        timeout: how long a collective waits for the other processes.
    """

    def __init__(self, process_group_backend: Optional[str] = None,
                 timeout: Optional[timedelta] = default_pg_timeout) -> None:
        super().__init__(save_distributed_checkpoint=False, process_group_backend=process_group_backend,
                         timeout=timeout)

    def setup_environment(self) -> None:
        quantization = getattr(self.lightning_module, "quantization", None)
        if quantization:  # (before the processes load anything; torch's message would come from inside fully_shard)
            raise InputError(f"model.quantization={quantization!r} with trainer.strategy FSDP2Strategy: torch's "
                             "fully_shard cannot shard bitsandbytes' packed quantized weights; train QLoRA on one "
                             "device or with DDP (configs/strategies/ddp.yaml), or FSDP2 without model.quantization")
        super().setup_environment()

    # Checkpoints in the format one process writes (the weights by name, the optimizer's state by its own numbering),
    # the sharded tensors gathered whole: they load in one process, with DDP, or here on any number of processes.
    def lightning_module_state_dict(self) -> dict[str, Any]:
        # Only what is trained (checkpoints hold nothing else): the frozen backbone is never gathered.
        return {name: whole(p) for name, p in self.lightning_module.named_parameters() if p.requires_grad}

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        state = optimizer.state_dict()
        return {**state, "state": {i: {k: whole(v) for k, v in s.items()} for i, s in state["state"].items()}}

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        return self.checkpoint_io.load_checkpoint(checkpoint_path, weights_only=weights_only)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        # (the module's `on_load_checkpoint` has checked that the checkpoint holds its trained weights)
        parameters = dict(self.lightning_module.named_parameters())
        with torch.no_grad():
            for name, value in checkpoint["state_dict"].items():
                parameters[name].copy_(sharded_like(value, parameters[name]))

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            parameters = dict(zip([i for group in state["param_groups"] for i in group["params"]],
                                  [p for group in optimizer.param_groups for p in group["params"]]))
            optimizer.load_state_dict({**state, "state": {i: {k: sharded_like(v, parameters[i]) for k, v in s.items()}
                                                          for i, s in state["state"].items()}})


def whole(value: Any) -> Any:
    """A sharded tensor gathered whole (a collective: every process calls it), on the CPU; anything else as it is."""
    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


def sharded_like(value: Any, parameter: torch.Tensor) -> Any:
    """A whole tensor of `parameter`'s shape (a weight, an optimizer state) as this process's shard of it, when the
    parameter is sharded; anything else as it is."""
    if isinstance(parameter, DTensor) and isinstance(value, torch.Tensor) and value.shape == parameter.shape:
        return distribute_tensor(value.to(parameter.device, parameter.dtype), parameter.device_mesh,
                                 parameter.placements)
    return value


def shard_module(module: LightningModule, mesh: DeviceMesh) -> None:
    """Shards finetune's module over `mesh`, bottom up, in the units of PEFT's FSDP policy: with LoRA, each layer
    with trained weights (a LoRA matrix, a head) is a unit of its own, so that every unit holds weights of one dtype
    (frozen bf16 and trained fp32 ones apart, as FSDP2 requires) and one kind; each transformer block of the model
    (and of its reference copy, if it keeps one) is one, all-gathered for its forward and backward and freed after;
    the module itself is the root unit, holding every other weight (embeddings, final norm), all-gathered for a whole
    step: the core calls parts of the model directly (the decoder, then the output layer on chunks of target
    tokens; generation), so the step is the forward FSDP sees."""
    for model in (module.model, module.reference_model):
        if model is None:
            continue
        backbone = next(m for m in model.modules() if isinstance(m, PreTrainedModel))
        is_unit = fsdp_auto_wrap_policy(backbone)  # (an FSDP1 policy: called with recurse=False, it says "a unit")
        # Trained layers apart only beside frozen ones (LoRA): when every weight trains, all are fp32, and a layer
        # of its own would split tied weights (T5's shared embeddings) over two units, which FSDP2 refuses.
        lora = any(not p.requires_grad for p in model.parameters())
        units = [m for m in model.modules() if m is not model and (lora or list(m.children()))
                 and is_unit(module=m, recurse=False, nonwrapped_numel=0)]
        for unit in reversed(units):  # (children before their parents)
            fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)
    for step in ("training_step", "validation_step", "test_step", "predict_step"):
        register_fsdp_forward_method(module, step)
