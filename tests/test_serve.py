"""`finetune serve`: every answer is what `finetune predict` writes for the same rows; bad requests get a 4xx
naming the field and the server keeps serving; adapters side by side; a bounded load test; the OpenAI client; one
model copy for both endpoints; SIGTERM / SIGINT stop every process of the server; a port in use is an error.

Servers run in a subprocess on a free loopback port (LitServe's inference workers are processes of their own).
"""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, fit_args, make_rows, reversal_rows, write_jsonl
from finetune.cli import main, run

pytest.importorskip("litserve")
psutil = pytest.importorskip("psutil")

FLIP = {"pos": "neg", "neg": "pos", "neu": "neu"}
TEXTS = [r["text"] for r in make_rows(24, seed=5)] + ["good", "awful terrible sad bad poor ugly boring " * 3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body=None, headers=None, raw: bytes = None):
    """(status, parsed JSON or text) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    try:
        return response.status, json.loads(text)
    except json.JSONDecodeError:
        return response.status, text


class Server:
    """`finetune serve ARGS` in a subprocess (its own process group), until stopped."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen([sys.executable, "-m", "finetune", "serve", *args, f"--port={self.port}"],
                                        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                        start_new_session=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited: {log.read_text()[-3000:]}")
            try:
                if request(self.port, "GET", "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"the server did not answer /health: {log.read_text()[-3000:]}")

    def processes(self) -> list:
        """The server's process and its descendants (LitServe's HTTP server, inference worker, queue manager)."""
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def rss(self) -> int:
        """Resident memory of the server and its workers, in bytes."""
        return sum(p.memory_info().rss for p in self.processes())

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)


def predicted(args: list[str], rows: list[dict], tmp: Path) -> list[dict]:
    """What `finetune predict` writes for `rows`."""
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / "predictions.jsonl"
    main(["predict", *args, f"--data.predict_file={write_jsonl(tmp / 'predict.jsonl', rows)}",
          f"--predictions.output_file={out}", "--trainer.enable_progress_bar=false",
          f"--trainer.default_root_dir={tmp}"])
    return [json.loads(line) for line in out.read_text().splitlines()]


def assert_same(answer: dict, expected: dict) -> None:
    """The same prediction (probabilities to 1e-5: a batch's padding changes the last float bits)."""
    assert answer.keys() == expected.keys()
    for key, value in expected.items():
        if key in ("probabilities", "score"):
            assert answer[key] == pytest.approx(value, abs=1e-5)
        else:
            assert answer[key] == value


# --- classification: two LoRA adapters of one tiny BERT --------------------------------------------------
@pytest.fixture(scope="module")
def adapters(tiny_bert, tmp_path_factory):
    """Two adapters with the same label set: `sentiment`, and `flipped` (pos and neg swapped), and what
    `finetune predict` writes for TEXTS with each."""
    root = tmp_path_factory.mktemp("serve-fit")
    ckpts = {}
    for name, relabel in (("sentiment", lambda label: label), ("flipped", FLIP.get)):
        rows = [dict(r, label=relabel(r["label"])) for r in make_rows(96, seed=1)]
        files = {"train": write_jsonl(root / f"{name}-train.jsonl", rows),
                 "val": write_jsonl(root / f"{name}-val.jsonl", rows[:12])}
        run(fit_args(tiny_bert, files, root / name, "--trainer.max_epochs=3", "--trainer.logger=false"))
        (ckpts[name],) = (root / name).rglob("*.ckpt")
    model = [f"--model.backbone={tiny_bert}", "--model.task=classification"]
    expected = {name: predicted([*model, f"--ckpt_path={ckpt}"], [{"text": t} for t in TEXTS], root / f"{name}-predict")
                for name, ckpt in ckpts.items()}
    assert [r["label"] for r in expected["sentiment"]] != [r["label"] for r in expected["flipped"]]
    return {"ckpts": ckpts, "expected": expected, "root": root}


@pytest.fixture(scope="module")
def server(adapters):
    ckpts = adapters["ckpts"]
    server = Server([f"--adapter=sentiment={ckpts['sentiment']}", "--adapter", f"flipped={ckpts['flipped']}",
                     "--max_batch_size=8", "--batch_timeout=0.01"], adapters["root"] / "server.log")
    yield server
    server.stop()


def test_predict_answers_what_finetune_predict_writes(server, adapters):
    expected = adapters["expected"]["sentiment"]
    status, answer = request(server.port, "POST", "/predict", {"text": TEXTS[0]})  # one row -> one object
    assert status == 200
    assert_same(answer, expected[0])
    status, answers = request(server.port, "POST", "/predict", [{"text": t} for t in TEXTS])  # a list, in order
    assert status == 200 and len(answers) == len(TEXTS)
    for answer, row in zip(answers, expected):
        assert_same(answer, row)
    assert "index" not in answers[0]


