"""LightningCLI as `finetune` uses it: a parser whose unknown-option errors list the valid options,
and a CLI that adds the prediction writer and the signal handler and lets command-line values win
over a checkpoint's. (Its own module: importing Lightning takes seconds, `finetune --help` needs none.)"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
import sys
from typing import Any, NoReturn, Optional

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from finetune.checkpointing import StopOnSignal, check_checkpoint
from finetune.predictions import PredictionWriter
from finetune.preflight import check_output_dirs


def init_options(class_path: str) -> list[str]:
    """The options of a class: a dataclass's fields (tasks, LoRA settings), else its constructor's arguments."""
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    return [n for n in inspect.signature(cls).parameters if n not in ("args", "kwargs")]


def model_option_names(args: list[str]) -> list[str]:
    """The names of the `--model.*` options of a command line (`--model.task.n_best=5` -> model.task.n_best)."""
    return [arg[2:].split("=", 1)[0] for arg in args if arg.startswith("--model.")]


def namespace_key(config: Namespace, name: str) -> Optional[str]:
    """The key of option `name` in a parsed config, where a class's options sit under `init_args`."""
    node, path = config, []
    for part in name.split("."):
        if isinstance(node, Namespace) and part not in node and "init_args" in node:
            node, path = node["init_args"], [*path, "init_args"]
        if not isinstance(node, Namespace) or part not in node:
            return None
        node, path = node[part], [*path, part]
    return ".".join(path)



class FineTuneParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors about an unknown option of a class also list the valid ones."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        hint = unknown_option_hint(message)
        super().error(f"{hint}\n{message}" if hint else message, ex)


def unknown_option_hint(message: str) -> Optional[str]:
    """'model.task: unknown option 'x'. Did you mean 'y'? Valid: ...' for jsonargparse's message about an
    option a class does not accept. jsonargparse has no structured form of this error, so its wording
    is read here, and only here; tests/test_bad_input.py fails when that wording changes."""
    key = re.search(r'Parser key "([\w.]+)"', message)
    option = re.search(r"Option '(\w+)' is not accepted", message)
    # the class: a class_path given for the key, or the one class of an Optional[SomeDataclass] key
    named = re.search(r"class_path '([\w.]+)'", message) or re.search(r"Subtypes: \[<class '([\w.]+)'>", message)
    if not (key and option and named):
        return None
    valid = init_options(named.group(1))
    close = difflib.get_close_matches(option.group(1), valid, n=1)
    did_you_mean = f" Did you mean {close[0]!r}?" if close else ""
    return f"{key.group(1)}: unknown option {option.group(1)!r}.{did_you_mean} Valid: {', '.join(valid)}"


class FineTuneCLI(LightningCLI):
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # The `--model.*` values of the command line (as LightningCLI reads it: `args`, else sys.argv),
        # kept before the checkpoint's hyperparameters are applied over them.
        command_line = [] if isinstance(args, (dict, Namespace)) else list(sys.argv[1:] if args is None else args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        keys = [namespace_key(config, name) for name in model_option_names(command_line)] if config else []
        self.typed_model_values = {key: config[key] for key in keys if key and not isinstance(config[key], Namespace)}
        if subcommand and config.get("ckpt_path"):
            check_checkpoint(config["ckpt_path"], config.get("model"))

    def before_instantiate_classes(self) -> None:
        # LightningCLI has rebuilt the model section from the checkpoint (`--ckpt_path`), over everything
        # given. Values typed on the command line still win (`predict --ckpt_path C
        # --model.task.generation.num_beams 4`); config files do not, so a config's `labels: null` cannot
        # erase the label set a checkpoint learned.
        config = self.config[self.subcommand] if self.subcommand else None
        for key, value in self.typed_model_values.items():
            if config is not None and not isinstance(config.get(key), Namespace):  # a value, not a class
                config[key] = value

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(StopOnSignal, "stop_on_signal")

    def before_fit(self) -> None:
        check_output_dirs(self.trainer)  # fail in seconds, not after an epoch, on unwritable outputs
