"""The module's switches: LoRA variants, full fine-tuning, gradient checkpointing, precision."""

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from conftest import fit_args, make_rows, write_jsonl
from finetune.cli import main, run
from finetune.data import DataModule
from finetune.errors import InputError
from finetune.lora import LoraSettings
from finetune.module import CHECKPOINT_FORMAT, FineTuneModule
from finetune.pipeline import connect
from tasks.classification import TextClassification


def built(backbone, lora, **kwargs) -> FineTuneModule:
    module = FineTuneModule(backbone, TextClassification(labels=["a", "b", "c"]), lora=lora, **kwargs)
    module.configure_model()
    return module


def trainable(module) -> dict[str, int]:
    return {n: p.numel() for n, p in module.named_parameters() if p.requires_grad}


def test_default_lora_targets_bert_query_and_value_and_trains_the_head(tiny_bert):
    names = trainable(built(tiny_bert, LoraSettings()))
    assert any("query.lora_A" in n for n in names) and any("value.lora_B" in n for n in names)
    assert not any("key.lora" in n or "dense.lora" in n for n in names)
    assert any("classifier.modules_to_save" in n for n in names)
    assert not any("embeddings" in n for n in names)


def test_all_linear_and_explicit_targets(tiny_bert):
    all_linear = trainable(built(tiny_bert, LoraSettings(target_modules="all-linear")))
    assert any("key.lora_A" in n for n in all_linear) and any("output.dense.lora_A" in n for n in all_linear)
    assert not any("classifier.lora" in n for n in all_linear)  # the head is trained in full, not adapted
    only_key = trainable(built(tiny_bert, LoraSettings(target_modules=["key"])))
    assert any("key.lora_A" in n for n in only_key) and not any("query.lora" in n for n in only_key)


def test_dora_and_rslora_switches(tiny_bert):
    dora = built(tiny_bert, LoraSettings(use_dora=True))
    assert any("lora_magnitude_vector" in n for n in trainable(dora))
    rslora = built(tiny_bert, LoraSettings(r=4, alpha=8, use_rslora=True)).model
    layer = rslora.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)


def test_no_lora_fine_tunes_every_weight(tiny_bert):
    module = built(tiny_bert, None)
    assert all(p.requires_grad for p in module.parameters())
    assert "model.bert.embeddings.word_embeddings.weight" in trainable(module)


def test_a_rank_above_a_wrapped_module_width_is_refused(tiny_bert):
    """(issue 25: r=1000 on 384-wide MiniLM trained 29% of the weights into a 110 MB checkpoint)"""
    layer = built(tiny_bert, LoraSettings(r=32)).model.base_model.model.bert.encoder.layer[0]
    assert layer.attention.self.query.lora_A["default"].weight.shape == (32, 32)  # the full width is a rank
    with pytest.raises(InputError, match=r"^model.lora.r: 33 is above the width of the LoRA-wrapped module "
                                         r"'bert.encoder.layer.0.intermediate.dense' \(32 in, 64 out\); set it to "
                                         r"at most 32 \(8-64 is usual\)$"):
        built(tiny_bert, LoraSettings(r=33, target_modules=["intermediate.dense"]))


