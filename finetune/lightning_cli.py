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

from finetune.checkpointing import StopOnSignal
from finetune.predictions import PredictionWriter
from finetune.preflight import check_output_dirs


def init_options(class_path: str) -> list[str]:
    """The constructor options of a class, including those it passes on to its parents (**kwargs)."""
    module, _, name = class_path.rpartition(".")
    options: list[str] = []
    for klass in getattr(importlib.import_module(module), name).__mro__[:-1]:
        names = inspect.signature(klass.__init__).parameters
        options += [n for n in names if n not in ("self", "args", "kwargs") and n not in options]
    return options


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
    """LightningCLI's parser, whose errors about an unknown option also list the valid ones."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        key = re.search(r'Parser key "([\w.]+)"', message)
        option = re.search(r"Option '(\w+)' is not accepted", message)
        class_path = re.search(r"class_path '([\w.]+)'", message)
        if key and option:
            valid = init_options(class_path.group(1)) if class_path else self._options_under(key.group(1))
            if valid:
                close = difflib.get_close_matches(option.group(1), valid, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                summary = f"{key.group(1)}: unknown option {option.group(1)!r}.{hint} Valid: {', '.join(valid)}"
                message = f"{summary}\n{message}"
        super().error(message, ex)

    def _options_under(self, key: str) -> list[str]:
        for parser in [self, *getattr(getattr(self, "_subcommands_action", None), "_name_parser_map", {}).values()]:
            try:
                value = parser.get_defaults().get(key)
            except Exception:  # not this subcommand's key
                continue
            if dataclasses.is_dataclass(value):
                return [f.name for f in dataclasses.fields(value)]
            if value is not None and hasattr(value, "init_args"):
                return list(vars(value.init_args))
        return []

class FineTuneCLI(LightningCLI):
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        typed = isinstance(args, (dict, Namespace))
        self.command_line = [] if typed else list(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI rebuilds the model section from the checkpoint, over everything given. Values typed
        # on the command line still win (`predict --ckpt_path C --model.task.generation.num_beams 4`); config
        # files do not, so a config's `labels: null` cannot erase the label set a checkpoint learned.
        subcommand = self.config.get("subcommand")
        typed = {}
        if subcommand:
            config = self.config[subcommand]
            keys = [namespace_key(config, name) for name in model_option_names(self.command_line)]
            typed = {key: config[key] for key in keys if key and not isinstance(config[key], Namespace)}
        super()._parse_ckpt_path()
        for key, value in typed.items():
            if not isinstance(self.config[subcommand].get(key), Namespace):  # a value, not a task or class
                self.config[subcommand][key] = value

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(StopOnSignal, "stop_on_signal")

    def before_fit(self) -> None:
        check_output_dirs(self.trainer)  # fail in seconds, not after an epoch, on unwritable outputs
