"""Hugging Face `Trainer` (and TRL's trainers, its subclasses) with PEFT, and `Seq2SeqTrainer.evaluate` with
generation, reporting to the benchmarks' meters."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from transformers import TrainerCallback

from benchmarks.meter import GenerationMeter, StepMeter


class StepMeterCallback(TrainerCallback):
    """Every training step to a StepMeter: the batch from a forward pre-hook on the model (Trainer calls it with
    the batch as keywords), the loss from the logs when they come every step."""

    def __init__(self, meter: StepMeter) -> None:
        self.meter = meter

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        model.register_forward_pre_hook(
            lambda module, inputs, batch: self.meter.record(batch) if module.training else None, with_kwargs=True)

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self.meter.begin_step()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.meter.end_step()

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
        if logs and "loss" in logs and args.logging_steps == 1:  # (each step's loss)
            self.meter.losses.append(logs["loss"])


def settings(work: Path, batch_size: int, steps: int, lr: float, weight_decay: float, seed: int,
             **more: Any) -> dict[str, Any]:
    """TrainingArguments of a LoRA run as the benchmarks compare it: AdamW (Trainer's default), a linear schedule,
    no reporting, data loading in the main process, on the CPU; `more` adds or overrides."""
    return {"output_dir": str(work), "per_device_train_batch_size": batch_size, "max_steps": steps,
            "learning_rate": lr, "weight_decay": weight_decay, "lr_scheduler_type": "linear", "warmup_steps": 0.1,
            "logging_steps": 10, "save_strategy": "no", "report_to": "none", "dataloader_num_workers": 0,
            "seed": seed, "use_cpu": True, **more}


def train(model: Any, data: Any, collator: Any, arguments: Any, meter: StepMeter, processing_class: Any = None,
          trainer_class: Optional[type] = None) -> Any:
    """`trainer_class(...).train()` (Trainer by default; TRL's SFTTrainer, for one) with the meter attached."""
    from transformers import Trainer

    trainer = (trainer_class or Trainer)(model=model, args=arguments, train_dataset=data, data_collator=collator,
                                         processing_class=processing_class, callbacks=[StepMeterCallback(meter)])
    trainer.train()
    return trainer


def evaluate_with_generate(model: Any, tokenizer: Any, data: Any, arguments: Any, compute_metrics: Any,
                           meter: GenerationMeter, **generation: Any) -> dict[str, float]:
    """`Seq2SeqTrainer(predict_with_generate=True).evaluate(**generation)`: loss, generation, decoding, metrics."""
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer

    trainer = Seq2SeqTrainer(model=model, args=arguments, eval_dataset=data, processing_class=tokenizer,
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
                             compute_metrics=compute_metrics)
    meter.start(trainer.model, tokenizer)
    found = trainer.evaluate(**generation)
    meter.stop()
    return found
