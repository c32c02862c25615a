"""`finetune serve`: the options, checked before anything loads, the server started, and stopped whole by
SIGTERM or SIGINT (Ctrl-C)."""

import multiprocessing
import os
import signal
import socket
from typing import Any, Optional

from finetune.errors import InputError
from finetune.serve.adapters import parse_adapters, read_adapters

#: The hosts LitServe can bind (it refuses others).
HOSTS = ("127.0.0.1", "0.0.0.0", "::")


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


def check_port(host: str, port: int) -> None:
    """The port must be free: bound here as the server binds it (LitServe's failure would come after the model
    loads, as a log line)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise InputError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); another process "
                             "holds it: stop it or choose another --port") from None


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
    tasks, `POST /v1/chat/completions` (OpenAI's chat API). SIGTERM or SIGINT (Ctrl-C) stops it.

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
        import litserve  # noqa: F401 (the server is built from it below)
    except ImportError:
        raise InputError("finetune serve needs LitServe: pip install 'finetune[serve]'") from None
    check_port(host, port)
    infos = read_adapters(adapters)

    from finetune.serve.api import CHAT_PATH, ServeConfig, build_server
    from finetune.serve.checks import RequestChecks

    chat = infos[0].task.chat_row([{"role": "user", "content": "Hi"}]) is not None
    checks = RequestChecks(tasks={info.name: info.task for info in infos}, default=infos[0].name,
                           max_tokens_limit=max_tokens_limit, max_request_bytes=max_request_bytes)
    config = ServeConfig(adapters=adapters, merge=merge, api_key=api_key, max_batch_size=max_batch_size,
                         batch_timeout=batch_timeout)
    server = build_server(config, checks, chat, accelerator, timeout)
    endpoints = "POST /predict, GET /health" + (f", POST {CHAT_PATH}" if chat else "")
    names = ", ".join(info.name for info in infos)
    print(f"Serving {type(infos[0].task).__name__} ({names}) on http://{host}:{port}: {endpoints}"
          f"{'; API key required' if api_key else ''}", flush=True)
    run_until_stopped(server, host, port)


def run_until_stopped(server: Any, host: str, port: int) -> None:
    """`server.run` until SIGTERM or SIGINT, then every process of the server stopped: LitServe stops its HTTP
    server and inference worker on a KeyboardInterrupt, which both signals raise here (by default SIGTERM ends
    this process alone and leaves them serving)."""
    main = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() != main:  # (a process LitServe forked inherited this handler: it ends as by default)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        for each in (signal.SIGINT, signal.SIGTERM):  # (a second signal must not cut the shutdown short)
            signal.signal(each, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = {each: signal.signal(each, stop) for each in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(host=host, port=port, num_api_servers=1, generate_client_file=False, log_level="warning")
    except KeyboardInterrupt:  # (a signal while the worker was loading, before LitServe waits for one)
        pass
    finally:
        for child in multiprocessing.active_children():  # (what LitServe's shutdown did not reach)
            child.terminate()
            child.join(timeout=5)
        for each, handler in previous.items():
            signal.signal(each, handler)


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
