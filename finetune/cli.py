"""The `finetune` command: LightningCLI's fit/validate/test/predict, plus `tasks` and `export`.

Lightning, torch and PEFT take seconds to import, so this module imports them only when a command
needs them: `finetune --help` and `finetune tasks` answer without them.
"""

from __future__ import annotations

import gc
import pickle
import sys
import warnings
from typing import TYPE_CHECKING, Optional

from finetune.errors import InputError, NonFiniteLossError, StoppedBySignal
from finetune.registry import import_registered_tasks, registered_tasks

if TYPE_CHECKING:
    from lightning.pytorch.cli import LightningCLI

DESCRIPTION = """Fine-tune Hugging Face models with LoRA.

Also: `finetune tasks` lists the registered tasks; `finetune export --ckpt_path C --output_dir D`
writes a PEFT adapter and a merged model from a checkpoint; `finetune serve --ckpt_path C` serves it over HTTP;
`finetune evaluate --ckpt_path C --tasks T` runs lm-eval benchmarks on it."""

USAGE = """usage: finetune [-h] {fit,validate,test,predict,tasks,export,serve,evaluate} ...

Fine-tune Hugging Face models with LoRA.

commands:
  fit        train, validating after every epoch when data.val_file is given
  validate   metrics on data.val_file (--ckpt_path CKPT: of a trained model)
  test       metrics on data.test_file
  predict    one JSON line per input of data.predict_file, in input order
  tasks      list the registered tasks and the packages they come from
  export     write a PEFT adapter and a merged model from a checkpoint
             (finetune export --ckpt_path CKPT --output_dir DIR)
  serve      an HTTP server (LitServe): POST /predict, GET /health and, for generation
             tasks, the OpenAI chat API; several LoRA adapters on one base model
             (finetune serve --ckpt_path CKPT [--adapter NAME=CKPT ...]; pip install 'finetune[serve]')
  evaluate   standard benchmarks through lm-eval on a checkpoint (its adapter in memory) or a model
             (finetune evaluate --ckpt_path CKPT --tasks piqa_local --include_path configs/lm_eval
             --data_dir DIR; pip install 'finetune[eval]')

Every option of the model, the data and the Trainer is a flag and a config key; to see them:
  finetune fit --help
  finetune fit --config configs/classification.yaml --print_config"""


def print_tasks() -> None:
    tasks = registered_tasks()
    rows = [("name", "class_path", "package")] + [(t.name, t.class_path, t.package) for t in tasks.values()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def run(args: Optional[list[str]] = None) -> LightningCLI:
    """`finetune fit|validate|test|predict ...` (args default to the command line); returns the FineTuneCLI."""
    from finetune.console import quiet_known_messages

    quiet_known_messages()  # (first: importing the module imports PEFT, which imports bitsandbytes, which logs)

    from finetune.data import DataModule
    from finetune.lightning_cli import FineTuneCLI, FineTuneParser, RunConfig
    from finetune.module import FineTuneModule

    # Configs may name a task by its short class name; that needs the class imported.
    for problem in import_registered_tasks():
        warnings.warn(problem)
    return FineTuneCLI(
        FineTuneModule,
        DataModule,
        args=args,
        save_config_callback=RunConfig,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # model.optimizer / model.scheduler configure them
        trainer_defaults={
            "use_distributed_sampler": False,  # the data module shards batches itself
            # a kill while saving keeps the previous checkpoint (as config, so that config.yaml records it)
            "plugins": [{"class_path": "finetune.checkpointing.AtomicCheckpointIO"}],
        },
        parser_kwargs={"description": DESCRIPTION, "allow_abbrev": False},  # `--trainer.max_epoch` is a typo
        parser_class=FineTuneParser,
    )


def main(args: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if not argv or argv[0] in ("-h", "--help"):  # answered without importing Lightning
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        sys.exit(0 if argv else 2)
    try:
        code = run_command(argv, args)
    finally:
        end_process_group()
    if code:
        sys.exit(code)


def run_command(argv: list[str], args: Optional[list[str]]) -> int:
    """Runs a command; the exit status of one that failed on an error the message explains, 0 otherwise."""
    try:
        if argv[:1] == ["tasks"]:
            print_tasks()
        elif argv[:1] == ["serve"]:
            from finetune.serve import main as serve

            serve(argv[1:])
        elif argv[:1] == ["evaluate"]:
            from finetune.evaluate import main as evaluate

            evaluate(argv[1:])
        elif argv[:1] == ["export"]:
            from jsonargparse import CLI

            from finetune.console import quiet_known_messages
            from finetune.export import export

            quiet_known_messages()
            CLI(export, args=argv[1:], as_positional=False)
        else:
            run(args)
    except InputError as err:  # the message says what to fix; a traceback would only bury it
        print(f"finetune: error: {err}", file=sys.stderr)
        return 2
    except StoppedBySignal:  # last.ckpt is saved and the message says how to resume
        return 0
    except NonFiniteLossError as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        return 1
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused a pickled object
        print(f"finetune: error: refusing to load a checkpoint that holds pickled Python objects, which "
              f"could run code: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    except Exception as err:
        cause = input_error_in(err)
        if cause is None:
            raise
        print(f"finetune: error: {cause}", file=sys.stderr)
        return 2
    return 0


def input_error_in(err: BaseException) -> Optional[InputError]:
    """The InputError behind `err`: jsonargparse re-raises what an option's constructor raised (e.g. a LoRA rank
    of 0) as its own error."""
    seen: set[int] = set()
    found: Optional[BaseException] = err
    while found is not None and id(found) not in seen:
        if isinstance(found, InputError):
            return found
        seen.add(id(found))
        found = found.__cause__ or found.__context__
    return None


def end_process_group() -> None:
    """Ends the process group while the interpreter is whole. Gloo's worker threads still alive at interpreter
    exit abort the process ("terminate called without an active exception", exit -6) after a run that
    succeeded, or deadlock it (the DDP wrapper, kept by the traceback of an error the command reported, freed
    at exit with the interpreter lock held while a worker waits for it); Lightning destroys the group at exit
    for NCCL only."""
    distributed = sys.modules.get("torch.distributed")  # not imported: no group (and `--help` stays light)
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        gc.collect()  # the reported error's frames, and the DDP wrapper (its reducer holds the group) with them
        distributed.destroy_process_group()


if __name__ == "__main__":
    main()