def test_fit_with_a_rank_above_the_model_width_stops_before_training(tiny_bert, toy_files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tiny_bert, toy_files, tmp_path, "--model.lora.r=1000"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "finetune: error: model.lora.r: 1000 is above the width of the LoRA-wrapped module 'bert." in err
    assert "set it to at most 32" in err and not list(tmp_path.rglob("*.ckpt"))


def test_bad_lora_targets_are_named(tiny_bert):
    with pytest.raises(ValueError, match=r"model.lora.target_modules=\['nonexistent'\]"):
        built(tiny_bert, LoraSettings(target_modules=["nonexistent"]))


def test_gradient_checkpointing_gives_the_same_gradients(tiny_bert):
    batch = built(tiny_bert, LoraSettings()).tokenizer(["good nice", "awful bad sad"], padding=True,
                                                       return_tensors="pt")
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = built(tiny_bert, LoraSettings(dropout=0.0), gradient_checkpointing=checkpointing).eval()
        backbone = module.model.base_model.model
        checkpointing_enabled = getattr(backbone, "is_activation_checkpointing", None)  # transformers >= 5.25
        if checkpointing_enabled is None:
            checkpointing_enabled = backbone.is_gradient_checkpointing
        assert checkpointing_enabled == checkpointing
        module.model.train()
        for m in module.modules():  # no dropout, so both runs compute the same function
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        logits = module.model(**batch).logits
        logits.sum().backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("precision", ["bf16-mixed", "32"])
def test_precision_switch_trains(tiny_bert, toy_files, tmp_path, precision):
    cli = run(fit_args(tiny_bert, toy_files, tmp_path, f"--trainer.precision={precision}", "--trainer.max_steps=3"))
    assert cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_hf_dataset_by_name_or_directory(tiny_bert, tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", make_rows(24, seed=1))
    write_jsonl(folder / "validation.jsonl", make_rows(9, seed=2))
    cli = run(["fit", f"--model.backbone={tiny_bert}", "--model.task=classification", f"--data.dataset={folder}",
               "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}",
               "--trainer.enable_progress_bar=false"])
    assert len(cli.datamodule.features["train"]) == 24 and len(cli.datamodule.features["val"]) == 9
    assert "val/accuracy" in cli.trainer.callback_metrics


def test_cli_prints_input_errors_without_a_traceback(tiny_bert, toy_files, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tiny_bert, toy_files, tmp_path, "--model.task.label_column=sentiment"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "finetune: error: data.train_file" in err and "has no column 'sentiment'" in err
    assert "Traceback" not in err


def test_strategy_configs_compose_with_task_configs(capsys):
    configs = Path(__file__).parents[1] / "configs"
    for strategy in ("ddp", "qlora"):
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(configs / "classification.yaml"), "--config",
                  str(configs / "strategies" / f"{strategy}.yaml"), "--print_config"])
        out = capsys.readouterr().out
        assert "TextClassification" in out
        assert ("DDPStrategy" if strategy == "ddp" else "quantization: 4bit") in out


class RecordSeeds(Callback):
    def __init__(self):
        self.seeds = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seeds.append((trainer.global_step, torch.initial_seed()))


def test_accumulated_micro_batches_get_their_own_dropout_masks(tiny_bert, toy_files):
    seeds = RecordSeeds()
    module = FineTuneModule(tiny_bert, TextClassification())
    data = DataModule(train_file=toy_files["train"], batch_size=8)
    connect(module, data, "fit")
    Trainer(accelerator="cpu", max_steps=3, accumulate_grad_batches=2, callbacks=[seeds], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False).fit(module, data)
    assert len(seeds.seeds) == 6 and len({seed for _, seed in seeds.seeds}) == 6


def test_a_checkpoint_must_match_the_trainable_weights_but_may_hold_the_frozen_ones(tiny_bert):
    def module(targets=None):
        task = TextClassification(labels=["a", "b"])
        built = FineTuneModule(tiny_bert, task, lora=LoraSettings(target_modules=targets))
        built.configure_model()
        return built

    # as DeepSpeed saves it: frozen backbone included
    whole = {"state_dict": module().state_dict(), "finetune_format": CHECKPOINT_FORMAT}
    loading = module()
    loading.on_load_checkpoint(whole)
    assert set(whole["state_dict"]) == loading.trainable_names()

    other_lora = {"state_dict": module("all-linear").trainable_state_dict(), "finetune_format": CHECKPOINT_FORMAT}
    with pytest.raises(InputError, match=r"checkpoint does not match this model's trainable weights \(missing: \[\]; "
                                         r"unexpected: \['model.*lora_A.*\]\.\.\.\). Was it written with another"):
        module().on_load_checkpoint(other_lora)
