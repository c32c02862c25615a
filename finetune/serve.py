"""`finetune serve`: a checkpoint (or several LoRA adapters of one base model) behind an HTTP server on LitServe.

Endpoints:
- `POST /predict`: a row (the columns of the task's predict file) or a list of rows -> what `finetune predict`
  writes for them (one object, or a list in input order). A row may name its adapter (`"adapter": NAME`).
- `POST /v1/chat/completions` (generation and chat tasks): the OpenAI chat API; `model` names the adapter.
- `GET /health`.

The task's own hooks serve, as `finetune predict` runs them: the core's column checks, `preprocess`, `collate`
(prompts padded on the left), `predict`, `split_context` and `merge_predictions`; there is no per-task code.
Requests are checked in the HTTP process before they are queued (a bad request gets a 4xx naming the field and
never reaches a batch), then LitServe batches concurrent requests into shared forward passes. Adapters whose
task options are equal share a pass (PEFT's `adapter_names`); others run one pass each.

The main process reads only the checkpoints' options; the weights load in LitServe's inference worker
(one per endpoint: `/predict` and the chat endpoint each hold a copy of the model).
"""

import dataclasses
import hmac
import json
import os
import queue
import re
import string
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

from finetune.errors import InputError, with_article

#: The hosts LitServe can bind (it refuses others).
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_ADAPTER = "default"
#: Rows of one /predict request are run in passes of at most this many features.
PASS_SIZE = 32


# --- the command --------------------------------------------------------------------------------
def parse_adapters(ckpt_path: Optional[str], adapter: Optional[list[str]]) -> list[tuple[str, str]]:
    """[(name, checkpoint)]: `--ckpt_path` is the adapter `default`; each `--adapter NAME=CKPT` one more."""
    adapters = [(DEFAULT_ADAPTER, ckpt_path)] if ckpt_path else []
    for spec in adapter or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--adapter: expected NAME=CHECKPOINT (e.g. --adapter sentiment=a.ckpt), got {spec!r}")
        if not NAME.match(name):
            raise InputError(f"--adapter: the name {name!r} must be letters, digits, '_', '-' or '.' (at most 64)")
        if any(name == known for known, _ in adapters):
            raise InputError(f"--adapter: the name {name!r} is given twice")
        adapters.append((name, path))
    if not adapters:
        raise InputError("finetune serve needs --ckpt_path CKPT, or one or more --adapter NAME=CKPT")
    return adapters


def check_options(host: str, port: int, max_batch_size: int, batch_timeout: float, api_key: Optional[str],
                  merge: bool, adapters: list[tuple[str, str]], max_tokens_limit: int, max_request_bytes: int) -> None:
    if host not in HOSTS:
        raise InputError(f"--host: {host!r} cannot be served (LitServe binds {', '.join(HOSTS)}); 127.0.0.1, the "
                         "default, accepts connections from this machine only, 0.0.0.0 from any")
    if not 1024 <= port <= 65535:
        raise InputError(f"--port: must be from 1024 to 65535, got {port}")
    if max_batch_size < 1:
        raise InputError(f"--max_batch_size: must be at least 1, got {max_batch_size}")
    if batch_timeout < 0:
        raise InputError(f"--batch_timeout: must be 0 or more seconds, got {batch_timeout}")
    if api_key is not None and len(api_key) < 8:
        raise InputError("--api_key: use a key of at least 8 characters")
    if merge and len(adapters) > 1:
        raise InputError(f"--merge true: merging needs one adapter; {len(adapters)} are served (the merged weights "
                         "of one would change the answers of the others)")
    if max_tokens_limit < 1:
        raise InputError(f"--max_tokens_limit: must be at least 1, got {max_tokens_limit}")
    if max_request_bytes < 1024:
        raise InputError(f"--max_request_bytes: must be at least 1024, got {max_request_bytes}")


@dataclass
class AdapterInfo:
    """What the main process knows of an adapter (its checkpoint's options; the weights load in the workers)."""

    name: str
    ckpt: str
    backbone: str
    lora: Optional[dict]
    task: Any  # Task

    @property
    def task_key(self) -> str:
        return json.dumps(self.task.config(), sort_keys=True, default=str)


