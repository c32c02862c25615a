"""End to end on the real pretrained MiniLM and the shipped demo data, as README's first command runs it."""

import json
from pathlib import Path

import pytest
import torch

from conftest import MINILM, REPO
from finetune.cli import main, run

pytestmark = pytest.mark.slow
CONFIG = REPO / "configs" / "classification.yaml"


@pytest.fixture(scope="module")
def demo_fit(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cli = run(["fit", "--config", str(CONFIG), "--trainer.max_epochs=3", "--trainer.enable_progress_bar=false",
               f"--trainer.default_root_dir={root}", f"--predictions.output_file={root}/predictions.jsonl"])
    return root, cli


def test_demo_config_learns_the_shipped_data(demo_fit):
    _, cli = demo_fit
    assert cli.model.backbone == "sentence-transformers/all-MiniLM-L6-v2"  # resolved to the offline copy
    assert cli.model.task.labels == ["account", "billing", "shipping", "technical"]
    assert cli.trainer.callback_metrics["val/accuracy"] > 0.7  # chance: 0.25


def test_lora_checkpoint_is_a_small_fraction_of_the_backbone(demo_fit):
    root, _ = demo_fit
    checkpoint = next(root.rglob("last.ckpt"))
    backbone = Path(MINILM) / "model.safetensors"
    assert checkpoint.stat().st_size < 0.02 * backbone.stat().st_size


def test_demo_predict_and_export(demo_fit, tmp_path):
    root, _ = demo_fit
    checkpoint = next(root.rglob("last.ckpt"))
    out = tmp_path / "predictions.jsonl"
    main(["predict", "--config", str(CONFIG), f"--ckpt_path={checkpoint}", f"--predictions.output_file={out}",
          "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    n_inputs = len((REPO / "data" / "support_tickets" / "predict.jsonl").read_text().splitlines())
    assert len(rows) == n_inputs
    assert {row["label"] for row in rows} <= {"account", "billing", "shipping", "technical"}

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    main(["export", f"--ckpt_path={checkpoint}", f"--output_dir={tmp_path / 'export'}"])
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export" / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "export" / "merged")
    texts = [json.loads(line)["text"] for line in (REPO / "data/support_tickets/predict.jsonl").open()]
    with torch.no_grad():
        probs = torch.softmax(merged(**tokenizer(texts, padding=True, return_tensors="pt")).logits, -1)
    labels = [merged.config.id2label[i] for i in probs.argmax(-1).tolist()]
    assert labels == [row["label"] for row in rows]
    torch.testing.assert_close(probs.max(-1).values, torch.tensor([row["score"] for row in rows]), atol=1e-4, rtol=0)
