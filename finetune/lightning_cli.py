"""LightningCLI as `finetune` uses it: a parser whose unknown-option errors list the valid options,
and a CLI that adds the prediction writer and the signal handler and lets command-line values win
over a checkpoint's. (Its own module: importing Lightning takes seconds, `finetune --help` needs none.)"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
import re
import sys
from typing import Any, NoReturn, Optional

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.callbacks import ProgressBar as LightningProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from finetune.checkpointing import StopOnSignal, check_checkpoint, read_checkpoint
from finetune.console import LoggingInterval, ProgressBar, Summary
from finetune.errors import InputError
from finetune.pipeline import connect
from finetune.predictions import PredictionWriter
from finetune.preflight import check_monitors, check_output_dirs, run_inputs, without_validation
from finetune.runs import DiscardFailedRun, default_loggers, resolve_last, tensorboard_installed


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


def config_files(args: list[str]) -> list[str]:
    """The `--config` files of a command line."""
    files = [value for flag, value in zip(args, args[1:]) if flag in ("-c", "--config")]
    return files + [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]


def check_config_files(args: list[str]) -> None:
    """A config file that is not valid YAML, named (jsonargparse's message does not say which file)."""
    for path in config_files(args):
        if not os.path.isfile(path):
            continue  # jsonargparse says it does not exist
        try:
            with open(path, encoding="utf-8") as f:
                yaml.safe_load(f)
        except yaml.YAMLError as err:
            detail = " ".join(str(err).split())
            raise InputError(f"--config {path}: not valid YAML: {detail}") from err


#: The commands of `finetune` that finetune/cli.py runs without LightningCLI.
OTHER_COMMANDS = ("tasks", "export", "serve")


class FineTuneParser(LightningArgumentParser):
    """LightningCLI's parser, whose errors say what is wrong in one line, last: an unknown option of a class also
    lists the valid ones, and jsonargparse's dump of the union it tried is left out."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        # (a key unknown to a subcommand's config is found by the main parser; jsonargparse names the
        # subcommand's parser on the exception)
        hint = unknown_option_hint(message) or unknown_key_hint(message, getattr(ex, "subcommand_parser", self))
        super().error(hint if hint and self.exit_on_error else message, ex)

    def print_usage(self, file: Any = None) -> None:
        """The first line of the usage (what an error prints before its message): the full usage of a
        subcommand is ~70 lines of options that bury the error; `--help` lists them. The commands `finetune` runs
        without LightningCLI are listed beside its own."""
        lines = self.format_usage().splitlines()
        first = lines[0].replace("predict}", "predict," + ",".join(OTHER_COMMANDS) + "}")
        (file or sys.stdout).write(first + (" ..." if len(lines) > 1 else "") + "\n")


def unknown_key_hint(message: str, parser: LightningArgumentParser) -> Optional[str]:
    """'trainr.max_epochs: unknown key. Did you mean 'trainer.max_epochs'?' for a key no section has, given in a
    config file ("does not accept option") or on the command line ("unrecognized arguments")."""
    found = (re.search(r"does not accept option '([\w.]+)'", message)
             or re.search(r"unrecognized arguments: --([\w.]+)", message))
    if not found:
        return None
    key = found.group(1)
    keys = list(parser.get_defaults().keys())
    sections = sorted({k.split(".")[0] for k in keys})
    close = difflib.get_close_matches(key, keys, n=1) or difflib.get_close_matches(key.split(".")[0], sections, n=1)
    if not close:
        return f"{key}: unknown key; the sections are {', '.join(sections)}"
    return f"{key}: unknown key. Did you mean {close[0]!r}?"


def unknown_option_hint(message: str) -> Optional[str]:
    """One line for jsonargparse's message about the value of a key (a dump of the union types it tried, ending in
    `NestedArg(...)`): 'model.task: unknown option 'x'. Did you mean 'y'? Valid: ...' for an option its class does
    not accept, 'model.lora: option 'r' expects int, got 'eight'' for a value of the wrong type, the import error
    of a class_path that does not load. jsonargparse has no structured form of these errors, so its wording is
    read here, and only here; tests/test_bad_input.py fails when that wording changes."""
    def type_name(text: str) -> str:  # "<class 'int'>": 'int'; "<class 'NoneType'>": 'None'
        name = re.sub(r"<class '([\w.]+)'>", r"\1", text)
        return "None" if name == "NoneType" else name

    key = re.search(r'Parser key "([\w.]+)":', message)
    if not key:
        return None
    # the class: a class_path given for the key, or the one class of an Optional[SomeDataclass] key
    named = re.search(r"class_path[= ]'([\w.]+)'", message) or re.search(r"Subtypes: \[<class '([\w.]+)'>", message)
    option = re.search(r"Option '(\w+)' is not accepted", message)
    if option and named:
        valid = init_options(named.group(1))
        close = difflib.get_close_matches(option.group(1), valid, n=1)
        did_you_mean = f" Did you mean {close[0]!r}?" if close else ""
        return f"{key.group(1)}: unknown option {option.group(1)!r}.{did_you_mean} Valid: {', '.join(valid)}"
    wrong_type = re.search(r"Expected an? (.+?)\. Got value: (.*)", message)
    if wrong_type:
        expected, value = type_name(wrong_type.group(1)), wrong_type.group(2).strip()
        inner = re.findall(r'Parser key "([\w.]+)":', message)[1:]  # an option of the key's class
        subject = f"option {inner[0]!r} expects" if inner else "expects"
        return f"{key.group(1)}: {subject} {expected}, got {value!r}"
    class_problem = re.search(r"Problem with given class_path '([\w.]+)':\s*(.+)", message)
    if class_problem:
        return f"{key.group(1)}: cannot use class_path {class_problem.group(1)!r}: {class_problem.group(2).strip()}"
    subtypes = re.search(r"Subtypes: \[(.*)\]", message)
    given = re.search(r"Given value: (.*)", message)
    if subtypes and given:  # a plain union (Optional[int], ...)
        expected = " or ".join(type_name(t) for t in subtypes.group(1).split(", "))
        return f"{key.group(1)}: expects {expected}, got {given.group(1).strip()!r}"
    return None


class RunConfig(SaveConfigCallback):
    """LightningCLI's `config.yaml`, saved in the run's directory; a run without a logger has no directory
    (and writes no `config.yaml` into the current one)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