def read_adapters(adapters: list[tuple[str, str]]) -> list[AdapterInfo]:
    """Each checkpoint checked (as `finetune predict` checks it) and its options read; they must be LoRA adapters
    of one base model when there are several."""
    import torch

    from finetune.checkpointing import check_checkpoint
    from finetune.registry import build_task

    infos = []
    for name, ckpt in adapters:
        flag = "--ckpt_path" if name == DEFAULT_ADAPTER else f"--adapter {name}"
        try:
            check_checkpoint(ckpt)
        except InputError as err:
            raise InputError(str(err).replace("--ckpt_path", flag, 1)) from None
        if not os.path.isfile(ckpt):
            raise InputError(f"{flag}: {ckpt!r} does not exist")
        hparams = torch.load(ckpt, map_location="cpu", weights_only=True).get("hyper_parameters", {})
        infos.append(AdapterInfo(name, ckpt, hparams.get("backbone"), hparams.get("lora"), build_task(hparams["task"])))
    first = infos[0]
    for info in infos[1:]:
        flag = f"--adapter {info.name}"
        if info.backbone != first.backbone:
            raise InputError(f"{flag}: {info.ckpt!r} was trained on {info.backbone!r}, {first.name!r} on "
                             f"{first.backbone!r}; adapters served together share one base model")
        for one in (first, info):
            if one.lora is None:
                raise InputError(f"{'--adapter ' + one.name if one.name != DEFAULT_ADAPTER else '--ckpt_path'}: "
                                 f"{one.ckpt!r} fine-tuned every weight (model.lora: null), so it is no adapter of the "
                                 "base model; serve it alone")
        if type(info.task) is not type(first.task):
            raise InputError(f"{flag}: {info.ckpt!r} is {with_article(type(info.task).__name__)} model, "
                             f"{first.name!r} {with_article(type(first.task).__name__)} one; the adapters of one "
                             "server share a task")
        if head_shape(info.task) != head_shape(first.task):
            raise InputError(f"{flag}: its model differs from {first.name!r}'s ({head_shape(info.task)} vs "
                             f"{head_shape(first.task)}, e.g. another number of labels); serve it on its own port")
    return infos


def head_shape(task: Any) -> dict[str, Any]:
    """The loading options that shape the model (label names do not: each adapter's task names its own)."""
    return {k: v for k, v in task.model_kwargs().items() if k not in ("id2label", "label2id")}


def serve(
    ckpt_path: Optional[str] = None,
    adapter: Optional[list[str]] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch_size: int = 8,
    batch_timeout: float = 0.01,
    api_key: Optional[str] = None,
    merge: bool = False,
    accelerator: str = "auto",
    max_tokens_limit: int = 1024,
    max_request_bytes: int = 1_000_000,
    timeout: float = 120.0,
) -> None:
    """Serve a finetune checkpoint over HTTP (LitServe): `POST /predict`, `GET /health` and, for generation
    tasks, `POST /v1/chat/completions` (OpenAI's chat API).

    Args:
        ckpt_path: checkpoint written by `finetune fit`; served as the adapter `default`.
        adapter: NAME=CHECKPOINT, repeatable: LoRA adapters of one base model, served side by side (the base
            loads once); requests name theirs (`adapter` in a /predict row, `model` in a chat request; the
            first one when they name none).
        host: 127.0.0.1 (this machine only, the default), 0.0.0.0 or :: (every interface).
        port: TCP port (1024-65535).
        max_batch_size: requests batched into one forward pass (1: no batching).
        batch_timeout: seconds a batch waits to fill.
        api_key: require this key (`Authorization: Bearer KEY` or `X-API-Key: KEY`) on /predict and the chat
            endpoint; default: the environment variable FINETUNE_API_KEY, else none.
        merge: merge the one adapter into the base weights (no LoRA overhead; the same answers).
        accelerator: auto, cpu, cuda or mps.
        max_tokens_limit: the largest `max_tokens` a chat request may ask for.
        max_request_bytes: larger request bodies are refused (413).
        timeout: seconds a request may wait for its batch before it is answered 504.
    """
    adapters = parse_adapters(ckpt_path, adapter)
    api_key = api_key if api_key is not None else (os.environ.get("FINETUNE_API_KEY") or None)
    check_options(host, port, max_batch_size, batch_timeout, api_key, merge, adapters, max_tokens_limit,
                  max_request_bytes)
    try:
        import litserve as ls
    except ImportError:
        raise InputError("finetune serve needs LitServe: pip install 'finetune[serve]'") from None
    infos = read_adapters(adapters)
    config = ServeConfig(adapters=adapters, merge=merge, api_key=api_key, max_batch_size=max_batch_size,
                         batch_timeout=batch_timeout)
    checks = RequestChecks(
        tasks={info.name: info.task for info in infos}, default=infos[0].name, api_key=api_key,
        max_tokens_limit=max_tokens_limit, max_request_bytes=max_request_bytes,
        chat=infos[0].task.chat_row([{"role": "user", "content": "Hi"}]) is not None,
    )
    apis: list = [PredictAPI(config)]
    if checks.chat:
        apis.append(ChatAPI(config))
    server = ls.LitServer(apis, accelerator=accelerator, timeout=timeout,
                          middlewares=[(CheckRequests, {"checks": checks})])
    endpoints = "POST /predict, GET /health" + (", POST /v1/chat/completions" if checks.chat else "")
    names = ", ".join(info.name for info in infos)
    print(f"Serving {type(infos[0].task).__name__} ({names}) on http://{host}:{port}: {endpoints}"
          f"{'; API key required' if api_key else ''}", flush=True)
    server.run(host=host, port=port, num_api_servers=1, generate_client_file=False, log_level="warning")


