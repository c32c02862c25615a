"""The real pretrained LLM, SmolLM2-135M-Instruct (packaged GGUF, converted once): a translation LoRA through its
chat template from fit to predict to export, and a classification head on the decoder. A few steps each."""

import json

import pytest
import torch

from conftest import write_jsonl
from finetune.cli import main, run

pytestmark = pytest.mark.slow

PAIRS = [("A dog runs in the park.", "Ein Hund rennt im Park."), ("Two men are eating.", "Zwei Männer essen."),
         ("A girl is reading a book.", "Ein Mädchen liest ein Buch."), ("The sky is blue.", "Der Himmel ist blau."),
         ("A man rides a bike.", "Ein Mann fährt Fahrrad."), ("Children play outside.", "Kinder spielen draußen."),
         ("A woman sings.", "Eine Frau singt."), ("The cat sleeps.", "Die Katze schläft.")]
PROMPT = "Translate into German: {source}"


def test_translation_lora_fit_predict_export_and_the_merged_model_generates_the_same(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = smollm2
    rows = [{"source": s, "target": t} for s, t in PAIRS]
    train, predict_file = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(
        tmp_path / "predict.jsonl", [{"source": r["source"]} for r in rows[:4]])
    common = [f"--model.backbone={path}", "--model.task=Translation",
              "--model.task.init_args=" + json.dumps({"prompt": PROMPT}),
              "--model.task.generation.max_new_tokens=12", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", "--seed_everything=0"]
    cli = run(["fit", *common, f"--data.train_file={train}", "--data.batch_size=4", "--trainer.max_steps=2",
               "--model.optimizer.lr=1e-3", f"--trainer.default_root_dir={tmp_path / 'fit'}"])
    task = cli.model.task
    assert (task.chat.chat_template, task.chat.stop_token) == (True, "<|im_end|>")  # the instruct model's own format
    checkpoint = sorted((tmp_path / "fit").rglob("*.ckpt"))[-1]

    out = tmp_path / "predictions.jsonl"
    main(["predict", *common, f"--ckpt_path={checkpoint}", f"--data.predict_file={predict_file}",
          "--data.eval_batch_size=1", f"--predictions.output_file={out}",  # (unpadded, as generated below)
          f"--trainer.default_root_dir={tmp_path / 'predict'}"])
    predicted = [json.loads(line)["generated_text"] for line in out.read_text().splitlines()]
    assert len(predicted) == 4 and all(predicted)
    assert not any("<|im" in text or "assistant" in text for text in predicted)  # no template in the output

    main(["export", f"--ckpt_path={checkpoint}", f"--output_dir={tmp_path / 'export'}"])
    merged = tmp_path / "export" / "merged"
    tokenizer, model = AutoTokenizer.from_pretrained(merged), AutoModelForCausalLM.from_pretrained(merged).eval()
    for row, expected in zip(rows[:4], predicted):
        text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT.format(source=row["source"])}],
                                             tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=12, do_sample=False,
                                    eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"))
        reply = tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        assert reply == expected


def test_classification_head_on_the_decoder_trains_and_is_saved_with_the_adapter(smollm2, tmp_path):
    path, _ = smollm2
    words = {"positive": ["great", "wonderful", "lovely", "superb"], "negative": ["awful", "boring", "dreadful", "bad"]}
    rows = [{"text": f"The film was {w} and the acting {v}.", "label": label}
            for label, ws in words.items() for w in ws for v in ws[:2]]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cli = run(["fit", f"--model.backbone={path}", "--model.task=TextClassification", f"--data.train_file={train}",
               f"--data.val_file={train}", "--data.batch_size=8", "--trainer.max_steps=2",
               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--seed_everything=0",
               f"--trainer.default_root_dir={tmp_path}"])
    model = cli.model.model
    assert model.base_model.model.config.pad_token_id == cli.model.tokenizer.pad_token_id  # the last real token
    checkpoint = torch.load(sorted(tmp_path.rglob("*.ckpt"))[-1], weights_only=True)
    saved = set(checkpoint["state_dict"])
    assert any("score" in key and "modules_to_save" in key for key in saved)  # the head, in full
    assert any("lora_A" in key and "q_proj" in key for key in saved)  # PEFT's default targets for Llama
