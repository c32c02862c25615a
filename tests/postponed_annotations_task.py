"""A task module under `from __future__ import annotations`, whose options the CLI cannot type: defining the
task raises (tests/test_conformance.py)."""

from __future__ import annotations

from dataclasses import dataclass

from finetune.task import Task


@dataclass(frozen=True)
class PostponedAnnotations(Task):
    cutoff: int = 1