def main(argv: list[str]) -> None:
    """`finetune serve ...`: `--adapter` may be repeated (as jsonargparse's `--adapter+=`)."""
    from jsonargparse import CLI

    from finetune.console import quiet_known_messages

    args, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--adapter" and rest:
            args.append(f"--adapter+={rest.pop(0)}")
        elif arg.startswith("--adapter="):
            args.append("--adapter+=" + arg.partition("=")[2])
        else:
            args.append(arg)
    quiet_known_messages()
    CLI(serve, args=args, as_positional=False)


# --- checks in the HTTP process, before a request is queued ---------------------------------------------
class Refused(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class RequestChecks:
    """The checks of /predict and chat requests: the core's column checks and the task's `check_rows`, the
    adapter, the decoding options. Every refusal names the field."""

    tasks: dict[str, Any]
    default: str
    api_key: Optional[str]
    max_tokens_limit: int
    max_request_bytes: int
    chat: bool
    max_rows: int = 256

    def authorized(self, headers: dict[str, str]) -> bool:
        return authorized(self.api_key, headers)

    def adapter_of(self, value: Any, field: str, status: int = 422) -> str:
        if value is None or (field == "model" and value == ""):
            return self.default
        if not isinstance(value, str) or value not in self.tasks:
            raise Refused(status, f"{field}: {value!r} is not served here; the adapters are: {', '.join(self.tasks)}",
                          field)
        return value

    def parse(self, body: bytes) -> Any:
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise Refused(400, f"the request body is not valid JSON: {err}") from None

    def rows(self, payload: Any) -> list[tuple[str, dict]]:
        """[(adapter, row)] of a /predict body, checked as `finetune predict` checks its file."""
        from finetune.columns import declared_columns, value_problem

        rows = payload if isinstance(payload, list) else [payload]
        if not rows or len(rows) > self.max_rows:
            raise Refused(422, f"body: send a row or a list of 1 to {self.max_rows} rows, got {len(rows)}")
        checked = []
        for number, row in enumerate(rows, start=1):
            where = "row" if not isinstance(payload, list) else f"row {number}"
            if not isinstance(row, dict):
                raise Refused(422, f"{where}: expected an object of columns {{...}}, got {type(row).__name__}")
            field = f"{where}: adapter" if isinstance(payload, list) else "adapter"
            adapter = self.adapter_of(row.get("adapter"), field)
            task = self.tasks[adapter]
            values = {key: value for key, value in row.items() if key != "adapter"}
            for column, name in declared_columns(task, "predict"):
                if name not in values:
                    raise Refused(422, f"{where}: no column {name!r} (model.task.init_args.{column.option}); the row "
                                       f"has: {', '.join(map(repr, values)) or 'no columns'}", name)
                problem = value_problem(column, values[name])
                if problem:
                    raise Refused(422, f"{where}: column {name!r} {problem}", name)
            checked.append((adapter, values))
        for adapter in {adapter for adapter, _ in checked}:
            self.check_rows(adapter, [row for name, row in checked if name == adapter])
        return checked

    def check_rows(self, adapter: str, rows: list[dict]) -> None:
        """The task's own checks of predict rows (`Task.check_rows`), on the rows as a dataset."""
        import datasets

        from finetune.task import Task

        task = self.tasks[adapter]
        if type(task).check_rows is Task.check_rows:
            return
        try:
            dataset = datasets.Dataset.from_list(rows)
        except Exception as err:  # (pyarrow: values of one column of different types across rows)
            raise Refused(422, f"rows: the columns must hold values of one type in every row ({err})") from None
        try:
            task.check_rows("predict", dataset, "request")
        except InputError as err:
            raise Refused(422, str(err)) from None

    def chat_request(self, payload: Any) -> None:
        """An OpenAI chat request: the adapter (`model`), the messages, the decoding options."""
        from finetune.columns import declared_columns, value_problem

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
            self.check_rows(adapter, [row])
        except Refused as refused:
            raise Refused(422, f"messages: {refused.message}", "messages") from None
        for field in ("max_tokens", "max_completion_tokens"):
            value = payload.get(field)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 1 <= value <= self.max_tokens_limit):
                raise Refused(422, f"{field}: must be an integer from 1 to {self.max_tokens_limit}, got {value!r}",
                              field)
        for field, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
            value = payload.get(field)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)
                                      or not low <= value <= high or (field == "top_p" and value == 0)):
                raise Refused(422, f"{field}: must be a number {'from' if field != 'top_p' else 'above'} {low} "
                                   f"to {high}, got {value!r}", field)
        if payload.get("n", 1) not in (1, None):
            raise Refused(422, f"n: only one choice per request is generated, got {payload.get('n')!r}", "n")
        if payload.get("stream") not in (None, True, False):
            raise Refused(422, f"stream: must be true or false, got {payload.get('stream')!r}", "stream")

    def check(self, path: str, body: bytes) -> None:
        payload = self.parse(body)
        if path == "/predict":
            self.rows(payload)
        else:
            self.chat_request(payload)


