"""Checks of the columns a task declares, before any of its hooks sees the rows: one message naming
the file, the row, the column and what was expected."""

from __future__ import annotations

import difflib
from typing import Any, Callable, Optional

import datasets

from finetune.errors import InputError
from finetune.files import mixed_type_problem, value_kind
from finetune.task import Column, Task, task_option


def declared_columns(task: Task, split: str) -> list[tuple[Column, str]]:
    """(declaration, column name) of the columns `split` must have (`predict`: no targets)."""
    wanted = [column for column in task.columns() if split != "predict" or not column.target]
    return [(column, getattr(task, column.option)) for column in wanted if getattr(task, column.option) is not None]


def conversation_row(task: Task, messages: list[dict[str, str]]) -> Optional[dict[str, Any]]:
    """`Task.chat_row` for a task whose predict rows are one conversation column (the messages as they are) or one
    text column (the last user message); None for a task that reads other columns."""
    columns = declared_columns(task, "predict")
    if len(columns) != 1 or columns[0][0].kind not in ("text", "messages"):
        return None
    ((column, name),) = columns
    if column.kind == "messages":
        return {name: [{"role": m["role"], "content": m["content"]} for m in messages]}
    user = [m["content"] for m in messages if m.get("role") == "user"]
    if not user:
        raise InputError("there is no user message to reply to")
    return {name: {column.field: user[-1]} if column.field else user[-1]}


def text_columns(task: Task) -> list[str]:
    """The columns that hold text (read from CSV as written)."""
    return [name for column, name in declared_columns(task, "train") if column.kind == "text" and not column.field]


def check_columns(task: Task, rows: datasets.Dataset, split: str, where: str) -> None:
    problem = missing_column(task, split, rows.column_names)
    if problem:
        raise InputError(f"{where} {problem}")
    for column, name in declared_columns(task, split):
        problem = column_problem(column, name, column_values(rows, name))
        if problem:
            raise InputError(f"{where}, {problem}")


def missing_column(task: Task, split: str, names: list[str]) -> Optional[str]:
    """"has no column ..." when rows with these column names lack one that `split` needs, else None."""
    for column, name in declared_columns(task, split):
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            return (f"has no column {name!r} ({task_option(column.option)}); its columns are: "
                    f"{', '.join(names) or 'none'}.{hint}")
    return None


def row_number(i: int) -> str:
    return f"row {i + 1}"


def column_problem(column: Column, name: str, values: list, where: Callable[[int], str] = row_number) -> Optional[str]:
    """The first problem of a declared column's values (`where(i)` names the row of `values[i]`): a bad value,
    then values of different types; None when they are good."""
    problem = next((f"{where(i)}: column {name!r} {what}" for i, value in enumerate(values)
                    for what in [value_problem(column, value)] if what), None)
    return problem or mixed_type_problem(name, ((where(i), value) for i, value in enumerate(values)))


def value_problem(column: Column, value: Any) -> Optional[str]:
    """What is wrong with one value of a declared column, or None."""
    if column.field is not None:
        if not isinstance(value, dict):
            return f"must hold objects with the key {column.field!r}, got {value_kind(value) or 'null'}: {value!r:.60}"
        if column.field not in value:
            return f"has no key {column.field!r} (it has {', '.join(map(repr, value)) or 'none'})"
        value = value[column.field]
    if value is None:
        return "is missing or null"
    if column.kind == "text":
        if not isinstance(value, str):
            return f"must hold text, got {value_kind(value)}: {value!r:.60}"
        if not value.strip():
            return "is empty" if not value else f"holds only whitespace ({value!r:.40})"
    elif column.kind == "words":
        if not isinstance(value, list):
            return f"must hold a list of words, got {value_kind(value)}: {value!r:.60}"
        if not value:
            return "is an empty list of words"
        bad = next((i for i, word in enumerate(value) if not isinstance(word, str) or not word.strip()), None)
        if bad is not None:
            return f"word {bad} is not a word: {value[bad]!r:.40}"
    elif column.kind == "record" and not isinstance(value, dict):
        return f"must hold an object {{...}}, got {value_kind(value)}: {value!r:.60}"
    elif column.kind == "messages":
        if not isinstance(value, (list, str)) or not (value if isinstance(value, list) else value.strip()):
            return (f"must hold a conversation: a non-empty list of messages {{\"role\": ..., \"content\": ...}}, "
                    f"got {value_kind(value) if value else 'an empty one'}: {value!r:.60}")
    return None


def column_values(rows: datasets.Dataset, column: str) -> list:
    if isinstance(rows.features[column], (datasets.Value, datasets.List)):
        return rows.select_columns([column]).with_format("arrow")[:].column(column).to_pylist()  # fast
    return list(rows[column])  # features that decode (e.g. mixed-type columns read as JSON)