def test_two_adapters_answer_side_by_side(server, adapters):
    expected = adapters["expected"]
    names = ["flipped" if i % 3 else "sentiment" for i in range(len(TEXTS))]
    # one request mixing both adapters (one forward pass: the tasks' options are equal)
    status, answers = request(server.port, "POST", "/predict",
                              [{"text": t, "adapter": n} for t, n in zip(TEXTS, names)])
    assert status == 200
    for i, (answer, name) in enumerate(zip(answers, names)):
        assert_same(answer, expected[name][i])
    status, answer = request(server.port, "POST", "/predict", {"text": TEXTS[1], "adapter": "flipped"})
    assert status == 200
    assert_same(answer, expected["flipped"][1])


@pytest.mark.parametrize("body, status, named", [
    ({"txt": "good"}, 422, "'text'"),  # a missing column (with what the row has)
    ({"text": 5}, 422, "'text'"),  # a wrong type
    ({"text": "   "}, 422, "'text'"),  # only whitespace, as the predict file's check says
    ({"text": "good", "adapter": "nope"}, 422, "adapter"),
    ([{"text": "good"}, {"text": None}], 422, "row 2"),
    ([], 422, "body"),
    ("good", 422, "row"),
    (b'{"text": "good"', 400, "JSON"),  # malformed JSON
    (b'{"text": "good \\ud800"}', 422, "column 'text' is not valid Unicode text"),  # a lone surrogate
    (b'[{"text": "good"}, {"text": "good", "x": ["\\udfff"]}]', 422, "row 2: column 'x' at [0] is not valid Unicode"),
])
def test_bad_requests_get_a_4xx_naming_the_field_and_the_server_keeps_serving(server, adapters, body, status, named):
    raw = body if isinstance(body, bytes) else None
    got, answer = request(server.port, "POST", "/predict", None if raw else body, raw=raw)
    assert got == status and named in answer["detail"], answer
    got, answer = request(server.port, "POST", "/predict", {"text": TEXTS[2]})
    assert got == 200
    assert_same(answer, adapters["expected"]["sentiment"][2])


def test_a_body_over_the_limit_is_refused(server):
    status, answer = request(server.port, "POST", "/predict", {"text": "good " * 300_000})
    assert status == 413 and "larger than" in answer["detail"]
    assert request(server.port, "GET", "/health") == (200, "ok")