def authorized(api_key: Optional[str], headers: dict[str, str]) -> bool:
    if api_key is None:
        return True
    given = headers.get("x-api-key") or ""
    bearer = headers.get("authorization") or ""
    if bearer.lower().startswith("bearer "):
        given = given or bearer[7:].strip()
    return hmac.compare_digest(given.encode(), api_key.encode())


class CheckRequests:
    """ASGI middleware: requests to /predict and the chat endpoint are checked here, in the HTTP process, so a
    bad one is answered with a 4xx at once (and never fails the batch it would have joined)."""

    PATHS = ("/predict", "/v1/chat/completions")

    def __init__(self, app: Any, checks: RequestChecks) -> None:
        self.app, self.checks = app, checks

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not self.checks.authorized(headers):  # (LitAPI.authorize answers: nothing is said of the body)
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.checks.max_request_bytes:
                return await self.refuse(send, scope, Refused(413, f"the request body is larger than "
                                                                   f"{self.checks.max_request_bytes} bytes"))
        try:
            self.checks.check(scope["path"], body)
        except Refused as refused:
            return await self.refuse(send, scope, refused)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        # (the body is JSON, whatever the client said: `curl -d` sends it as a form)
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
        scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, replay, send)

    @staticmethod
    async def refuse(send: Any, scope: dict, refused: Refused) -> None:
        content: dict[str, Any] = {"detail": refused.message}
        if scope["path"] != "/predict":  # (the OpenAI clients read `error.message`)
            kind = "not_found_error" if refused.status == 404 else "invalid_request_error"
            content["error"] = {"message": refused.message, "type": kind, "param": refused.param,
                                "code": "model_not_found" if refused.status == 404 else None}
        data = json.dumps(content).encode()
        await send({"type": "http.response.start", "status": refused.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})


# --- the model, in the inference workers -------------------------------------------------------------------
class Routed:
    """The model as a task's hooks call it, with keyword arguments added to every forward and generate call
    (PEFT's `adapter_names` for a batch of several adapters; a streamer)."""

    def __init__(self, model: Any, forward: dict[str, Any], generate: dict[str, Any]) -> None:
        self.model, self.forward_kwargs, self.generate_kwargs = model, forward, generate

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs, **self.forward_kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs, **self.forward_kwargs, **self.generate_kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


