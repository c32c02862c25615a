"""The `finetune` command: LightningCLI's fit/validate/test/predict, plus `tasks` and `export`."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import pickle
import re
import sys
import warnings
from typing import Any, NoReturn, Optional

from jsonargparse import CLI, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from finetune.checkpointing import AtomicCheckpointIO, StopOnSignal
from finetune.data import DataModule
from finetune.errors import InputError, NonFiniteLossError, StoppedBySignal
from finetune.export import export
from finetune.module import FineTuneModule
from finetune.predictions import PredictionWriter
from finetune.preflight import check_output_dirs
from finetune.registry import import_registered_tasks, registered_tasks

DESCRIPTION = """Fine-tune Hugging Face models with LoRA.

Also: `finetune tasks` lists the registered tasks; `finetune export --ckpt_path C --output_dir D`
writes a PEFT adapter and a merged model from a checkpoint."""


def init_options(class_path: str) -> list[str]:
    """The constructor options of a class, including those it passes on to its parents (**kwargs)."""
    module, _, name = class_path.rpartition(".")
    options: list[str] = []
    for klass in getattr(importlib.import_module(module), name).__mro__[:-1]:
        names = inspect.signature(klass.__init__).parameters
        options += [n for n in names if n not in ("self", "args", "kwargs") and n not in options]
    return options


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


class FineTuneCLI(LightningCLI):
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self.command_line = [] if isinstance(args, (dict, Namespace)) else list(sys.argv[1:] if args is None else args)
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


def print_tasks() -> None:
    tasks = registered_tasks()
    rows = [("name", "class_path", "package")] + [(t.name, t.class_path, t.package) for t in tasks.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def run(args: Optional[list[str]] = None) -> FineTuneCLI:
    """`finetune fit|validate|test|predict ...` (args default to the command line)."""
    # Configs may name a task by its short class name; that needs the class imported.
    for problem in import_registered_tasks():
        warnings.warn(problem)
    return FineTuneCLI(
        FineTuneModule,
        DataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # model.optimizer / model.scheduler configure them
        trainer_defaults={
            "use_distributed_sampler": False,  # the data module shards batches itself
            "plugins": [AtomicCheckpointIO()],  # a kill while saving keeps the previous checkpoint
        },
        parser_kwargs={"description": DESCRIPTION},
        parser_class=FineTuneParser,
    )


def main(args: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if args is None else args
    try:
        if argv[:1] == ["tasks"]:
            print_tasks()
        elif argv[:1] == ["export"]:
            CLI(export, args=argv[1:], as_positional=False)
        else:
            run(args)
    except InputError as err:  # the message says what to fix; a traceback would only bury it
        print(f"finetune: error: {err}", file=sys.stderr)
        sys.exit(2)
    except StoppedBySignal:  # last.ckpt is saved and the message says how to resume
        sys.exit(0)
    except NonFiniteLossError as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        sys.exit(1)
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused a pickled object
        print(f"finetune: error: refusing to load a checkpoint that holds pickled Python objects, which "
              f"could run code: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
