"""The benchmarks' meters as Lightning callbacks, which `finetune_cli.run` names by class path (as a user names a
callback): jsonargparse builds them without arguments, so the meters of this process's run are attached here."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback

ATTACHED: dict[str, Any] = {"step": None, "losses": False, "generation": None}


class StepMeterCallback(Callback):
    """Every training step to the attached StepMeter (and, when asked, the mean loss of the step's items: the
    training step returns the batch's sum, as finetune divides the gradients by the step's items)."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        meter = ATTACHED["step"]
        if meter.pad_id is None:
            meter.pad_id = pl_module.tokenizer.pad_token_id

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: dict, batch_idx: int) -> None:
        ATTACHED["step"].begin_step()
        ATTACHED["step"].record(batch)  # (finetune calls a causal LM's decoder and output layer apart: no model hook)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: dict, batch_idx: int) -> None:
        loss = outputs["loss"].detach() / pl_module.task.loss_weight(batch) if ATTACHED["losses"] else None
        ATTACHED["step"].end_step(loss)


class GenerationMeterCallback(Callback):
    """The attached GenerationMeter over finetune's validation or prediction loop (collation, generation, decoding,
    metrics or writing the predictions; the inputs were tokenized at setup)."""

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        ATTACHED["generation"].start(pl_module.model, pl_module.tokenizer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        ATTACHED["generation"].stop()

    on_predict_start = on_validation_start
    on_predict_end = on_validation_end