class Served:
    """The base model loaded once, every adapter beside it, and each adapter's task."""

    def __init__(self, adapters: list[tuple[str, str]], merge: bool = False, device: str = "cpu") -> None:
        import torch
        from peft import PeftModel

        from finetune.module import FineTuneModule
        from finetune.registry import build_task

        (first, ckpt), others = adapters[0], adapters[1:]
        with warnings.catch_warnings():  # (as `finetune export`: the frozen backbone is not in checkpoints)
            warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the")
            module = FineTuneModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
        self.tokenizer = module.tokenizer
        model = module.model
        self.tasks = {first: module.task}
        #: adapter -> PEFT's name of it
        self.peft_names = {first: "default"} if isinstance(model, PeftModel) else {}
        for number, (name, path) in enumerate(others, start=1):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            task = build_task(checkpoint["hyper_parameters"]["task"])
            self.tasks[name] = task.with_options(**task.backbone_options(module.backbone_config, self.tokenizer))
            self.peft_names[name] = f"adapter{number}"
            add_adapter(model, f"adapter{number}", checkpoint, name)
        if merge and isinstance(model, PeftModel):
            model = model.merge_and_unload()
            self.peft_names = {}
        self.model = model.to(device).eval()
        self.device = device
        self.merged = merge

    def routed(self, adapters: list[str], **generate: Any) -> Any:
        """The model for a batch whose features are of these adapters."""
        if len(set(self.peft_names.values())) > 1:
            return Routed(self.model, {"adapter_names": [self.peft_names[a] for a in adapters]}, generate)
        return Routed(self.model, {}, generate) if generate else self.model

    def groups(self, items: list[tuple[str, dict]]) -> dict[str, list[int]]:
        """Items by task options: adapters of equal options share forward passes."""
        groups: dict[str, list[int]] = {}
        for i, (adapter, _) in enumerate(items):
            groups.setdefault(json.dumps(self.tasks[adapter].config(), sort_keys=True, default=str), []).append(i)
        return groups

    def features(self, task: Any, rows: list[dict]) -> list[dict]:
        """The rows' features, made as the data module makes them (with `index`)."""
        from finetune.pipeline import make_features

        keys = list(dict.fromkeys(key for row in rows for key in row))
        examples = {key: [row.get(key) for row in rows] for key in keys}
        features = make_features(examples, list(range(len(rows))), task, self.tokenizer, with_targets=False)
        return [{key: values[i] for key, values in features.items()} for i in range(len(features["input_ids"]))]

    def batch(self, task: Any, features: list[dict]) -> dict:
        from finetune.pipeline import collate

        batch = collate(features, task, self.tokenizer, with_targets=False)
        return {key: value.to(self.device) for key, value in batch.items()}

    def predict(self, items: list[tuple[str, dict]]) -> list[dict]:
        """[(adapter, row)] -> one prediction row each (without `index`), exactly as `finetune predict` writes
        them: longest first in passes, `Task.predict`, then `merge_predictions` in input order."""
        import torch

        from finetune.task import Task

        results: list[Optional[dict]] = [None] * len(items)
        for members in self.groups(items).values():
            task = self.tasks[items[members[0]][0]]
            rows = [items[i][1] for i in members]
            features = self.features(task, rows)
            features.sort(key=lambda f: -f["length"])  # (as `finetune predict`: longest first)
            predicted = []
            for start in range(0, len(features), PASS_SIZE):
                chunk = features[start:start + PASS_SIZE]
                batch = self.batch(task, chunk)
                model = self.routed([items[members[f["index"]]][0] for f in chunk])
                with torch.inference_mode():
                    predictions = task.predict(model, batch, self.tokenizer)
                for prediction, index in zip(predictions, batch["index"].tolist()):
                    prediction["index"] = index
                predicted.extend(predictions)
            context = None
            if type(task).split_context is not Task.split_context:
                import datasets

                context = task.split_context("predict", datasets.Dataset.from_list(rows))
            for row in task.merge_predictions(sorted(predicted, key=lambda row: row["index"]), context):
                row = dict(row)
                results[members[row.pop("index")]] = row
        return results  # type: ignore[return-value]

    def chat(self, requests: list[dict]) -> Iterator[list[dict]]:
        """Chat requests ({adapter, row, generation, stream}) -> per step, one message delta per request; the
        full reply of a request is its deltas joined, and equals what `finetune predict` generates for its row
        (with the request's decoding options)."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            key = json.dumps([self.tasks[request["adapter"]].config(), request["generation"]], sort_keys=True,
                             default=str)
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            yield from self.chat_group(requests, members)

    def chat_group(self, requests: list[dict], members: list[int]) -> Iterator[list[dict]]:
        from finetune.chat import ChatFormat

        task = self.tasks[requests[members[0]]["adapter"]]
        generation = dataclasses.replace(task.generation, **requests[members[0]]["generation"])
        task = task.with_options(generation=generation)
        features = self.features(task, [requests[i]["row"] for i in members])
        batch = self.batch(task, features)
        streaming = [i for i in members if requests[i]["stream"]] and generation.num_beams == 1
        steps: queue.Queue = queue.Queue()
        streamer = StepStreamer(steps) if streaming else None
        model = self.routed([requests[i]["adapter"] for i in members], **({"streamer": streamer} if streamer else {}))
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                import torch

                with torch.inference_mode():
                    outcome["predictions"] = task.predict(model, batch, self.tokenizer)
            except BaseException as err:  # (raised again in the worker's loop, which answers 500)
                outcome["error"] = err
            finally:
                steps.put(None)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        tokens: list[list[int]] = [[] for _ in members]
        sent = ["" for _ in members]
        while True:
            step = steps.get()
            if step is None:
                break
            deltas = [{"role": "assistant", "content": ""} for _ in requests]
            for j, token in enumerate(step):
                tokens[j].append(token)
                if requests[members[j]]["stream"]:
                    text = self.tokenizer.decode(tokens[j], skip_special_tokens=True).strip()
                    if text.startswith(sent[j]) and not text.endswith("\ufffd"):
                        deltas[members[j]]["content"], sent[j] = text[len(sent[j]):], text
            if any(delta["content"] for delta in deltas):
                yield deltas
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        last = [{"role": "assistant", "content": ""} for _ in requests]
        stop_ids = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        chat = getattr(task, "chat", None)  # (a decoder's reply also ends at its chat format's stop token)
        if isinstance(chat, ChatFormat) and chat.stop_token:
            stop_ids.update(chat.stop_ids(self.tokenizer))
        for j, (i, prediction) in enumerate(zip(members, outcome["predictions"])):
            text = reply_text(prediction)
            last[i]["content"] = text[len(sent[j]):] if text.startswith(sent[j]) else ""
            generated = tokens[j] if streamer else []
            completion = next((n for n, t in enumerate(generated) if t in stop_ids), len(generated))
            if not streamer:
                completion = len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            prompt = len(features[j]["input_ids"])
            last[i].update(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
        yield last


def reply_text(prediction: dict) -> str:
    """The generated text of a prediction row (`generated_text`, or its one text value)."""
    if isinstance(prediction.get("generated_text"), str):
        return prediction["generated_text"]
    texts = [value for value in prediction.values() if isinstance(value, str)]
    return texts[0] if texts else json.dumps(prediction)


class StepStreamer:
    """A transformers streamer (`put` / `end`) that queues each generation step's new tokens, one per row (the
    first `put`, the prompt, is skipped)."""

    def __init__(self, steps: queue.Queue) -> None:
        self.steps, self.prompt_seen = steps, False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.steps.put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


def add_adapter(model: Any, peft_name: str, checkpoint: dict, name: str) -> None:
    """Add a checkpoint's LoRA adapter (and its trained heads) to a PEFT model beside those it has."""
    import copy

    settings = checkpoint["hyper_parameters"]["lora"]
    config = copy.deepcopy(model.peft_config["default"])
    config.r, config.lora_alpha, config.lora_dropout = settings["r"], settings["alpha"], settings["dropout"]
    config.use_dora, config.use_rslora = settings.get("use_dora", False), settings.get("use_rslora", False)
    if settings.get("target_modules") is not None:
        config.target_modules = settings["target_modules"]
    model.add_adapter(peft_name, config)
    saved = {key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()}
    marker = f".{peft_name}."
    wanted = {key: key.replace(marker, ".default.") for key in model.state_dict() if marker in key}
    missing = sorted(source for source in wanted.values() if source not in saved)
    unused = sorted(set(saved) - set(wanted.values()))
    if missing or unused:
        raise InputError(f"--adapter {name}: its checkpoint does not fit the base model's adapter layout (missing: "
                         f"{missing[:3]}; unexpected: {unused[:3]}); were its LoRA settings (target_modules, "
                         "heads) another model's?")
    model.load_state_dict({key: saved[source] for key, source in wanted.items()}, strict=False)


