"""The checks of `/predict` and chat requests, in the HTTP process before a request is queued: the API key, the
body's size and JSON, the core's column checks (finetune/columns.py) and the task's `check_rows`, the adapter and
the decoding options. A refusal names the field; a request that passes becomes the work the model does."""

import hmac
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from finetune.columns import column_problem, declared_columns, missing_column, value_problem
from finetune.errors import InputError
from finetune.files import mixed_type_problem


class Refused(Exception):
    """A request answered with `status` and `message` (naming the field `param`) before it is queued."""

    def __init__(self, status: int, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class PredictWork:
    """A checked /predict body: its rows, each with the adapter that answers it; `is_list`: answer with a list."""

    rows: list[tuple[str, dict]]
    is_list: bool


@dataclass
class ChatWork:
    """A checked chat request: the task's predict row for the conversation and the request's decoding options
    (GenerationSettings fields)."""

    adapter: str
    row: dict
    stream: bool
    generation: dict[str, Any] = field(default_factory=dict)


def authorized(api_key: Optional[str], headers: dict[str, str]) -> bool:
    """Whether lower-cased `headers` carry the key (`Authorization: Bearer KEY` or `X-API-Key: KEY`)."""
    if api_key is None:
        return True
    given = headers.get("x-api-key") or ""
    bearer = headers.get("authorization") or ""
    if bearer.lower().startswith("bearer "):
        given = given or bearer[7:].strip()
    return hmac.compare_digest(given.encode(), api_key.encode())


@dataclass
class RequestChecks:
    """The checks of /predict and chat requests. Every refusal names the field."""

    tasks: dict[str, Any]  # adapter -> Task
    default: str
    max_tokens_limit: int
    max_request_bytes: int
    max_rows: int = 256

    def adapter_of(self, value: Any, field: str, status: int = 422) -> str:
        if value is None or (field == "model" and value == ""):
            return self.default
        if not isinstance(value, str) or value not in self.tasks:
            raise Refused(status, f"{field}: {value!r} is not served here; the adapters are: {', '.join(self.tasks)}",
                          field)
        return value

    @staticmethod
    def parse(body: bytes) -> Any:
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise Refused(400, f"the request body is not valid JSON: {err}") from None

    def predict_work(self, body: bytes) -> PredictWork:
        """A /predict body (a row, or a list of rows) checked as `finetune predict` checks its file."""
        payload = self.parse(body)
        rows = payload if isinstance(payload, list) else [payload]
        if not rows or len(rows) > self.max_rows:
            raise Refused(422, f"body: send a row or a list of 1 to {self.max_rows} rows, got {len(rows)}")
        names = [f"row {number}" if isinstance(payload, list) else "row" for number in range(1, len(rows) + 1)]
        checked = []
        for where, row in zip(names, rows):
            if not isinstance(row, dict):
                raise Refused(422, f"{where}: expected an object of columns {{...}}, got {type(row).__name__}")
            adapter = self.adapter_of(row.get("adapter"), f"{where}: adapter" if isinstance(payload, list)
                                      else "adapter")
            values = {key: value for key, value in row.items() if key != "adapter"}
            problem = missing_column(self.tasks[adapter], "predict", list(values))
            if problem:
                raise Refused(422, f"{where} {problem}")
            surrogate = lone_surrogate(values)
            if surrogate:
                key, *inside = surrogate[0]
                at = f" at {json_path(inside)}" if inside else ""
                raise Refused(422, f"{where}: column {key!r}{at} {surrogate[1]}", key)
            checked.append((adapter, values))
        for adapter in dict.fromkeys(adapter for adapter, _ in checked):
            members = [i for i, (name, _) in enumerate(checked) if name == adapter]
            rows, where = [checked[i][1] for i in members], [names[i] for i in members]
            for column, name in declared_columns(self.tasks[adapter], "predict"):
                problem = column_problem(column, name, [row[name] for row in rows], where.__getitem__)
                if problem:
                    raise Refused(422, problem, name)
            self.task_checks(adapter, rows, where)
        return PredictWork(checked, isinstance(payload, list))

    def task_checks(self, adapter: str, rows: list[dict], names: list[str]) -> None:
        """The task's own checks (`Task.check_rows`) of rows of one adapter (named `names`), as a dataset."""
        import datasets

        from finetune.task import Task

        task = self.tasks[adapter]
        if type(task).check_rows is Task.check_rows:
            return
        try:
            dataset = datasets.Dataset.from_list(rows)
        except Exception:  # (pyarrow: a column's values of different types across rows)
            keys = dict.fromkeys(key for row in rows for key in row)
            problem = next(filter(None, (mixed_type_problem(key, zip(names, (row.get(key) for row in rows)))
                                         for key in keys)), None)
            raise Refused(422, problem or "rows: the values of each column must have one structure in every row "
                                          "(e.g. objects with the same keys)") from None
        try:
            task.check_rows("predict", dataset, "request")
        except InputError as err:
            raise Refused(422, str(err)) from None

    def chat_work(self, body: bytes) -> ChatWork:
        """An OpenAI chat request: the adapter (`model`), the messages, the decoding options."""
        payload = self.parse(body)
        if not isinstance(payload, dict):
            raise Refused(422, f"body: expected an object, got {type(payload).__name__}")
        adapter = self.adapter_of(payload.get("model"), "model", status=404)
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Refused(422, "messages: expected a non-empty list of {\"role\": ..., \"content\": ...}", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise Refused(422, f"messages[{i}]: expected an object with a role and a content", "messages")
            if not isinstance(message.get("content"), str):
                raise Refused(422, f"messages[{i}].content: expected a string, got "
                                   f"{type(message.get('content')).__name__}", "messages")
        surrogate = lone_surrogate(messages)
        if surrogate:
            raise Refused(422, f"messages{json_path(surrogate[0])} {surrogate[1]}", "messages")
        task = self.tasks[adapter]
        try:
            row = task.chat_row(messages)
        except InputError as err:
            raise Refused(422, f"messages: {err}", "messages") from None
        for column, name in declared_columns(task, "predict"):
            problem = value_problem(column, row[name])
            if problem:
                raise Refused(422, f"messages: as the column {name!r}, {problem}", "messages")
        try:
            self.task_checks(adapter, [row], ["messages"])
        except Refused as refused:
            raise Refused(422, f"messages: {refused.message}", "messages") from None
        return ChatWork(adapter, row, payload.get("stream") is True, self.generation(payload))

    def generation(self, payload: dict) -> dict[str, Any]:
        """The request's decoding options as GenerationSettings fields (those it leaves out are the checkpoint's)."""
        generation: dict[str, Any] = {}
        for name in ("max_tokens", "max_completion_tokens"):
            value = payload.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 1 <= value <= self.max_tokens_limit):
                raise Refused(422, f"{name}: must be an integer from 1 to {self.max_tokens_limit}, got {value!r}",
                              name)
        tokens = payload.get("max_completion_tokens") or payload.get("max_tokens")
        if tokens:
            generation["max_new_tokens"] = tokens
        for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
            value = payload.get(name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not low <= value <= high or (name == "top_p" and value == 0)):
                raise Refused(422, f"{name}: must be a number {'from' if name != 'top_p' else 'above'} {low} "
                                   f"to {high}, got {value!r}", name)
        temperature, top_p = payload.get("temperature"), payload.get("top_p")
        if temperature is not None and temperature > 0:
            generation.update(do_sample=True, temperature=temperature)
        elif temperature is not None:
            generation["do_sample"] = False
        if top_p is not None and top_p < 1:
            generation.update(do_sample=True, top_p=top_p)
        if payload.get("n", 1) not in (1, None):
            raise Refused(422, f"n: only one choice per request is generated, got {payload.get('n')!r}", "n")
        if payload.get("stream") not in (None, True, False):
            raise Refused(422, f"stream: must be true or false, got {payload.get('stream')!r}", "stream")
        return generation


def lone_surrogate(value: Any) -> Optional[tuple[list, str]]:
    """(the path to, what is wrong with) the first string in parsed JSON that is not Unicode text: a lone
    surrogate, which JSON's `\\ud800` escapes allow and no text can be encoded with; None when there is none."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return [], (f"is not valid Unicode text: it holds a lone surrogate ({value[err.start]!r} at character "
                        f"{err.start})")
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = lone_surrogate(item)
        if found:
            return [key, *found[0]], found[1]
    return None


def json_path(path: list) -> str:
    """`[0].content` for the path [0, "content"]."""
    return "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in path)
