"""A merged causal LM as a GGUF file that llama.cpp, Ollama and transformers (`gguf_file=`) load.

Written with the `gguf` package: its writer, its map from Hugging Face tensor names to GGUF's, its quantizer
(Q8_0) and its vocabulary classes. Two families: Llama (SmolLM2, Llama 2/3, Mistral-shaped models) and Gemma 3.
Each family's weights are stored as llama.cpp's own converter stores them (Llama: the query and key rows in
GGUF's rotary order; Gemma: RMSNorm weights as `1 + w`), which is what transformers undoes when it loads a GGUF.

The tokenizer goes into the metadata: for a backbone that was a GGUF file, the source's `tokenizer.*` and
`general.*` fields as they were (vocabulary, scores, merges, special tokens); otherwise built from the Hugging Face
tokenizer. The chat template is always the tokenizer's at export time (a template given with `chat.chat_template`
is written into the file).

The LoRA adapter alone can be written too, in llama.cpp's adapter format (`llama-cli -m base.gguf --lora a.gguf`).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import gguf
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFValueType, LlamaFileType, TokenType

from finetune.errors import InputError

FORMATS = {  # --gguf value: (the type of every matrix, the file type the header states)
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
# Fields of a source GGUF that describe the weights' encoding, not the model: written anew.
REWRITTEN = {"general.architecture", "general.file_type", "general.quantization_version", "general.type"}


def rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A query/key projection's rows from Hugging Face's rotary order (halves) to GGUF's (pairs)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def llama_weight(name: str, weight: torch.Tensor, config: Any) -> torch.Tensor:
    if name.endswith("self_attn.q_proj.weight"):
        return rotary_rows(weight, config.num_attention_heads)
    if name.endswith("self_attn.k_proj.weight"):
        return rotary_rows(weight, config.num_key_value_heads)
    return weight


def gemma3_weight(name: str, weight: torch.Tensor, config: Any) -> torch.Tensor:
    return weight + 1 if name.endswith("norm.weight") else weight  # Gemma's RMSNorm scales by 1 + w


def rope_theta(config: Any, layer_type: str) -> float:
    """The rotary base of the given layer type (transformers 5 keeps them in `rope_parameters`); a scaled rotary
    embedding (Llama 3.1's, Gemma 3 4B's) is not written yet, so it is refused."""
    parameters = getattr(config, "rope_parameters", None) or {}
    parameters = parameters.get(layer_type, parameters)
    if parameters.get("rope_type", "default") != "default":
        raise InputError(f"--gguf: the model's rotary embedding is scaled ({parameters}); GGUF export writes "
                         "unscaled ones only")
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def llama_parameters(writer: gguf.GGUFWriter, config: Any) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta(config, "full_attention"))


def gemma3_parameters(writer: gguf.GGUFWriter, config: Any) -> None:
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(rope_theta(config, "full_attention"))
    writer.add_sliding_window(config.sliding_window)


# model_type: (GGUF architecture, the weight as GGUF stores it, the family's own hyperparameters)
Family = tuple[MODEL_ARCH, Callable[[str, torch.Tensor, Any], torch.Tensor], Callable[[gguf.GGUFWriter, Any], None]]
FAMILIES: dict[str, Family] = {
    "llama": (MODEL_ARCH.LLAMA, llama_weight, llama_parameters),
    "gemma3_text": (MODEL_ARCH.GEMMA3, gemma3_weight, gemma3_parameters),
}


def family(model: Any) -> Family:
    """The model's family, or an InputError naming the ones GGUF export writes."""
    config = model.config
    if config.model_type not in FAMILIES or not type(model).__name__.endswith("ForCausalLM"):
        raise InputError(f"--gguf: GGUF export writes causal language models of the {' and '.join(FAMILIES)} "
                         f"families; this checkpoint's model is a {type(model).__name__} ({config.model_type})")
    rope_theta(config, "full_attention")  # (refuses a scaled one)
    return FAMILIES[config.model_type]


def source_gguf(backbone: str) -> Optional[Path]:
    """The GGUF file that `model.backbone` was converted from (a file, a directory holding one, a packaged
    model), or None when it was a Hugging Face model."""
    from finetune.backbone import resolve
    from finetune.gguf import cache_root, file_digest
    from finetune.packaged import packaged_model

    resolved = Path(resolve(backbone))
    if resolved.parent != cache_root() / "gguf":
        return None
    path, packaged = Path(backbone), packaged_model(backbone)
    candidates = [packaged.location() if packaged else None, path, *(sorted(path.glob("*.gguf")) if path.is_dir()
                                                                      else [])]
    return next((c for c in candidates if c is not None and c.is_file() and file_digest(c) == resolved.name), None)


def write_gguf(model: Any, tokenizer: Any, path: Path, fmt: str, source: Optional[Path] = None) -> None:
    """Write the (merged) causal LM `model` with `tokenizer` as the GGUF file `path` in format `fmt`; `source`:
    the GGUF file the backbone was converted from, whose tokenizer and description are carried over."""
    arch, stored, parameters = family(model)
    config = model.config
    matrix_type, file_type = FORMATS[fmt]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    if source is not None:
        copy_fields(gguf.GGUFReader(source), writer, lambda key: key.startswith("general.")
                    and key not in REWRITTEN)
    else:
        writer.add_name(Path(config.name_or_path).name or config.model_type)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    parameters(writer, config)
    write_vocabulary(writer, tokenizer, config, source)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = config.tie_word_embeddings
    for name, weight in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd, as the source model did
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InputError(f"--gguf: the weight {name!r} has no GGUF name in the {arch.name} architecture")
        data = stored(name, weight.detach().float(), config).numpy()
        # Vectors (norms) stay in 32 bits, as llama.cpp keeps them; rows that Q8_0's 32-value blocks do not divide
        # are stored in f16.
        kind = GGMLQuantizationType.F32 if data.ndim == 1 else matrix_type
        if kind == GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
            kind = GGMLQuantizationType.F16
        writer.add_tensor(gguf_name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def copy_fields(reader: gguf.GGUFReader, writer: gguf.GGUFWriter, wanted: Callable[[str], bool]) -> None:
    """Copy the metadata fields whose keys are `wanted` from a GGUF file, with their types."""
    for key, field in reader.fields.items():
        if not wanted(key):
            continue
        kind = field.types[0]
        value = field.contents()
        if kind == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, kind)


