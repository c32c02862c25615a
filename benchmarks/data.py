"""The inputs the benchmarks share: JSONL files, the first rows of a data set, and rows made up on the spot
(toy classification and reversal rows for the server, instruction rows when the Alpaca sample is missing)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from benchmarks.harness import SHARED

DATA = SHARED / "data"
WORDS = {
    "pos": "good great excellent wonderful happy love superb nice fine brilliant".split(),
    "neg": "bad awful terrible horrible sad hate poor ugly boring dreadful".split(),
    "neu": "table chair window paper river stone cloud street door lamp".split(),
}


def read_jsonl(path: Path | str, limit: int | None = None) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return rows[:limit]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def subset(src: Path | str, dst: Path, n: int) -> str:
    """The first `n` rows of the JSONL file `src`, written to `dst`; returns its path."""
    return write_jsonl(dst, read_jsonl(src, n))


def columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    """Rows -> {column: values}, as a task's `preprocess` takes a batch."""
    return {key: [row[key] for row in rows] for key in rows[0]}


def toy_sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Learnable toy sentences: the label is the class whose words the text uses."""
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choices(WORDS[label], k=rng.randint(3, 12))), "label": label}
            for label in (["pos", "neg", "neu"][i % 3] for i in range(n))]


def reversal_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Four words -> the same words reversed."""
    rng = random.Random(seed)
    words = sum(WORDS.values(), [])
    return [{"source": " ".join(w), "target": " ".join(reversed(w))} for w in (rng.sample(words, 4) for _ in range(n))]


def synthetic_conversations(n: int, seed: int = 0) -> list[dict[str, list[dict[str, str]]]]:
    """`synthetic_instruction_rows` as conversations: the instruction as the user turn, the output as the reply."""
    return [{"messages": [{"role": "user", "content": row["instruction"]},
                          {"role": "assistant", "content": row["output"]}]}
            for row in synthetic_instruction_rows(n, seed)]


def synthetic_instruction_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Instruction rows of Alpaca's length (~170 tokens with the chat template), from a fixed vocabulary."""
    rng = random.Random(seed)
    words = ("river stone light model token answer paper garden number simple quick write list explain "
             "green table music small large city water friend summer reason story").split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n)).capitalize() + "."

    return [{"instruction": text(rng.randint(6, 20)), "input": text(rng.randint(0, 30)) if rng.random() < 0.4 else "",
             "output": text(rng.randint(20, 150))} for _ in range(n)]
