"""Learning-rate schedules that need the run's total number of optimizer steps."""

from __future__ import annotations

from typing import Any, Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from finetune.errors import InputError

#: What `model.scheduler` must be: called with the optimizer and the run's total optimizer steps.
SchedulerCallable = Callable[[Optimizer, int], LRScheduler]


class LinearWarmupDecay(LambdaLR):
    """Linear warm-up from 0 to the optimizer's LR over `warmup_ratio` of the run, then linear decay to 0.

    A resumed run continues at its step on the schedule of its own length: resumed with a larger
    `max_steps` or `max_epochs`, the schedule is the one a run of the new length would have had (not the
    checkpoint's, which had decayed to 0 at the old end)."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.1) -> None:
        if not 0 <= warmup_ratio < 1:
            raise InputError(f"model.scheduler.warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.total_steps = max(1, total_steps)
        self.warmup_steps = int(self.total_steps * warmup_ratio)
        super().__init__(optimizer, self.factor)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        total_steps, warmup_steps = self.total_steps, self.warmup_steps
        super().load_state_dict(state_dict)  # the step reached, and the checkpoint's length: keep this run's
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        # The optimizer's LR was restored as the old schedule left it (Lightning restores the optimizer first).
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * self.factor(self.last_epoch)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))
