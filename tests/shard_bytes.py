"""A callback that records how many bytes of the frozen weights each process holds (used by test_fsdp2)."""

import json
from pathlib import Path

from lightning.pytorch import Callback
from torch.distributed.tensor import DTensor


class FrozenBytes(Callback):
    """Writes `<output>-<rank>.json`: the bytes of the frozen weights this process holds (a sharded weight's local
    shard), the bytes of the frozen weights whole, and their dtypes, at the start of training."""

    def __init__(self, output: str) -> None:
        self.output = output

    def on_train_start(self, trainer, pl_module) -> None:
        held = whole = 0
        dtypes = set()
        for p in pl_module.parameters():
            if not p.requires_grad:
                dtypes.add(str(p.dtype).removeprefix("torch."))
                local = p.to_local() if isinstance(p, DTensor) else p
                held += local.numel() * local.element_size()
                whole += p.numel() * p.element_size()
        Path(f"{self.output}-{trainer.global_rank}.json").write_text(json.dumps({"held": held, "whole": whole,
                                                                                  "dtypes": sorted(dtypes)}))