@pytest.mark.slow  # (about 20 s on 2 CPU cores)
def test_load_of_32_concurrent_clients_with_mixed_adapters(server, adapters):
    """32 clients x 20 requests, adapters mixed: no errors, every answer equal to `finetune predict`'s, and the
    server's memory flat across the run."""
    expected = adapters["expected"]
    for i in range(16):  # warm up (allocator pools, the first batches)
        request(server.port, "POST", "/predict", {"text": TEXTS[i], "adapter": "flipped" if i % 2 else "sentiment"})
    before = server.rss()
    failures, done = [], []

    def client(number: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        for j in range(20):
            i, name = (number * 7 + j) % len(TEXTS), ("sentiment", "flipped")[(number + j) % 2]
            try:
                conn.request("POST", "/predict", body=json.dumps({"text": TEXTS[i], "adapter": name}),
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                answer = json.loads(response.read())
                if response.status != 200:
                    failures.append((response.status, answer))
                    continue
                assert_same(answer, expected[name][i])
                done.append(1)
            except Exception as err:  # (collected: an assertion in a thread would not fail the test)
                failures.append(repr(err))
        conn.close()

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    seconds = time.monotonic() - start
    assert not failures, failures[:5]
    assert len(done) == 32 * 20
    after = server.rss()
    assert after - before < 100 * 2**20, f"server memory grew from {before / 2**20:.0f} to {after / 2**20:.0f} MiB"
    assert seconds < 90


def test_api_key_is_required_when_set(adapters, tmp_path):  # (and unbatched: --max_batch_size 1)
    server = Server([f"--ckpt_path={adapters['ckpts']['sentiment']}", "--api_key=secret-key-1",
                     "--max_batch_size=1"], tmp_path / "log")
    try:
        status, answer = request(server.port, "POST", "/predict", {"text": "good"})
        assert status == 401 and "API key" in answer["detail"]
        status, _ = request(server.port, "POST", "/predict", {"txt": "good"})
        assert status == 401  # (nothing is said of the body before the key is right)
        status, answer = request(server.port, "POST", "/predict", {"text": TEXTS[0]},
                                 headers={"Authorization": "Bearer secret-key-1"})
        assert status == 200
        assert_same(answer, adapters["expected"]["sentiment"][0])
        key = {"X-API-Key": "secret-key-1"}
        assert request(server.port, "POST", "/predict", {"text": "good"}, headers=key)[0] == 200
    finally:
        server.stop()


def test_merged_weights_give_the_same_answers(adapters):
    from finetune.serve.hosting import Hosted

    items = [("default", {"text": t}) for t in TEXTS]
    ckpt = str(adapters["ckpts"]["sentiment"])
    merged, unmerged = Hosted([("default", ckpt)], merge=True), Hosted([("default", ckpt)])
    assert not hasattr(merged.model, "peft_config") and hasattr(unmerged.model, "peft_config")
    for a, b, expected in zip(merged.predict(items), unmerged.predict(items), adapters["expected"]["sentiment"]):
        assert_same(a, expected)
        assert_same(b, expected)


@pytest.mark.parametrize("args, message", [
    (["--ckpt_path=x.ckpt", "--port=80"], "--port"),
    (["--ckpt_path=x.ckpt", "--host=example.com"], "--host"),
    (["--ckpt_path=x.ckpt", "--max_batch_size=0"], "--max_batch_size"),
    (["--adapter=sentiment"], "NAME=CHECKPOINT"),
    (["--adapter=a=x.ckpt", "--adapter=b=y.ckpt", "--merge=true"], "--merge"),
    ([], "--ckpt_path"),
    (["--ckpt_path=/nonexistent.ckpt"], "does not exist"),
    (["--adapter=extra=/nonexistent.ckpt"], "--adapter extra"),
])
def test_bad_arguments_fail_before_loading_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["serve", *args])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_port_in_use_is_an_error_before_serving(adapters, capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(SystemExit) as exit:
            main(["serve", f"--ckpt_path={adapters['ckpts']['sentiment']}", f"--port={port}"])
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and "Serving" not in out
    assert err.startswith(f"finetune: error: --port {port}: cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1


@pytest.mark.parametrize("signum, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["TERM", "Ctrl-C"])
def test_a_signal_stops_every_process_of_the_server_and_frees_the_port(adapters, tmp_path, signum, to_group):
    """`kill -TERM PID` (the main process alone) and Ctrl-C (SIGINT to the terminal's whole process group)."""
    server = Server([f"--ckpt_path={adapters['ckpts']['sentiment']}"], tmp_path / "log")
    processes = server.processes()
    assert len(processes) >= 3  # (the command, LitServe's HTTP server and its inference worker at least)
    try:
        (os.killpg if to_group else os.kill)(server.process.pid, signum)
        assert server.process.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while (alive := [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]) \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        server.stop()
    with socket.socket() as again:  # (as the server binds it)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", server.port))
    log = server.log.read_text()
    assert "Traceback" not in log and "Error" not in log, log


# --- generation: a tiny Llama with a chat template -------------------------------------------------------
@pytest.fixture(scope="module")
def chat_model(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-chat")
    rows = reversal_rows()
    train = write_jsonl(root / "train.jsonl", rows * 4)
    run(["fit", f"--model.backbone={tiny_llama}", "--model.task=Translation", f"--data.train_file={train}",
         "--model.optimizer.lr=0.01", "--data.batch_size=8", "--trainer.max_epochs=12", "--seed_everything=0",
         "--model.lora=null", "--model.task.generation.max_new_tokens=12", "--trainer.enable_progress_bar=false",
         "--trainer.logger=false",
         f"--trainer.default_root_dir={root}"])
    (ckpt,) = root.rglob("*.ckpt")
    sources = [r["source"] for r in rows]
    model = [f"--model.backbone={tiny_llama}", "--model.task=Translation"]
    expected = predicted([*model, f"--ckpt_path={ckpt}"], [{"source": s} for s in sources], root / "predict")
    assert sum(bool(row["generated_text"]) for row in expected) >= len(expected) // 2  # (something to compare)
    server = Server([f"--ckpt_path={ckpt}", "--max_batch_size=4"], root / "server.log")
    rows = [{"source": source, **row} for source, row in zip(sources, expected)]
    yield {"server": server, "sources": sources, "expected": expected, "rows": rows}
    server.stop()


def test_one_inference_worker_holds_the_model_for_both_endpoints(chat_model):
    workers = [p for p in chat_model["server"].processes() if "multiprocessing.spawn" in " ".join(p.cmdline())]
    assert len(workers) == 1, [p.cmdline() for p in workers]


def test_generation_predict_and_chat_answer_what_finetune_predict_writes(chat_model):
    port, sources, expected = chat_model["server"].port, chat_model["sources"], chat_model["expected"]
    status, answers = request(port, "POST", "/predict", [{"source": s} for s in sources])
    assert status == 200 and answers == expected
    results = [None] * len(sources)

    def chat(i: int) -> None:  # concurrently: the requests share batches (prompts padded on the left)
        results[i] = request(port, "POST", "/v1/chat/completions",
                             {"model": "default", "messages": [{"role": "user", "content": sources[i]}]})

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(len(sources))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for (status, answer), row in zip(results, expected):
        assert status == 200, answer
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"] == {"role": "assistant", "content": row["generated_text"],
                                                   "name": None, "tool_calls": None, "tool_call_id": None}
        assert answer["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize("body, status, named", [
    ({"model": "nope", "messages": [{"role": "user", "content": "good"}]}, 404, "model"),
    ({"messages": [{"role": "user", "content": "good"}], "max_tokens": 0}, 422, "max_tokens"),
    ({"messages": [{"role": "user", "content": "good"}], "max_tokens": 100_000}, 422, "max_tokens"),
    ({"messages": [{"role": "user", "content": "good"}], "temperature": 5}, 422, "temperature"),
    ({"messages": []}, 422, "messages"),
    ({"messages": [{"role": "system", "content": "be brief"}]}, 422, "user message"),
    ({"messages": [{"role": "user", "content": 3}]}, 422, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "good \ud800"}]}, 422, "messages[0].content is not valid Unicode"),
])
def test_bad_chat_requests_get_a_4xx_naming_the_field(chat_model, body, status, named):
    port = chat_model["server"].port
    got, answer = request(port, "POST", "/v1/chat/completions", body)
    assert got == status and named in answer["error"]["message"], answer
    got, answer = request(port, "POST", "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": chat_model["sources"][0]}]})
    assert got == 200 and answer["choices"][0]["message"]["content"] == chat_model["expected"][0]["generated_text"]


