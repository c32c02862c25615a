"""`finetune export`: a checkpoint -> a PEFT adapter directory and a merged Hugging Face model."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from finetune.checkpointing import check_checkpoint
from finetune.module import FineTuneModule


def export(ckpt_path: str, output_dir: str, adapter: bool = True, merged: bool = True) -> None:
    """Export a finetune checkpoint.

    Args:
        ckpt_path: checkpoint written by `finetune fit`.
        output_dir: receives `adapter/` (load with `PeftModel.from_pretrained(base_model, dir)`) and
            `merged/` (a standalone model: `AutoModelFor...from_pretrained(dir)`), both as safetensors
            with the tokenizer.
        adapter: write `adapter/` (LoRA checkpoints only).
        merged: write `merged/`.
    """
    check_checkpoint(ckpt_path)
    module = FineTuneModule.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    model, out = module.model, Path(output_dir)
    if adapter and isinstance(model, PeftModel):
        # Name the base model as the user did (a hub name), not where it was found on this machine.
        model.peft_config["default"].base_model_name_or_path = module.backbone
        model.save_pretrained(out / "adapter")
        module.tokenizer.save_pretrained(out / "adapter")
        print(f"Wrote the LoRA adapter to {out / 'adapter'}")
    if merged:
        standalone = model.merge_and_unload() if isinstance(model, PeftModel) else model
        standalone.save_pretrained(out / "merged")
        module.tokenizer.save_pretrained(out / "merged")
        print(f"Wrote the merged model to {out / 'merged'}")
