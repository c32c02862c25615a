"""transformers `pipeline`, as a hand-written application calls it: chats in batches (it tokenizes and pads them
inside the call), or one request after another (as a minimal server would, on a merged model)."""

from __future__ import annotations

import statistics
import time
from typing import Any

from benchmarks.meter import GenerationMeter


def chat(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def generate_chats(model: Any, tokenizer: Any, prompts: list[str], batch_size: int, settings: dict[str, Any],
                   meter: GenerationMeter) -> list[str]:
    """`pipeline("text-generation")` over the prompts as user turns, in the given order; the replies, stripped."""
    from transformers import pipeline

    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    meter.start(model, tokenizer)
    outputs = generator([chat(p) for p in prompts], batch_size=batch_size, return_full_text=False, **settings,
                        eos_token_id=meter.stop_ids, pad_token_id=tokenizer.pad_token_id)
    meter.stop()
    return [output[0]["generated_text"].strip() for output in outputs]


def latency_summary(latencies: list[float], seconds: float, errors: int) -> dict[str, float]:
    """Requests/s, the median and 95th percentile latency (ms), the failed requests."""
    ordered = sorted(latencies)
    return {"rps": len(latencies) / seconds, "p50_ms": 1000 * statistics.median(ordered),
            "p95_ms": 1000 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "errors": errors}


def sequential(kind: str, model_dir: str, inputs: list[str], max_new_tokens: int) -> dict[str, float]:
    """One request after another through `pipeline` on a merged model directory: "classification" texts, or
    "chat" user turns answered greedily with `max_new_tokens`."""
    import torch
    from transformers import pipeline

    if kind == "classification":
        pipe = pipeline("text-classification", model=model_dir, device="cpu", top_k=None)
    else:
        pipe = pipeline("text-generation", model=model_dir, device="cpu")
    latencies = []
    start = time.perf_counter()
    with torch.inference_mode():
        for item in inputs:
            began = time.perf_counter()
            if kind == "classification":
                pipe(item)
            else:
                pipe(chat(item), max_new_tokens=max_new_tokens, do_sample=False)
            latencies.append(time.perf_counter() - began)
    return latency_summary(latencies, time.perf_counter() - start, 0)
