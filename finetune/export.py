"""`finetune export`: a checkpoint -> a PEFT adapter directory and a merged Hugging Face model."""

from __future__ import annotations

import shutil
from pathlib import Path

from finetune.errors import InputError
from finetune.preflight import unwritable


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Before anything loads: `output_dir` is a directory that can be written, and empty unless `overwrite`."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output_dir: {output_dir!r} is a file; expected a directory (new or empty)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--output_dir: {output_dir!r} is not empty; choose a new directory, or pass "
                         "--overwrite true to replace its adapter/ and merged/")
    problem = unwritable(output_dir)
    if problem:
        raise InputError(f"--output_dir: cannot write to {output_dir!r}: {problem}")


def export(ckpt_path: str, output_dir: str, adapter: bool = True, merged: bool = True, overwrite: bool = False) -> None:
    """Export a finetune checkpoint.

    Args:
        ckpt_path: checkpoint written by `finetune fit`.
        output_dir: receives `adapter/` (load with `PeftModel.from_pretrained(base_model, dir)`) and
            `merged/` (a standalone model: `AutoModelFor...from_pretrained(dir)`), both as safetensors
            with the tokenizer. A new or empty directory, unless `overwrite`.
        adapter: write `adapter/` (LoRA checkpoints only).
        merged: write `merged/`.
        overwrite: write into a directory that is not empty, replacing its `adapter/` and `merged/`.
    """
    from peft import PeftModel  # (imported here: a bad output_dir is reported before seconds of imports)

    from finetune.checkpointing import check_checkpoint, load_module

    check_output_dir(output_dir, overwrite)
    check_checkpoint(ckpt_path)
    module = load_module(ckpt_path)
    if module.quantization:  # (the adapter merges into the weights it trained against, dense)
        bits, module = module.quantization, module.dequantized()
        print(f"Dequantized the {bits} backbone into {str(module.compute_dtype).removeprefix('torch.')} to merge into")
    model, out = module.model, Path(output_dir)
    if adapter and isinstance(model, PeftModel):
        shutil.rmtree(out / "adapter", ignore_errors=True)
        # Name the base model as the user did (a hub name), not where it was found on this machine.
        model.peft_config["default"].base_model_name_or_path = module.backbone
        # finetune never resizes the vocabulary, so the embeddings are the backbone's: PEFT's "auto" would look
        # the base model up on the Hub to find out (a network request, a warning offline).
        model.save_pretrained(out / "adapter", save_embedding_layers=False)
        module.tokenizer.save_pretrained(out / "adapter")
        print(f"Wrote the LoRA adapter to {out / 'adapter'}")
    if merged:
        shutil.rmtree(out / "merged", ignore_errors=True)
        standalone = model.merge_and_unload() if isinstance(model, PeftModel) else model
        standalone.save_pretrained(out / "merged")
        module.tokenizer.save_pretrained(out / "merged")
        print(f"Wrote the merged model to {out / 'merged'}")
