"""The `finetune` command: LightningCLI's fit/validate/test/predict, plus `tasks` and `export`."""

from __future__ import annotations

import pickle
import sys
import warnings
from typing import Optional

from jsonargparse import CLI
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from finetune.checkpointing import AtomicCheckpointIO, StopOnSignal
from finetune.data import DataModule
from finetune.errors import InputError, NonFiniteLossError
from finetune.export import export
from finetune.module import FineTuneModule
from finetune.predictions import PredictionWriter
from finetune.preflight import check_output_dirs
from finetune.registry import import_registered_tasks, registered_tasks

DESCRIPTION = """Fine-tune Hugging Face models with LoRA.

Also: `finetune tasks` lists the registered tasks; `finetune export --ckpt_path C --output_dir D`
writes a PEFT adapter and a merged model from a checkpoint."""


class FineTuneCLI(LightningCLI):
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
    except NonFiniteLossError as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        sys.exit(1)
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused a pickled object
        print(f"finetune: error: refusing to load a checkpoint that holds pickled Python objects, which "
              f"could run code: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
