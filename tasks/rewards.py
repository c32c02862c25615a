"""Reward functions of the verifiable-rewards task (`tasks/verifiable_rewards.py`), and how a config names them.

A reward function is a Python callable `f(prompts, completions, **columns) -> list[float | None]`: the prompts
(each as its row holds it: a text or a conversation), the generated completions (texts; the built-in functions
also read TRL's form, a list of messages), and every other column
of the rows as a keyword argument (a list aligned with the completions); it returns one reward per completion, or
None where it does not apply (a completion no reward function scores is left out of its group's normalisation).
Extra keyword arguments are ignored by taking `**columns`. A config names one by import path
(`my_package.rewards:correct_units` or `my_package.rewards.correct_units`) or by its name in the
`finetune.rewards` entry-point group, where the built-in ones below are registered.

Built in:
- `final_answer`: 1.0 when the completion's final answer equals the row's `final_answer` as a number (GSM8K's
  `#### N`, else the last `\\boxed{N}`, else the last number of the completion), else 0.0;
- `answer_format`: 1.0 when the completion matches a regular expression (default: it ends with `#### N`);
- `length_penalty`: minus the completion's length in characters over `max_characters` (default 400), at most 1.
"""

import importlib
import re
from importlib.metadata import entry_points
from typing import Any, Callable, Optional

from finetune.errors import InputError

ENTRY_POINT_GROUP = "finetune.rewards"
RewardFunction = Callable[..., list[Optional[float]]]
NUMBER = r"-?[\d,]*\.?\d+"


def reward_function(name: str) -> RewardFunction:
    """The reward function a config names: a registered name, `module:function` or `module.function`."""
    registered = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name in registered:
        return registered[name].load()
    if name in BUILT_IN:
        return BUILT_IN[name]
    module_name, separator, attribute = name.rpartition(":") if ":" in name else name.rpartition(".")
    if not separator:
        names = ", ".join(sorted({*registered, *BUILT_IN}))
        raise InputError(f"reward function {name!r}: not a registered reward function ({names}), nor an import path "
                         "`module:function`")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise InputError(f"reward function {name!r}: cannot be imported ({err})") from err
    if not callable(function):
        raise InputError(f"reward function {name!r}: {type(function).__name__} is not callable")
    return function


def text_of(completion: Any) -> str:
    """A completion's text: as it is, or the content of a conversation's last message (as TRL passes them)."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def number(text: str) -> Optional[float]:
    """A number as written in a completion (`1,234`, `-3.5`, `$12`), or None."""
    try:
        return float(text.replace(",", "").replace("$", "").strip().rstrip("."))
    except ValueError:
        return None


def extracted_answer(completion: str) -> Optional[float]:
    """The completion's final answer: after GSM8K's `####`, else in the last `\\boxed{...}`, else its last number."""
    for pattern in (rf"####\s*\$?({NUMBER})", rf"\\boxed\{{\s*\$?({NUMBER})\s*\}}", rf"({NUMBER})"):
        found = re.findall(pattern, completion)
        if found:
            return number(found[-1])
    return None


def final_answer(prompts: list, completions: list, final_answer: list[Any], **columns: Any) -> list[float]:
    """1.0 where the completion's final answer (`extracted_answer`) equals the row's `final_answer` number."""
    rewards = []
    for completion, expected in zip(completions, final_answer):
        target = number(str(expected))
        if target is None:
            raise ValueError(f"final_answer {expected!r} is not a number")
        found = extracted_answer(text_of(completion))
        rewards.append(1.0 if found is not None and abs(found - target) < 1e-6 else 0.0)
    return rewards


def answer_format(prompts: list, completions: list, pattern: str = rf"####\s*{NUMBER}\s*$",
                  **columns: Any) -> list[float]:
    """1.0 where the completion matches the regular expression `pattern` (searched, multi-line, dot-all)."""
    compiled = re.compile(pattern, re.MULTILINE | re.DOTALL)
    return [1.0 if compiled.search(text_of(completion)) else 0.0 for completion in completions]


def length_penalty(prompts: list, completions: list, max_characters: int = 400, **columns: Any) -> list[float]:
    """-len(completion) / max_characters, at least -1: shorter completions are preferred."""
    return [-min(len(text_of(completion)) / max_characters, 1.0) for completion in completions]


BUILT_IN: dict[str, RewardFunction] = {"final_answer": final_answer, "answer_format": answer_format,
                                       "length_penalty": length_penalty}
