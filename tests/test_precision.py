"""Precision: the frozen backbone in bf16 with fp32 LoRA under autocast, Lightning's bf16 precisions, and 4-bit /
8-bit QLoRA (bitsandbytes on this CPU): what trains, what checkpoints keep, what export writes, what the console
shows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TOY_CORPUS, fit_args, make_rows, write_jsonl
from finetune.errors import InputError
from finetune.module import FineTuneModule
from finetune.pipeline import predict_rows
from finetune.precision import autocast, cpu_has_fast_bf16, resolve_dtype
from finetune.testing import processes_env
from finetune.tiny import tiny_backbone
from tasks.classification import TextClassification

TESTS = Path(__file__).parent
#: What the console of a quantized run must not show (bitsandbytes' kernel fetch; PEFT's use of a deprecated
#: transformers attribute; torch's warning that a layer without backward was backpropagated through).
NOISE = ("kernels-community", "is_gradient_checkpointing", "autograd kernel was not registered")
bitsandbytes = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the dev extra)")


@pytest.fixture(scope="session")
def llama64(tmp_path_factory) -> str:
    """A tiny Llama 64 wide: bitsandbytes quantizes weights in blocks of 64 inputs."""
    return tiny_backbone(tmp_path_factory.mktemp("tiny-llama-64"), "llama", TOY_CORPUS, width=64)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("toy")
    return {"train": write_jsonl(root / "train.jsonl", make_rows(24, seed=1)),
            "val": write_jsonl(root / "val.jsonl", make_rows(12, seed=2))}


def run_fit(backbone: str, files: dict, root: Path, *extra: str) -> subprocess.CompletedProcess:
    args = fit_args(backbone, files, root, "--trainer.max_epochs=2", *extra)
    env = processes_env(str(TESTS))
    result = subprocess.run([sys.executable, "-m", "finetune", *args], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def last_checkpoint(root: Path) -> dict:
    path = sorted(root.glob("version_*/checkpoints/*.ckpt"))[-1]
    return torch.load(path, weights_only=True) | {"path": str(path)}


def module_for(backbone: str, **options) -> FineTuneModule:
    torch.manual_seed(0)  # (the same LoRA initialisation in every module)
    module = FineTuneModule(backbone, TextClassification(labels=["neg", "neu", "pos"]), **options)
    module.configure_model()
    return module


def batch_of(module: FineTuneModule, n: int = 6) -> dict:
    rows = make_rows(n, seed=3)
    encoded = module.tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([["neg", "neu", "pos"].index(r["label"]) for r in rows])
    return {**encoded, "labels": labels}


def loss_and_grads(module: FineTuneModule, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    module.model.zero_grad()
    torch.manual_seed(1)  # (the same dropout masks)
    with module.autocast():
        outputs = module.task.forward(module.model, batch)
    loss = module.task.loss(outputs, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.item(), grads


# --- the dtype a name means -----------------------------------------------------------------------------------------
def test_auto_means_bf16_only_on_cpus_that_compute_it_natively(tmp_path):
    with_bf16 = tmp_path / "zen4"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    without = tmp_path / "zen2"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert cpu_has_fast_bf16(with_bf16) and not cpu_has_fast_bf16(without)
    assert not cpu_has_fast_bf16(tmp_path / "absent")  # (no Linux cpuinfo: not assumed)
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16 and resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    assert resolve_dtype("auto", "meta") == torch.float32


# --- bf16 backbone, fp32 adapter ------------------------------------------------------------------------------------
def test_bf16_backbone_keeps_trained_weights_fp32_and_gives_the_fp32_loss_and_gradients(tiny_llama):
    full = module_for(tiny_llama)
    half = module_for(tiny_llama, backbone_dtype="bfloat16")
    frozen = {p.dtype for p in half.model.parameters() if not p.requires_grad}
    trained = {n: p.dtype for n, p in half.model.named_parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and set(trained.values()) == {torch.float32}
    assert any("lora_A" in n for n in trained) and any("score" in n for n in trained)  # the head trains in fp32 too
    batch = batch_of(full)
    full_loss, full_grads = loss_and_grads(full, batch)
    half_loss, half_grads = loss_and_grads(half, batch)
    assert half_loss == pytest.approx(full_loss, rel=0.02)
    assert full_grads.keys() == half_grads.keys()
    for name, grad in full_grads.items():  # bf16 keeps 8 bits of each product: about the direction, not the digits
        if not grad.any():  # (lora_A before the first step: lora_B starts at zero)
            assert not half_grads[name].any(), name
            continue
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), half_grads[name].flatten(), dim=0)
        assert cosine > 0.9, name  # (measured 0.93-0.99 on the tiny model; the loss agrees to 2e-4)


def test_bf16_fit_checkpoints_fp32_adapter_and_predicts(tiny_llama, toy, tmp_path):
    run_fit(tiny_llama, toy, tmp_path, "--model.backbone_dtype=bfloat16")
    checkpoint = last_checkpoint(tmp_path)
    assert checkpoint["hyper_parameters"]["backbone_dtype"] == "bfloat16"
    assert {v.dtype for v in checkpoint["state_dict"].values()} == {torch.float32}
    module = FineTuneModule.load_from_checkpoint(checkpoint["path"], map_location="cpu", weights_only=True)
    assert module.compute_dtype == torch.bfloat16
    assert {p.dtype for p in module.model.parameters() if not p.requires_grad} == {torch.bfloat16}


@pytest.mark.slow
@pytest.mark.parametrize("precision, adapter_dtype", [("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16)])
def test_lightning_bf16_precisions_mean_what_lightning_says(tiny_llama, toy, tmp_path, precision, adapter_dtype):
    """bf16-mixed: fp32 weights, bf16 autocast; bf16-true: every weight bf16, the adapter included."""
    run_fit(tiny_llama, toy, tmp_path, f"--trainer.precision={precision}")
    checkpoint = last_checkpoint(tmp_path)
    assert {v.dtype for v in checkpoint["state_dict"].values()} == {adapter_dtype}
    assert checkpoint["global_step"] == 6  # (24 rows, batches of 8, 2 epochs)


# --- QLoRA ----------------------------------------------------------------------------------------------------------
def test_4bit_lora_gradients_stay_right_after_a_validation_pass(llama64):
    """bitsandbytes repacks a 4-bit layer for its inference kernel (no backward) at its first forward in eval mode
    without gradients; the module keeps the trainable layout, so a validation pass changes no gradient."""
    module = module_for(llama64, quantization="4bit", backbone_dtype="bfloat16")
    assert any(type(m).__name__ == "Linear4bit" for m in module.model.modules())
    batch = batch_of(module)
    loss, before = loss_and_grads(module, batch)
    module.model.eval()
    with torch.no_grad(), module.autocast():
        module.task.forward(module.model, batch)
    module.model.train()
    again, after = loss_and_grads(module, batch)
    assert again == loss
    assert after.keys() == before.keys()  # (with bitsandbytes' repacking, no gradient reaches the first layers)
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("bits", ["4bit", pytest.param("8bit", marks=pytest.mark.slow)])
def test_qlora_fit_predict_and_export_on_cpu_with_a_clean_console(llama64, toy, tmp_path, bits):
    result = run_fit(llama64, toy, tmp_path, f"--model.quantization={bits}", "--model.backbone_dtype=bfloat16")
    console = result.stdout + result.stderr
    assert not [noise for noise in NOISE if noise in console], console[-3000:]
    checkpoint = last_checkpoint(tmp_path)
    assert {v.dtype for v in checkpoint["state_dict"].values()} == {torch.float32}
    assert all("lora_" in k or "score" in k for k in checkpoint["state_dict"])  # no quantized weights saved
    module = FineTuneModule.load_from_checkpoint(checkpoint["path"], map_location="cpu", weights_only=True).eval()
    dense = module.dequantized()
    assert not any("Linear4bit" in type(m).__name__ or "Linear8bitLt" in type(m).__name__
                   for m in dense.model.modules())
    batch = batch_of(module)
    with torch.no_grad(), module.autocast():
        quantized = module.task.forward(module.model, batch).logits.float()
        merged = module.task.forward(dense.model.merge_and_unload(), batch).logits.float()
    # the merged model computes what the quantized one trained: equal up to bf16 rounding
    torch.testing.assert_close(merged, quantized, rtol=0, atol=0.02 * quantized.abs().max().item())


def test_quantization_without_a_usable_bitsandbytes_is_a_clear_error(monkeypatch):
    from importlib.metadata import PackageNotFoundError

    import finetune.lora as lora

    cpu = torch.device("cpu")

    def absent(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(lora, "version", absent)
    with pytest.raises(InputError, match=r"^model.quantization='4bit' needs bitsandbytes: pip install"):
        lora.quantized_loading("4bit", lora.LoraSettings(), torch.bfloat16, cpu)
    monkeypatch.setattr(lora, "version", lambda name: "0.45.5")
    with pytest.raises(InputError, match=r"needs bitsandbytes >= 0.49 .*this environment has 0.45.5"):
        lora.quantized_loading("4bit", lora.LoraSettings(), torch.bfloat16, cpu)
    with pytest.raises(InputError, match="^model.quantization needs LoRA"):
        lora.quantized_loading("8bit", None, torch.bfloat16, cpu)


@pytest.mark.slow
def test_smollm2_qlora_fit_predict_and_export_merge_into_the_dequantized_weights(smollm2, tmp_path, capsys):
    """SmolLM2-135M-Instruct in 4-bit NF4 computing in bf16 on this CPU: a LoRA fit, greedy predictions, and the
    exported merged model (dense bf16) generating the same replies."""
    from transformers import AutoModelForCausalLM

    from finetune.cli import main

    path, _ = smollm2
    rows = [{"instruction": f"Repeat the word {word}.", "input": "", "output": word}
            for word in ("apple", "river", "mountain", "cloud", "garden", "window", "bridge", "candle")]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    common = [f"--model.backbone={path}", "--model.task=InstructionTuning", "--model.task.format=prompt",
              "--model.task.prompt={instruction}", "--model.task.completion_column=output",
              "--model.task.generation.max_new_tokens=8", "--model.quantization=4bit",
              "--model.backbone_dtype=bfloat16", "--trainer.enable_progress_bar=false", "--seed_everything=0"]
    main(["fit", *common, f"--data.train_file={train}", "--data.batch_size=4", "--trainer.max_steps=2",
          "--model.lora.target_modules=all-linear", f"--trainer.default_root_dir={tmp_path / 'fit'}"])
    checkpoint = sorted((tmp_path / "fit").rglob("*.ckpt"))[-1]
    out = tmp_path / "predictions.jsonl"
    main(["predict", *common, f"--ckpt_path={checkpoint}", f"--data.predict_file={train}",
          "--data.eval_batch_size=1", f"--predictions.output_file={out}", f"--trainer.default_root_dir={tmp_path}"])
    predicted = [json.loads(line)["generated_text"] for line in out.read_text().splitlines()]
    main(["export", f"--ckpt_path={checkpoint}", f"--output_dir={tmp_path / 'export'}", "--dtype=bfloat16"])
    console = capsys.readouterr()
    assert not [noise for noise in NOISE if noise in console.out + console.err]
    assert "Dequantized the 4bit backbone into bfloat16" in console.out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "merged", dtype="auto")
    assert merged.dtype == torch.bfloat16 and not hasattr(merged.config, "quantization_config")  # (--dtype)
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())
    module = FineTuneModule.load_from_checkpoint(str(checkpoint), map_location="cpu", weights_only=True)
    with autocast("cpu", torch.bfloat16):  # (the predict path, the merged model in place of the quantized one)
        again = predict_rows(module.task, merged.eval(), module.tokenizer, [{"instruction": r["instruction"]}
                                                                             for r in rows], batch_size=1)
    # bf16 rounds the 4-bit kernel's products and the dense merged weights' differently: a near tie may flip
    assert sum(a["generated_text"] == b for a, b in zip(again, predicted)) >= 7, (again, predicted)


@pytest.mark.slow
def test_qlora_run_killed_mid_epoch_resumes_to_the_uninterrupted_result_and_serves(llama64, toy, tmp_path):
    from finetune.serve.hosting import Hosted

    common = ("--model.quantization=4bit", "--model.backbone_dtype=bfloat16", "--trainer.max_epochs=3",
              "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=2",
              "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_top_k=0")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_fit(llama64, toy, whole, *common, f"--trainer.callbacks.dirpath={whole}/checkpoints")
    args = fit_args(llama64, toy, parts, "--trainer.max_epochs=2", *common, f"--trainer.callbacks.dirpath={parts}/"
                    "checkpoints", "--trainer.callbacks+=interrupt.SignalAtStep", "--trainer.callbacks.step=5")
    env = processes_env(str(TESTS))
    killed = subprocess.run([sys.executable, "-m", "finetune", *args], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_fit(llama64, toy, parts, *common, f"--trainer.callbacks.dirpath={parts}/checkpoints",
            f"--ckpt_path={parts}/checkpoints/last.ckpt")
    expected = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = torch.load(parts / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == expected["global_step"] == 8  # (the last periodic checkpoint of 9 steps)
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
    # the server answers as `finetune predict`'s path does, from the quantized checkpoint
    hosted = Hosted([("default", str(parts / "checkpoints" / "last.ckpt"))])
    rows = [{"text": row["text"]} for row in make_rows(6, seed=5)]
    module = FineTuneModule.load_from_checkpoint(str(parts / "checkpoints" / "last.ckpt"), map_location="cpu",
                                                 weights_only=True).eval()
    with module.autocast():
        direct = predict_rows(module.task, module.model, module.tokenizer, rows)
    assert hosted.predict([("default", row) for row in rows]) == direct
