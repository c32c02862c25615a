"""The server on LitServe: one LitAPI, so one inference worker and one copy of the model, and a LitSpec (LitServe's
way of giving an API routes of its own) whose routes, `/predict` and `/v1/chat/completions`, both queue their
work for that worker. LitServe starts a worker per LitAPI and gives a LitAPI one route unless a spec adds them, so
two LitAPIs (one per route) would load the model twice.

The routes check a request before it is queued (finetune/serve/checks.py). The worker answers a batch of queued
work, /predict rows and chat requests mixed, as a stream of messages, one per request and step: `{"answer": ...}`
(a /predict answer), `{"content": ...}` (a chat reply's next text), the last one of a chat reply with its
`finish_reason` and `usage`, or `{}` (nothing new for that request in that step)."""

import asyncio
import json
import signal
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Optional, Union

import litserve as ls
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.specs.openai import (
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionStreamingChoice,
    ChatMessage,
    ChoiceDelta,
    UsageInfo,
)
from litserve.utils import LitAPIStatus, ResponseBufferItem

from finetune.serve.checks import ChatWork, PredictWork, Refused, RequestChecks, authorized

CHAT_PATH = "/v1/chat/completions"
Work = Union[PredictWork, ChatWork]


@dataclass
class ServeConfig:
    adapters: list[tuple[str, str]]
    merge: bool
    api_key: Optional[str]
    max_batch_size: int
    batch_timeout: float


class ServeAPI(ls.LitAPI):
    """The inference worker's side: the model loaded once, answering batches of /predict and chat work."""

    def __init__(self, config: ServeConfig, spec: "ServeSpec") -> None:
        super().__init__(max_batch_size=config.max_batch_size, batch_timeout=config.batch_timeout, spec=spec)
        self.config = config

    def setup(self, device: str) -> None:
        from finetune.console import quiet_known_messages
        from finetune.serve.hosting import Hosted

        # Ctrl-C reaches every process of the terminal's process group; the main process stops this one
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        quiet_known_messages()
        self.hosted = Hosted(self.config.adapters, self.config.merge, device)

    def authorize(self, request: Request) -> None:
        if not authorized(self.config.api_key, {k.lower(): v for k, v in request.headers.items()}):
            raise HTTPException(status_code=401, detail="missing or wrong API key: send it as 'Authorization: "
                                                        "Bearer KEY' or 'X-API-Key: KEY'")

    def decode_request(self, request: Work) -> Work:
        return request  # (checked and decoded by the route that queued it)

    def batch(self, inputs: list) -> list:
        return list(inputs)

    def predict(self, works: Union[Work, list[Work]]) -> Iterator:
        if isinstance(works, list):
            yield from self.answer(works)
        else:  # (--max_batch_size 1: LitServe passes one request, unbatched)
            for messages in self.answer([works]):
                yield messages[0]

    def answer(self, works: list[Work]) -> Iterator[list[dict]]:
        """The messages of each step, one per work: first every /predict answer, then the chat replies."""
        predicts = [i for i, work in enumerate(works) if isinstance(work, PredictWork)]
        if predicts:
            predictions = iter(self.hosted.predict([row for i in predicts for row in works[i].rows]))
            messages: list[dict] = [{} for _ in works]
            for i in predicts:
                answer = [next(predictions) for _ in works[i].rows]
                messages[i] = {"answer": answer if works[i].is_list else answer[0]}
            yield messages
        chats = [i for i, work in enumerate(works) if isinstance(work, ChatWork)]
        if chats:
            for replies in self.hosted.chat([works[i] for i in chats]):
                messages = [{} for _ in works]
                for i, reply in zip(chats, replies):
                    messages[i] = reply
                yield messages

    def encode_response(self, outputs: Iterator) -> Iterator:
        yield from outputs


