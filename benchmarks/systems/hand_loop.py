"""The floor: a hand-written PyTorch + PEFT training loop, no framework. The batches as given, `model(**batch).loss`
(transformers' own loss), backward, `AdamW.step`, finetune's linear warm-up and decay (the same schedule)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from benchmarks.meter import StepMeter


def train(model: Any, batches: Iterable[dict[str, Any]], steps: int, lr: float, weight_decay: float,
          meter: StepMeter, autocast: Optional[Any] = None) -> None:
    """`steps` optimizer steps, one batch each; the forward under CPU autocast to the dtype `autocast` if given."""
    import contextlib

    import torch

    from finetune.schedule import LinearWarmupDecay

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    schedule = LinearWarmupDecay(optimizer, steps)
    for step, batch in enumerate(batches, start=1):
        meter.begin_step()
        meter.record(batch)
        with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        meter.end_step(loss.detach())
        if step == steps:
            break
