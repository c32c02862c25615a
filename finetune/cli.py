"""The `finetune` command: LightningCLI's fit/validate/test/predict, plus `tasks` and `export`.

Lightning, torch and PEFT take seconds to import, so this module imports them only when a command
needs them: `finetune --help` and `finetune tasks` answer without them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import pickle
import re
import sys
import warnings
from typing import TYPE_CHECKING, Any, NoReturn, Optional

from finetune.errors import InputError, NonFiniteLossError, StoppedBySignal
from finetune.registry import import_registered_tasks, registered_tasks

if TYPE_CHECKING:
    from jsonargparse import Namespace
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

DESCRIPTION = """Fine-tune Hugging Face models with LoRA.

Also: `finetune tasks` lists the registered tasks; `finetune export --ckpt_path C --output_dir D`
writes a PEFT adapter and a merged model from a checkpoint."""

USAGE = """usage: finetune [-h] {fit,validate,test,predict,tasks,export} ...

Fine-tune Hugging Face models with LoRA.

commands:
  fit        train, validating after every epoch when data.val_file is given
  validate   metrics on data.val_file (--ckpt_path CKPT: of a trained model)
  test       metrics on data.test_file
  predict    one JSON line per input of data.predict_file, in input order
  tasks      list the registered tasks and the packages they come from
  export     write a PEFT adapter and a merged model from a checkpoint
             (finetune export --ckpt_path CKPT --output_dir DIR)

Every option of the model, the data and the Trainer is a flag and a config key; to see them:
  finetune fit --help
  finetune fit --config configs/classification.yaml --print_config"""


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
    from jsonargparse import Namespace

    node, path = config, []
    for part in name.split("."):
        if isinstance(node, Namespace) and part not in node and "init_args" in node:
            node, path = node["init_args"], [*path, "init_args"]
        if not isinstance(node, Namespace) or part not in node:
            return None
        node, path = node[part], [*path, part]
    return ".".join(path)


def __getattr__(name: str) -> Any:
    # FineTuneCLI and FineTuneParser are Lightning classes: defined on first use, not on import.
    if name in ("FineTuneCLI", "FineTuneParser"):
        return _lightning_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _lightning_classes() -> dict[str, type]:
    from jsonargparse import Namespace
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    from finetune.checkpointing import StopOnSignal
    from finetune.predictions import PredictionWriter
    from finetune.preflight import check_output_dirs

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

    for cls in (FineTuneParser, FineTuneCLI):
        cls.__qualname__ = cls.__name__
    return {"FineTuneParser": FineTuneParser, "FineTuneCLI": FineTuneCLI}


def print_tasks() -> None:
    tasks = registered_tasks()
    rows = [("name", "class_path", "package")] + [(t.name, t.class_path, t.package) for t in tasks.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def run(args: Optional[list[str]] = None) -> LightningCLI:
    """`finetune fit|validate|test|predict ...` (args default to the command line); returns the FineTuneCLI."""
    from finetune.checkpointing import AtomicCheckpointIO
    from finetune.data import DataModule
    from finetune.module import FineTuneModule

    # Configs may name a task by its short class name; that needs the class imported.
    for problem in import_registered_tasks():
        warnings.warn(problem)
    classes = _lightning_classes()
    return classes["FineTuneCLI"](
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
        parser_class=classes["FineTuneParser"],
    )


def main(args: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] in ("-h", "--help"):  # answered without importing Lightning
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    try:
        if argv[:1] == ["tasks"]:
            print_tasks()
        elif argv[:1] == ["export"]:
            from jsonargparse import CLI

            from finetune.export import export

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
