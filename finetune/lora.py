"""LoRA settings and how they wrap a backbone (PEFT does the work)."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Optional, Union

import torch
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel

from finetune.errors import InputError

#: The first bitsandbytes whose 4-bit and 8-bit layers run (forward and backward) on CPUs as well as CUDA GPUs.
BITSANDBYTES_MINIMUM = "0.49"

# Families PEFT has no default targets for (PEFT 0.21); their attention projections are BART's.
EXTRA_DEFAULT_TARGETS = {
    "marian": ["q_proj", "v_proj"],
    "mbart": ["q_proj", "v_proj"],
    "m2m_100": ["q_proj", "v_proj"],
    "pegasus": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "smollm3": ["q_proj", "v_proj"],
}


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    #: None: PEFT's default for the architecture (bert: query, value; llama: q_proj, v_proj; ...);
    #: "all-linear"; or a list of module name suffixes.
    target_modules: Optional[Union[str, list[str]]] = None
    use_dora: bool = False
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if self.r < 1:
            raise InputError(f"model.lora.r: the LoRA rank must be at least 1, got {self.r} (model.lora: null "
                             "fine-tunes every weight instead)")
        if self.alpha <= 0:
            raise InputError(f"model.lora.alpha: must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"model.lora.dropout: must be in [0, 1), got {self.dropout}")


def apply_lora(model: PreTrainedModel, settings: LoraSettings, modules_to_save: list[str]) -> PeftModel:
    """Wrap `model` with a LoRA adapter; `modules_to_save` are trained in full and saved with it."""
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules or EXTRA_DEFAULT_TARGETS.get(model.config.model_type),
        use_dora=settings.use_dora,
        use_rslora=settings.use_rslora,
        modules_to_save=modules_to_save or None,
    )
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as err:
        if settings.target_modules is None:
            raise InputError(
                f"model.lora.target_modules: PEFT has no default LoRA targets for model type "
                f"{model.config.model_type!r}; set it to 'all-linear' or to a list of module names "
                f"(e.g. ['q_proj', 'v_proj'])"
            ) from err
        raise InputError(f"model.lora.target_modules={settings.target_modules!r}: {err}") from err
    check_rank(wrapped, settings.r)
    return wrapped


def check_rank(model: PeftModel, r: int) -> None:
    """Refuse a rank above the width of a LoRA-wrapped module (min(in_features, out_features)): its update
    cannot have a higher rank, so the extra rows only add trained weights (r=1000 on 384-wide MiniLM: 29% of
    the weights trained, a 110 MB checkpoint)."""
    widths = [(min(module.in_features, module.out_features), name, module) for name, module in model.named_modules()
              if isinstance(module, LoraLayer)]
    if not widths:
        return
    width, name, layer = min(widths, key=lambda item: item[0])
    if r > width:
        raise InputError(f"model.lora.r: {r} is above the width of the LoRA-wrapped module "
                         f"{name.removeprefix('base_model.model.')!r} ({layer.in_features} in, {layer.out_features} "
                         f"out); set it to at most {width} (8-64 is usual)")


def quantized_loading(quantization: Optional[str], lora: Optional[LoraSettings], dtype: torch.dtype,
                      device: torch.device) -> dict[str, Any]:
    """`from_pretrained` arguments that load the frozen backbone quantized (QLoRA) onto `device`, computing in
    `dtype`, or none. bitsandbytes runs 4-bit and 8-bit layers on CUDA GPUs and, from 0.49, on CPUs."""
    if quantization is None:
        return {}
    if lora is None:
        raise InputError("model.quantization needs LoRA (model.lora): quantized weights cannot be trained directly")
    try:
        installed = version("bitsandbytes")
    except PackageNotFoundError:
        raise InputError(f"model.quantization={quantization!r} needs bitsandbytes: pip install "
                         f"'bitsandbytes>={BITSANDBYTES_MINIMUM}'") from None
    if Version(installed) < Version(BITSANDBYTES_MINIMUM):
        raise InputError(f"model.quantization={quantization!r} needs bitsandbytes >= {BITSANDBYTES_MINIMUM} (the "
                         f"first that quantizes on CPUs as well as GPUs); this environment has {installed}: "
                         f"pip install -U 'bitsandbytes>={BITSANDBYTES_MINIMUM}'")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"model.quantization={quantization!r}: bitsandbytes quantizes on CUDA GPUs and CPUs, not "
                         f"on {device.type!r}; remove the setting, or train on a CPU or a CUDA GPU")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    # Quantized weights are placed on this process's device as they load; they cannot be moved later.
    return {"quantization_config": config, "device_map": {"": device}}


def keep_4bit_layers_trainable(model: nn.Module) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weights for its fast CPU inference kernel the first time the
    layer runs in eval mode without gradients (a validation pass), and from then on computes the layer with that
    kernel, which has no backward: the gradients reaching the LoRA weights of earlier layers through it come out
    wrong (measured on a tiny Llama: off by more than their own size). Keep the layout that trains (the layers'
    public switch for that repacking)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # (bitsandbytes.nn.Linear4bit)
            module.support_avx512bf16_for_cpu = False
