"""The models the benchmarks share, resolved as `finetune` resolves them offline (so that every system loads the
very weights finetune loads), with LoRA as PEFT adds it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def model_dir(backbone: str) -> str:
    """What `finetune` loads for `--model.backbone=BACKBONE` (offline: the Hub's cached copy, else its packaged one;
    SmolLM2's packaged GGUF is converted once, before any timing)."""
    from finetune.backbone import resolve

    return resolve(backbone)


def with_lora(model: Any, task_type: str, r: int, alpha: int, dropout: float, target_modules: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(task_type=task_type, r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=target_modules)
    return get_peft_model(model, config)


def task_for(task: Any, backbone: str) -> tuple[Any, Any]:
    """(`task` with the options finetune settles from the backbone, the backbone's tokenizer)."""
    from finetune.backbone import load_config_and_tokenizer

    config, tokenizer = load_config_and_tokenizer(backbone)
    return task.with_options(**task.backbone_options(config, tokenizer)), tokenizer


def minilm_seq2seq(out: Path | str, seed: int = 0, cross_attention: bool = True) -> int:
    """The pretrained MiniLM warm-started as a BERT2BERT encoder-decoder, saved with its tokenizer to `out`;
    returns the number of parameters saved. The cross-attention is new: seeded, and saved unless
    `cross_attention` is false (then `finetune` trains it in full, next to the LoRA adapter)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, EncoderDecoderModel

    torch.manual_seed(seed)
    minilm = model_dir(MINILM)
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(minilm, minilm)
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = tokenizer.cls_token_id
        config.eos_token_id = tokenizer.sep_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)  # (it also drops the tied copies of the embeddings)
    tokenizer.save_pretrained(out)
    weights = load_file(str(Path(out) / "model.safetensors"))
    if not cross_attention:
        weights = {k: v for k, v in weights.items() if "crossattention" not in k}
        save_file(weights, str(Path(out) / "model.safetensors"), metadata={"format": "pt"})
    return sum(v.numel() for v in weights.values())
