"""The adapters a server hosts: `--ckpt_path` and `--adapter NAME=CKPT` parsed, and each checkpoint's options read
and checked in the main process (the weights load once, in the inference worker: finetune/serve/hosting.py)."""

import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from finetune.errors import InputError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_ADAPTER = "default"


def parse_adapters(ckpt_path: Optional[str], adapter: Optional[list[str]]) -> list[tuple[str, str]]:
    """[(name, checkpoint)]: `--ckpt_path` is the adapter `default`; each `--adapter NAME=CKPT` one more."""
    adapters = [(DEFAULT_ADAPTER, ckpt_path)] if ckpt_path else []
    for spec in adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--adapter: expected NAME=CHECKPOINT (e.g. --adapter sentiment=a.ckpt), got {spec!r}")
        if not NAME.match(name):
            raise InputError(f"--adapter: the name {name!r} must be letters, digits, '_', '-' or '.' (at most 64)")
        if any(name == known for known, _ in adapters):
            raise InputError(f"--adapter: the name {name!r} is given twice")
        adapters.append((name, path))
    if not adapters:
        raise InputError("finetune serve needs --ckpt_path CKPT, or one or more --adapter NAME=CKPT")
    return adapters


def flag_of(name: str) -> str:
    """The command-line option that named an adapter."""
    return "--ckpt_path" if name == DEFAULT_ADAPTER else f"--adapter {name}"


@dataclass
class AdapterInfo:
    """What the main process knows of an adapter: its checkpoint's options."""

    name: str
    ckpt: str
    backbone: str
    lora: Optional[dict]
    task: Any  # Task


def read_adapters(adapters: list[tuple[str, str]]) -> list[AdapterInfo]:
    """Each checkpoint checked (as `finetune predict` checks it) and its options read; they must be LoRA adapters
    of one base model when there are several."""
    import torch

    from finetune.checkpointing import check_checkpoint
    from finetune.registry import build_task

    infos = []
    for name, ckpt in adapters:
        try:
            check_checkpoint(ckpt)
        except InputError as err:
            raise InputError(str(err).replace("--ckpt_path", flag_of(name), 1)) from None
        if not os.path.isfile(ckpt):
            raise InputError(f"{flag_of(name)}: {ckpt!r} does not exist")
        hparams = torch.load(ckpt, map_location="cpu", weights_only=True).get("hyper_parameters", {})
        infos.append(AdapterInfo(name, ckpt, hparams.get("backbone"), hparams.get("lora"), build_task(hparams["task"])))
    first = infos[0]
    for info in infos[1:]:
        flag = flag_of(info.name)
        if info.backbone != first.backbone:
            raise InputError(f"{flag}: {info.ckpt!r} was trained on {info.backbone!r}, {first.name!r} on "
                             f"{first.backbone!r}; adapters served together share one base model")
        for one in (first, info):
            if one.lora is None:
                raise InputError(f"{flag_of(one.name)}: {one.ckpt!r} fine-tuned every weight (model.lora: null), so "
                                 "it is no adapter of the base model; serve it alone")
        if type(info.task) is not type(first.task):
            raise InputError(f"{flag}: {info.ckpt!r} is a {type(info.task).__name__} model, {first.name!r} a "
                             f"{type(first.task).__name__} one; the adapters of one server share a task")
        if head_shape(info.task) != head_shape(first.task):
            raise InputError(f"{flag}: its model differs from {first.name!r}'s ({head_shape(info.task)} vs "
                             f"{head_shape(first.task)}, e.g. another number of labels); serve it on its own port")
    return infos


def head_shape(task: Any) -> dict[str, Any]:
    """The loading options that shape the model (label names do not: each adapter's task names its own)."""
    return {k: v for k, v in task.model_kwargs().items() if k not in ("id2label", "label2id")}