class ServeSpec(LitSpec):
    """The HTTP side: the routes, each checking its request, queueing it for the worker and answering from the
    worker's messages."""

    def __init__(self, checks: RequestChecks, chat: bool) -> None:
        super().__init__()
        self.api_path = "/predict"  # (the worker's queue is the API's path)
        self.checks, self.chat = checks, chat

    @property
    def stream(self) -> bool:
        return True  # (the worker streams its messages: chat replies token by token)

    def pre_setup(self, lit_api: ls.LitAPI) -> None:
        self.add_endpoint("/predict", self.predict_route, ["POST"])
        if self.chat:
            self.add_endpoint(CHAT_PATH, self.chat_route, ["POST"])

    def decode_request(self, request: Any, context_kwargs: Optional[dict] = None) -> Any:
        return request

    def encode_response(self, output: Iterator, context_kwargs: Optional[dict] = None) -> Iterator:
        yield from output

    async def predict_route(self, request: Request) -> JSONResponse:
        try:
            work = self.checks.predict_work(await self.body(request))
        except Refused as refused:
            return refusal(refused, openai=False)
        async for message in self.messages(work):
            if "answer" in message:
                return JSONResponse(message["answer"])
        raise HTTPException(500, "Internal server error")

    async def chat_route(self, request: Request) -> Any:
        try:
            work = self.checks.chat_work(await self.body(request))
        except Refused as refused:
            return refusal(refused, openai=True)
        replies = self.messages(work)
        if work.stream:
            return StreamingResponse(self.chunks(work.adapter, replies), media_type="text/event-stream")
        content, last = "", {}
        async for message in replies:
            content += message.get("content", "")
            last = message
        return ChatCompletionResponse(
            model=work.adapter, usage=UsageInfo(**last["usage"]),
            choices=[ChatCompletionResponseChoice(index=0, message=ChatMessage(role="assistant", content=content),
                                                  finish_reason=last["finish_reason"])])

    async def chunks(self, adapter: str, replies: AsyncIterator[dict]) -> AsyncIterator[str]:
        """Server-sent events of OpenAI's chat chunks: each new text, then the finish reason and the usage."""
        try:
            async for message in replies:
                if message.get("content"):
                    chunk = ChatCompletionChunk(model=adapter, usage=None, choices=[ChatCompletionStreamingChoice(
                        index=0, delta=ChoiceDelta(role="assistant", content=message["content"]))])
                    yield f"data: {chunk.model_dump_json()}\n\n"
                if "finish_reason" in message:
                    chunk = ChatCompletionChunk(model=adapter, usage=UsageInfo(**message["usage"]), choices=[
                        ChatCompletionStreamingChoice(index=0, delta=ChoiceDelta(),
                                                      finish_reason=message["finish_reason"])])
                    yield f"data: {chunk.model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"
        except HTTPException as err:  # (the status line is sent: the error goes in the stream, as OpenAI's does)
            error = {"message": err.detail, "type": "internal", "code": err.status_code}
            yield f"data: {json.dumps({'error': error})}\n\n"

    async def body(self, request: Request) -> bytes:
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > self.checks.max_request_bytes:
                raise Refused(413, f"the request body is larger than {self.checks.max_request_bytes} bytes")
        return body

    async def messages(self, work: Work) -> AsyncIterator[dict]:
        """Queue `work` for the worker and yield its messages (without the empty ones) as they come."""
        uid = uuid.uuid4()
        arrived, event = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=event, response_queue=arrived)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), work))
        try:
            async for data, status in self.data_streamer(arrived, event, send_status=True):
                if status == LitAPIStatus.ERROR:  # (the worker logged it; an HTTPException is a timeout's 504)
                    if isinstance(data, HTTPException):
                        raise data
                    raise HTTPException(500, "Internal server error")
                message = json.loads(data)
                if message:
                    yield message
        finally:
            self.response_buffer.pop(uid, None)


def refusal(refused: Refused, openai: bool) -> JSONResponse:
    content: dict[str, Any] = {"detail": refused.message}
    if openai:  # (the OpenAI clients read `error.message`)
        kind = "not_found_error" if refused.status == 404 else "invalid_request_error"
        content["error"] = {"message": refused.message, "type": kind, "param": refused.param,
                            "code": "model_not_found" if refused.status == 404 else None}
    return JSONResponse(content, status_code=refused.status)


def build_server(config: ServeConfig, checks: RequestChecks, chat: bool, accelerator: str,
                 timeout: float) -> ls.LitServer:
    # (a list: LitServer guards /health and /info with the `authorize` of an API given alone, and health checks
    # carry no key)
    return ls.LitServer([ServeAPI(config, ServeSpec(checks, chat))], accelerator=accelerator, timeout=timeout)