def test_the_openai_client_talks_to_the_server_streaming_too(chat_model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{chat_model['server'].port}/v1", api_key="unused")
    source, expected = chat_model["sources"][1], chat_model["expected"][1]["generated_text"]
    reply = client.chat.completions.create(model="default", messages=[{"role": "user", "content": source}])
    assert reply.choices[0].message.content == expected
    chunks = list(client.chat.completions.create(model="default", messages=[{"role": "user", "content": source}],
                                                 stream=True))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(deltas) == expected
    assert len(deltas) > 1 or len(expected.split()) <= 1  # token by token, as they were generated
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": source}])


def chat(port: int, body: dict) -> tuple[str, dict, str, str]:
    """(reply, usage, finish reason, model) of a chat request, streamed or not."""
    status, answer = request(port, "POST", "/v1/chat/completions", body)
    assert status == 200, answer
    if not body.get("stream"):
        (choice,) = answer["choices"]
        return choice["message"]["content"], answer["usage"], choice["finish_reason"], answer["model"]
    chunks = [json.loads(line[len("data: "):]) for line in answer.split("\n\n") if line.startswith("data: {")]
    assert answer.rstrip().endswith("data: [DONE]")
    reply = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks)
    assert all(c["usage"] is None and c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    return reply, chunks[-1]["usage"], chunks[-1]["choices"][0]["finish_reason"], chunks[-1]["model"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_usage_counts_the_generated_tokens_and_says_why_generation_ended(chat_model, stream):
    """completion_tokens: the tokens generated before the stop token; finish_reason: "length" when max_tokens ended
    the reply, "stop" when the stop token did; the model: the adapter that answered."""
    port, row = chat_model["server"].port, next(r for r in chat_model["rows"] if len(r["generated_text"]) > 1)
    messages = [{"role": "user", "content": row["source"]}]
    reply, usage, finish, model = chat(port, {"messages": messages, "max_tokens": 1, "stream": stream})
    assert (usage["completion_tokens"], finish, model) == (1, "length", "default")
    assert reply and row["generated_text"].startswith(reply)
    assert usage["total_tokens"] == usage["prompt_tokens"] + 1 and usage["prompt_tokens"] > 0
    reply, usage, finish, model = chat(port, {"messages": messages, "stream": stream, "model": "default"})
    assert (reply, finish, model) == (row["generated_text"], "stop", "default")
    limit = 12  # (model.task.generation.max_new_tokens of the fixture's fit)
    assert 1 <= usage["completion_tokens"] < limit
    _, at_most, finish, _ = chat(port, {"messages": messages, "stream": stream,
                                        "max_tokens": usage["completion_tokens"]})
    assert (at_most["completion_tokens"], finish) == (usage["completion_tokens"], "length")