def checkpoint_path(args: list[str]) -> Optional[str]:
    """The `--ckpt_path` of a command line."""
    found = [value for flag, value in zip(args, args[1:]) if flag == "--ckpt_path"]
    found += [arg.split("=", 1)[1] for arg in args if arg.startswith("--ckpt_path=")]
    return found[-1] if found else None


def command_line_of(args: Any) -> list[str]:
    """The command line as LightningCLI reads it: `args`, else sys.argv."""
    return [] if isinstance(args, (dict, Namespace)) else list(sys.argv[1:] if args is None else args)


#: What the weights of a checkpoint were trained with: `--ckpt_path` runs take it from the checkpoint.
WEIGHT_SHAPING = ("model.backbone", "model.lora", "model.task.class_path", "model.task.init_args.labels")


class FineTuneCLI(LightningCLI):
    def __init__(self, *arguments: Any, args: Any = None, **kwargs: Any) -> None:
        # The checkpoint of `--ckpt_path`, read and checked before the parsers are built: its model options are their
        # defaults, so that a checkpoint alone rebuilds its model (`predict --ckpt_path C` needs no config).
        self.checkpoint_path = checkpoint_path(command_line_of(args))
        self.checkpoint = read_checkpoint(self.checkpoint_path) if self.checkpoint_path else None
        super().__init__(*arguments, args=args, **kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        command_line = command_line_of(args)
        check_config_files(command_line)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else None
        if config is not None and config.get("ckpt_path") == "last":  # before LightningCLI reads the checkpoint
            config["ckpt_path"] = resolve_last(config["trainer"], subcommand)
        # The `--model.*` values of the command line, kept before the checkpoint's hyperparameters are
        # applied over them.
        keys = [namespace_key(config, name) for name in model_option_names(command_line)] if config else []
        self.typed_model_values = {key: config[key] for key in keys if key and not isinstance(config[key], Namespace)}
        self.checkpoint_given = bool(config and config.get("ckpt_path"))
        if subcommand and config.get("ckpt_path"):  # (read already, unless `last` named it)
            read = self.checkpoint if config["ckpt_path"] == self.checkpoint_path else None
            check_checkpoint(config["ckpt_path"], config.get("model"), read)

    def before_instantiate_classes(self) -> None:
        # LightningCLI has rebuilt the model section from the checkpoint (`--ckpt_path`), over everything
        # given. Values typed on the command line still win (`predict --ckpt_path C
        # --model.task.generation.num_beams 4`); config files do not, so a config's `labels: null` cannot
        # erase the label set a checkpoint learned.
        config = self.config[self.subcommand] if self.subcommand else None
        for key, value in self.typed_model_values.items():
            if config is None or isinstance(config.get(key), Namespace):  # (a value, not a class)
                continue
            if self.checkpoint_given and key.startswith(WEIGHT_SHAPING) and config[key] != value:
                raise InputError(f"--{key.replace('.init_args', '')} {value!r}: the checkpoint's weights were "
                                 f"trained with {config[key]!r}; with --ckpt_path the backbone, the LoRA settings and "
                                 "the label set come from the checkpoint (leave the option out)")
            config[key] = value

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(StopOnSignal, "stop_on_signal")
        hparams = (self.checkpoint or {}).get("hyper_parameters", {})
        defaults = {f"model.{key}": hparams[key] for key in ("backbone", "task") if hparams.get(key) is not None}
        if defaults:
            parser.set_defaults(defaults)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"]
        callbacks = list(trainer.get("callbacks") or [])
        if trainer.get("enable_progress_bar") is not False and not any(
                isinstance(c, LightningProgressBar) for c in callbacks):
            callbacks.append(ProgressBar())
        if trainer.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in callbacks):
            callbacks.append(Summary())
            kwargs["enable_model_summary"] = False  # (Lightning's own would be added otherwise; ours is there)
        callbacks.append(LoggingInterval())
        if trainer.get("logger") in (None, True):  # not set: finetune's run directories
            if self.subcommand == "predict":  # predictions go to predictions.output_file; nothing to log
                kwargs["logger"] = False
            else:
                kwargs["logger"] = default_loggers(trainer.get("default_root_dir") or os.getcwd())
                callbacks.append(DiscardFailedRun(kwargs["logger"][0].log_dir))
        trainer["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    # The task is settled (from the backbone, then the training rows) and handed to the module and the data
    # module before Lightning runs a stage: its hooks then only train, evaluate and predict.
    def before_fit(self) -> None:
        # Fail in seconds, not after an epoch, on a monitored metric some epochs do not report, or on unwritable
        # outputs; then read the data.
        if self.datamodule.has("val"):
            check_monitors(self.trainer, self.model.task)
        else:
            without_validation(self.trainer)
        check_output_dirs(self.trainer)
        connect(self.model, self.datamodule, "fit")

    def before_validate(self) -> None:
        connect(self.model, self.datamodule, "validate")

    def before_test(self) -> None:
        connect(self.model, self.datamodule, "test")

    def before_predict(self) -> None:
        for callback in self.trainer.callbacks:
            if isinstance(callback, PredictionWriter):
                callback.check_output_file(run_inputs(self.config["predict"]))  # before the model and the data load
        connect(self.model, self.datamodule, "predict")

    def after_fit(self) -> None:
        summary = fit_summary(self.trainer, self.config["fit"])  # on every process: `trainer.log_dir` broadcasts
        if self.trainer.is_global_zero:
            print(summary, flush=True)


def shown(path: str) -> str:
    """A path as the user would type it: relative to the current directory when it is inside it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def fit_summary(trainer: Trainer, config: Namespace) -> str:
    """Where the run's results are, and the commands that use them."""
    lines = []
    if trainer.logger is not None:
        curves = (f"curves: tensorboard --logdir {shown(os.path.dirname(trainer.log_dir))}" if tensorboard_installed()
                  else "curves: pip install 'finetune[tensorboard]'")
        lines.append(f"Run: {shown(trainer.log_dir)} (metrics.csv; {curves})")
    checkpoints = trainer.checkpoint_callback
    best = shown(checkpoints.best_model_path) if getattr(checkpoints, "best_model_path", "") else ""
    last = shown(checkpoints.last_model_path) if getattr(checkpoints, "last_model_path", "") else ""
    if best and checkpoints.monitor:
        score = checkpoints.best_model_score
        lines.append(f"Best checkpoint: {best} ({checkpoints.monitor}={float(score):.4f})" if score is not None
                     else f"Best checkpoint: {best}")
    if last:
        lines.append(f"Last checkpoint: {last}")
    chosen = best or last
    if chosen:
        configs = "".join(f" --config {path}" for path in config.get("config") or [])
        data = "" if config["data"].get("predict_file") else " --data.predict_file FILE"
        export_dir = os.path.join(os.path.dirname(os.path.dirname(chosen)), "export")
        lines += ["Next:",
                  f"  finetune predict{configs} --ckpt_path {chosen}{data}",
                  f"  finetune export --ckpt_path {chosen} --output_dir {export_dir}",
                  f"  finetune serve --ckpt_path {chosen}   # http://127.0.0.1:8000 (pip install 'finetune[serve]')"]
    return "\n".join(lines)