def write_vocabulary(writer: gguf.GGUFWriter, tokenizer: Any, config: Any, source: Optional[Path]) -> None:
    """The tokenizer as GGUF metadata: the source file's fields, or built from the Hugging Face tokenizer."""
    if source is not None:
        copy_fields(gguf.GGUFReader(source), writer, lambda key: key.startswith("tokenizer.")
                    and key != "tokenizer.chat_template")
    else:
        with tempfile.TemporaryDirectory() as directory:
            tokenizer.save_pretrained(directory)
            if config.model_type == "gemma3_text":
                sentencepiece_vocabulary(writer, tokenizer)
            else:
                byte_level_vocabulary(writer, tokenizer, Path(directory))
            # Special token ids, add_bos/add_eos and the merges, read from the saved files.
            special = gguf.SpecialVocab(directory, load_merges=config.model_type != "gemma3_text",
                                        n_vocab=len(tokenizer))
            special.chat_template = None  # written below, in every case
            special.add_to_gguf(writer, quiet=True)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def token_types(tokenizer: Any) -> list[TokenType]:
    """llama.cpp's type of every token: special added tokens are control tokens, other added ones user-defined,
    `<0xAB>` byte-fallback tokens bytes."""
    types = []
    added = tokenizer.added_tokens_decoder
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(range(len(tokenizer)))):
        if token_id in added:
            types.append(TokenType.CONTROL if added[token_id].special else TokenType.USER_DEFINED)
        elif token_id == tokenizer.unk_token_id:
            types.append(TokenType.UNKNOWN)
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    return types


def sentencepiece_vocabulary(writer: gguf.GGUFWriter, tokenizer: Any) -> None:
    """Gemma's vocabulary as llama.cpp's sentencepiece model ("llama"): tokens spelled with "▁" for spaces,
    scored by rank (earlier merges first, as Gemma's vocabulary is ordered)."""
    tokens = tokenizer.convert_ids_to_tokens(range(len(tokenizer)))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_add_space_prefix(False)  # Gemma's tokenizer turns spaces into "▁" and adds none in front
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(token_id) for token_id in range(len(tokens))])
    writer.add_token_types(token_types(tokenizer))


# A byte-level BPE's pre-tokenizer (tokenizer.json) -> llama.cpp's name for it.
PRE_TOKENIZERS = {
    json.dumps({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}): "gpt-2",
    json.dumps({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}): "smollm",
}


def byte_level_vocabulary(writer: gguf.GGUFWriter, tokenizer: Any, directory: Path) -> None:
    """A byte-level BPE vocabulary (SmolLM2, GPT-2 style) as llama.cpp's "gpt2" model, through gguf's BpeVocab."""
    saved = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    pre = PRE_TOKENIZERS.get(json.dumps(saved.get("pre_tokenizer")))
    if pre is None:
        raise InputError(f"--gguf: the tokenizer of {tokenizer.name_or_path!r} splits text in a way GGUF export "
                         f"does not know a llama.cpp name for ({saved.get('pre_tokenizer')})")
    try:
        vocabulary = gguf.vocab.BpeVocab(directory)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(f"--gguf: the tokenizer of {tokenizer.name_or_path!r} is not a byte-level BPE "
                         f"({err})") from err
    tokens = [token for token, _, _ in vocabulary.all_tokens()]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(token_types(tokenizer))


def write_lora_adapter(peft_model: Any, path: Path, fmt: str) -> None:
    """The LoRA adapter of a PEFT causal LM in llama.cpp's adapter format (`--lora`): per adapted weight, `A`
    (`.lora_a`) and `B` (`.lora_b`, in GGUF's row order), and alpha such that llama.cpp's alpha / r is PEFT's
    scale."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    arch, stored, _ = family(base)
    config = base.config
    settings = peft_model.peft_config["default"]
    if settings.use_dora or settings.modules_to_save:
        raise InputError("--gguf_adapter: llama.cpp's adapters hold LoRA matrices only; this adapter has "
                         f"{'DoRA magnitudes' if settings.use_dora else 'fully trained modules'}: export the "
                         "merged model instead")
    matrix_type = FORMATS["f32" if fmt == "f32" else "f16"][0]  # llama.cpp reads adapters in f32/f16 (Q8_0 too)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    scales = set()
    for module_name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        name = module_name + ".weight"
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise InputError(f"--gguf_adapter: the adapted weight {name!r} has no GGUF name")
        a = module.lora_A["default"].weight.detach().float()
        b = stored(name, module.lora_B["default"].weight.detach().float(), config)  # rows permute like W = B A
        scales.add(module.scaling["default"] * a.shape[0])
        for suffix, matrix in ((".lora_a", a), (".lora_b", b)):
            writer.add_tensor(gguf_name + suffix, gguf.quants.quantize(matrix.numpy(), matrix_type),
                              raw_dtype=matrix_type)
    if len(scales) != 1:
        raise InputError("--gguf_adapter: llama.cpp's adapters have one alpha / r for every layer; this adapter's "
                         "layers differ in scale")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scales.pop())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
