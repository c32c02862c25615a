"""`finetune export`: a checkpoint -> a PEFT adapter directory, a merged Hugging Face model, and GGUF files."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal, Optional

from finetune.errors import InputError
from finetune.preflight import unwritable


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Before anything loads: `output_dir` is a directory that can be written, and empty unless `overwrite`."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output_dir: {output_dir!r} is a file; expected a directory (new or empty)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"--output_dir: {output_dir!r} is not empty; choose a new directory, or pass "
                         "--overwrite true to replace its adapter/, merged/ and gguf/")
    problem = unwritable(output_dir)
    if problem:
        raise InputError(f"--output_dir: cannot write to {output_dir!r}: {problem}")


GgufFormat = Literal["f32", "f16", "bf16", "q8_0"]
Dtype = Literal["float32", "bfloat16", "float16"]


def export(ckpt_path: str, output_dir: str, adapter: bool = True, merged: bool = True,
           dtype: Optional[Dtype] = None, gguf: Optional[list[GgufFormat]] = None, gguf_adapter: bool = False,
           overwrite: bool = False) -> None:
    """Export a finetune checkpoint.

    Args:
        ckpt_path: checkpoint written by `finetune fit`.
        output_dir: receives `adapter/` (load with `PeftModel.from_pretrained(base_model, dir)`) and
            `merged/` (a standalone model: `AutoModelFor...from_pretrained(dir)`), both as safetensors
            with the tokenizer, and `gguf/` (GGUF files). A new or empty directory, unless `overwrite`.
        adapter: write `adapter/` (LoRA checkpoints only).
        merged: write `merged/`.
        dtype: the merged model's weights' type (None: the backbone's, as its config states it).
        gguf: also write the merged model as GGUF files in these formats (`--gguf [f16,q8_0]`), for llama.cpp and
            Ollama: `gguf/model.<format>.gguf`, with the tokenizer, its special tokens and the chat template
            (causal LMs of the Llama and Gemma 3 families).
        gguf_adapter: also write the LoRA adapter alone in llama.cpp's adapter format, `gguf/adapter.f16.gguf`
            (`llama-cli -m base.gguf --lora adapter.f16.gguf`; plain LoRA without fully trained modules).
        overwrite: write into a directory that is not empty, replacing its `adapter/`, `merged/` and `gguf/`.
    """
    import torch  # (imported here: a bad output_dir is reported before seconds of imports)
    from peft import PeftModel

    from finetune.checkpointing import check_checkpoint, load_module
    from finetune.gguf_export import family, source_gguf, write_gguf, write_lora_adapter

    check_output_dir(output_dir, overwrite)
    check_checkpoint(ckpt_path)
    module = load_module(ckpt_path)
    if module.quantization:  # (the adapter merges into the weights it trained against, dense)
        bits, module = module.quantization, module.dequantized()
        print(f"Dequantized the {bits} backbone into {str(module.compute_dtype).removeprefix('torch.')} to merge into")
    model, out = module.model, Path(output_dir)
    if gguf or gguf_adapter:
        family(model.get_base_model() if isinstance(model, PeftModel) else model)  # before anything is written
        if gguf_adapter and not isinstance(model, PeftModel):
            raise InputError("--gguf_adapter: the checkpoint has no LoRA adapter (it was trained with lora: null)")
        shutil.rmtree(out / "gguf", ignore_errors=True)
        (out / "gguf").mkdir(parents=True)
    if adapter and isinstance(model, PeftModel):
        shutil.rmtree(out / "adapter", ignore_errors=True)
        # Name the base model as the user did (a hub name), not where it was found on this machine.
        model.peft_config["default"].base_model_name_or_path = module.backbone
        # finetune never resizes the vocabulary, so the embeddings are the backbone's: PEFT's "auto" would look
        # the base model up on the Hub to find out (a network request, a warning offline).
        model.save_pretrained(out / "adapter", save_embedding_layers=False)
        module.tokenizer.save_pretrained(out / "adapter")
        print(f"Wrote the LoRA adapter to {out / 'adapter'}")
    if gguf_adapter:
        write_lora_adapter(model, out / "gguf" / "adapter.f16.gguf", "f16")
        print(f"Wrote the LoRA adapter for llama.cpp to {out / 'gguf' / 'adapter.f16.gguf'}")
    if not (merged or gguf):
        return
    standalone = model.merge_and_unload() if isinstance(model, PeftModel) else model
    source = source_gguf(module.backbone)
    for fmt in gguf or ():  # (from the merged weights in float, before they are cast for merged/)
        path = out / "gguf" / f"model.{fmt}.gguf"
        write_gguf(standalone, module.tokenizer, path, fmt, source)
        print(f"Wrote the merged model as GGUF ({fmt}, {path.stat().st_size / 2**20:.1f} MiB) to {path}")
    if merged:
        shutil.rmtree(out / "merged", ignore_errors=True)
        dtype = dtype or str(module.backbone_config.dtype or "float32").removeprefix("torch.")
        standalone.to(getattr(torch, dtype)).save_pretrained(out / "merged")
        module.tokenizer.save_pretrained(out / "merged")
        print(f"Wrote the merged model ({dtype}) to {out / 'merged'}")