# --- the LitAPIs -----------------------------------------------------------------------------------------
@dataclass
class ServeConfig:
    adapters: list[tuple[str, str]]
    merge: bool
    api_key: Optional[str]
    max_batch_size: int
    batch_timeout: float


try:
    import litserve as ls
    from fastapi import HTTPException, Request
    from litserve.specs import OpenAISpec
    from litserve.specs.openai import ChatCompletionRequest
except ImportError:  # (the `serve` extra is not installed: `serve` says so)
    ls = None

PredictBody = Union[dict[str, Any], list[Any]]

if ls is not None:
    class ServedAPI(ls.LitAPI):
        """What both endpoints share: the model, loaded once per inference worker, and the API key."""

        def __init__(self, config: ServeConfig, **kwargs: Any) -> None:
            super().__init__(max_batch_size=config.max_batch_size, batch_timeout=config.batch_timeout, **kwargs)
            self.config = config

        def setup(self, device: str) -> None:
            from finetune.console import quiet_known_messages

            quiet_known_messages()
            self.served = Served(self.config.adapters, self.config.merge, device)
            self.default = self.config.adapters[0][0]

        def authorize(self, request: Request) -> None:
            if not authorized(self.config.api_key, {k.lower(): v for k, v in request.headers.items()}):
                raise HTTPException(status_code=401, detail="missing or wrong API key: send it as 'Authorization: "
                                                            "Bearer KEY' or 'X-API-Key: KEY'")

    class PredictAPI(ServedAPI):
        """`POST /predict`: a row or a list of rows -> what `finetune predict` writes for them."""

        def __init__(self, config: ServeConfig) -> None:
            super().__init__(config, api_path="/predict")

        def decode_request(self, request: PredictBody) -> tuple[bool, list[tuple[str, dict]]]:
            rows = request if isinstance(request, list) else [request]
            return isinstance(request, list), [
                (row.get("adapter") or self.default, {k: v for k, v in row.items() if k != "adapter"}) for row in rows]

        def predict(self, requests: Any) -> Any:
            if self.max_batch_size == 1:  # (LitServe passes one request, unbatched)
                return self.answer([requests])[0]
            return self.answer(requests)

        def answer(self, requests: list) -> list:
            items = [item for _, rows in requests for item in rows]
            predictions = self.served.predict(items)
            answers, start = [], 0
            for is_list, rows in requests:
                answer = predictions[start:start + len(rows)]
                answers.append(answer if is_list else answer[0])
                start += len(rows)
            return answers

        def unbatch(self, output: list) -> list:
            return output

        def batch(self, inputs: list) -> list:
            return list(inputs)

        def encode_response(self, output: Any) -> Any:
            return output

    class ChatAPI(ServedAPI):
        """`POST /v1/chat/completions` (LitServe's OpenAISpec): the chat becomes the task's predict row."""

        def __init__(self, config: ServeConfig) -> None:
            super().__init__(config, spec=OpenAISpec())

        def decode_request(self, request: ChatCompletionRequest) -> dict:
            adapter = request.model or self.default
            task = self.served.tasks[adapter]
            given = request.model_fields_set
            generation: dict[str, Any] = {}
            tokens = request.max_completion_tokens or request.max_tokens
            if tokens:
                generation["max_new_tokens"] = tokens
            if "temperature" in given and request.temperature is not None:
                if request.temperature > 0:
                    generation.update(do_sample=True, temperature=request.temperature)
                else:
                    generation["do_sample"] = False
            if "top_p" in given and request.top_p is not None and request.top_p < 1:
                generation.update(do_sample=True, top_p=request.top_p)
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            return {"adapter": adapter, "row": task.chat_row(messages), "generation": generation,
                    "stream": bool(request.stream)}

        def batch(self, inputs: list) -> list:
            return list(inputs)

        def predict(self, requests: Any) -> Iterator:
            batched = isinstance(requests, list)
            for deltas in self.served.chat(requests if batched else [requests]):
                yield deltas if batched else deltas[0]

        def encode_response(self, outputs: Iterator) -> Iterator:
            yield from outputs
