"""Summarization and translation: both model families, prompt masking, generation, metrics."""

import csv
import json
import random
from pathlib import Path

import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score import rouge_scorer

from conftest import SHARED, reversal_rows, write_jsonl
from finetune.chat import ChatFormat, GenerationSettings
from finetune.cli import main, run
from finetune.errors import InputError
from finetune.module import FineTuneModule
from finetune.tiny import CHATML_TEMPLATE
from tasks.summarization import Rouge, split_sentences
from tasks.translation import SacreBLEU, Translation

MULTI30K = SHARED / "data" / "multi30k" / "validation.jsonl"
needs_multi30k = pytest.mark.skipif(not MULTI30K.is_file(), reason="../shared/data/multi30k is not here")


def module_for(backbone, **task_args) -> FineTuneModule:
    module = FineTuneModule(backbone, Translation(**task_args), lora=None)
    module.configure_model()
    return module


def batch_of(module, rows, with_targets=True):
    task, tokenizer = module.task, module.tokenizer
    features = task.preprocess({k: [r[k] for r in rows] for k in rows[0]}, tokenizer, with_targets)
    return task.collate([{k: v[i] for k, v in features.items()} | {"index": i} for i in range(len(rows))], tokenizer,
                        with_targets)


@pytest.mark.parametrize("backbone", ["tiny_t5", "tiny_gpt2", "tiny_llama"])  # (the Llama with its chat template)
def test_both_families_learn_to_reverse_and_predict(backbone, request, tmp_path):
    path = request.getfixturevalue(backbone)
    rows = reversal_rows()
    train, val = write_jsonl(tmp_path / "t.jsonl", rows * 4), write_jsonl(tmp_path / "v.jsonl", rows)
    cli = run(["fit", f"--model.backbone={path}", "--model.task=Translation", f"--data.train_file={train}",
               f"--data.val_file={val}", "--model.lora=null", "--model.optimizer.lr=0.01", "--data.batch_size=8",
               "--trainer.max_epochs=40", "--model.task.generate_every_n_epochs=40", "--seed_everything=0",
               "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"])
    metrics = cli.trainer.callback_metrics
    assert metrics["val/loss"] < 0.3  # from ~6 (uniform over 400 tokens)
    assert metrics["val/bleu"] == pytest.approx(100) and metrics["val/chrf"] == pytest.approx(100)

    predict_file = write_jsonl(tmp_path / "p.jsonl", [{"source": r["source"]} for r in rows])
    out = tmp_path / "predictions.jsonl"
    (ckpt,) = tmp_path.rglob("*.ckpt")
    main(["predict", f"--model.backbone={path}", "--model.task=Translation", f"--ckpt_path={ckpt}",
          f"--data.predict_file={predict_file}", f"--predictions.output_file={out}",
          "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"])
    predicted = [json.loads(line)["generated_text"] for line in out.read_text().splitlines()]
    assert predicted == [r["target"] for r in rows]  # the prompt is stripped, order kept


def test_prompt_and_padding_are_excluded_from_the_decoder_only_loss(tiny_gpt2):
    module = module_for(tiny_gpt2)
    batch = batch_of(module, [{"source": "good bad nice", "target": "nice bad good"},
                              {"source": "river stone", "target": "stone"}])
    prompt_lengths = [int(m.sum()) for m in batch["prompt_attention_mask"]]
    for row, length in zip(batch["labels"], prompt_lengths):
        assert (row[:length] == -100).all()  # the prompt
        real = row[length:][row[length:] != -100]
        assert real[-1] == module.tokenizer.eos_token_id
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()  # the padding

    loss = module.task.loss(module.task.forward(module.model, batch), batch)
    # the same loss by hand: mean cross-entropy of the target tokens only
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], labels[keep]))
    # and with label smoothing, torch's
    smoothed = module_for(tiny_gpt2, label_smoothing=0.1)
    smoothed.model.load_state_dict(module.model.state_dict())
    torch.testing.assert_close(smoothed.task.loss(smoothed.task.forward(smoothed.model, batch), batch),
                               F.cross_entropy(logits[keep], labels[keep], label_smoothing=0.1))


def test_seq2seq_label_padding_and_label_smoothing(tiny_t5):
    rows = [{"source": "good bad", "target": "bad good nice nice"}, {"source": "river", "target": "stone"}]
    for smoothing in (0.0, 0.1):
        module = module_for(tiny_t5, label_smoothing=smoothing)
        batch = batch_of(module, rows)
        assert (batch["labels"][1] == -100).sum() > 0  # the short target is padded with -100
        outputs = module.task.forward(module.model, batch)
        keep = batch["labels"] != -100
        expected = F.cross_entropy(outputs.logits[keep], batch["labels"][keep], label_smoothing=smoothing)
        torch.testing.assert_close(module.task.loss(outputs, batch), expected)


def test_left_padded_generation_equals_generating_each_prompt_alone(tiny_gpt2):
    module = module_for(tiny_gpt2, generation=GenerationSettings(max_new_tokens=6))
    rows = [{"source": "good bad nice great"}, {"source": "river"}, {"source": "lamp door stone"}]
    together = module.task.generate(module.model.eval(), batch_of(module, rows, with_targets=False), module.tokenizer)
    alone = [module.task.generate(module.model, batch_of(module, [r], with_targets=False), module.tokenizer)[0]
             for r in rows]
    assert together == alone


def test_beam_search_and_settings_reach_generate(tiny_t5):
    module = module_for(tiny_t5, generation=GenerationSettings(num_beams=4, max_new_tokens=5, no_repeat_ngram_size=2))
    kwargs = module.task.generation.generate_kwargs()
    assert kwargs == {"max_new_tokens": 5, "num_beams": 4, "do_sample": False, "length_penalty": 1.0,
                      "no_repeat_ngram_size": 2}
    texts = module.task.generate(module.model.eval(), batch_of(module, reversal_rows(3)), module.tokenizer)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_generation_runs_every_n_epochs_only(tiny_t5, tmp_path):
    rows = reversal_rows()
    train, val = write_jsonl(tmp_path / "t.jsonl", rows), write_jsonl(tmp_path / "v.jsonl", rows)
    run(["fit", f"--model.backbone={tiny_t5}", "--model.task=Summarization", "--model.task.source_column=source",
         "--model.task.target_column=target", "--model.task.generate_every_n_epochs=2", f"--data.train_file={train}",
         f"--data.val_file={val}", "--trainer.max_epochs=4", "--trainer.enable_progress_bar=false",
         "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}"])
    (path,) = tmp_path.rglob("metrics.csv")
    val_rows = [r for r in csv.DictReader(path.open()) if r["val/loss"]]
    assert [r["epoch"] for r in val_rows] == ["0", "1", "2", "3"]  # loss every epoch
    assert [bool(r["val/rougeL"]) for r in val_rows] == [False, True, False, True]  # ROUGE every 2nd


# --- metrics equal the reference packages on real sentences --------------------------------

def perturbed(sentences, seed=0):
    rng = random.Random(seed)
    out = []
    for s in sentences:
        words = s.split()
        if len(words) > 3:
            del words[rng.randrange(len(words))]
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        out.append(" ".join(words))
    return out


@needs_multi30k
def test_rouge_equals_rouge_score_with_stemming():
    rows = [json.loads(line) for line in MULTI30K.open()][:200]
    # multi-sentence "summaries" so ROUGE-Lsum differs from ROUGE-L
    references = [f"{a['source']} {b['source']}" for a, b in zip(rows[::2], rows[1::2])]
    predictions = perturbed(references)
    metric = Rouge()
    for start in range(0, len(references), 32):  # batch by batch, as validation does
        metric.update(predictions[start:start + 32], references[start:start + 32])
    ours = metric.compute()
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    scores = [scorer.score(split_sentences(r), split_sentences(p)) for r, p in zip(references, predictions)]
    for key in ["rouge1", "rouge2", "rougeL", "rougeLsum"]:
        reference = 100 * sum(s[key].fmeasure for s in scores) / len(scores)
        assert float(ours[key]) == pytest.approx(reference, abs=1e-4), key
        print(f"{key}: ours {float(ours[key]):.4f}  rouge-score {reference:.4f}")
    assert ours["rougeLsum"] != ours["rougeL"]


@needs_multi30k
def test_bleu_and_chrf_equal_sacrebleu():
    references = [json.loads(line)["target"] for line in MULTI30K.open()][:300]
    predictions = perturbed(references, seed=1)
    bleu, chrf = SacreBLEU(sacrebleu.BLEU(tokenize="13a")), SacreBLEU(sacrebleu.CHRF())
    for start in range(0, len(references), 64):
        bleu.update(predictions[start:start + 64], references[start:start + 64])
        chrf.update(predictions[start:start + 64], references[start:start + 64])
    expected_bleu = sacrebleu.corpus_bleu(predictions, [references]).score
    expected_chrf = sacrebleu.corpus_chrf(predictions, [references]).score
    print(f"BLEU: ours {float(bleu.compute()):.6f}  sacrebleu {expected_bleu:.6f}")
    print(f"chrF: ours {float(chrf.compute()):.6f}  sacrebleu {expected_chrf:.6f}")
    assert float(bleu.compute()) == pytest.approx(expected_bleu, abs=1e-6)
    assert float(chrf.compute()) == pytest.approx(expected_chrf, abs=1e-6)


def test_bleu_matches_sacrebleu_exp_smoothing_when_no_4gram_matches():
    predictions, references = ["a cat sat on mat", "the dog"], ["the cat sat on the mat", "a dog ran"]
    metric = SacreBLEU(sacrebleu.BLEU())
    metric.update(predictions, references)
    expected = sacrebleu.corpus_bleu(predictions, [references]).score
    assert 0 < expected and float(metric.compute()) == pytest.approx(expected, abs=1e-6)


# --- data --------------------------------------------------------------------------------------

def test_nested_translation_format_gives_the_same_features(tiny_t5):
    flat = reversal_rows(3)
    nested = [{"translation": {"en": r["source"], "xx": r["target"]}} for r in flat]
    a = module_for(tiny_t5)
    b = module_for(tiny_t5, source_lang="en", target_lang="xx")
    assert [(c.option, c.field, c.target) for c in b.task.columns()] == [("translation_column", "en", False),
                                                                        ("translation_column", "xx", True)]
    for key in ("input_ids", "labels"):
        torch.testing.assert_close(batch_of(a, flat)[key], batch_of(b, nested)[key])


def test_the_prompt_template_fills_in_the_source_and_other_columns(tiny_t5):
    module = module_for(tiny_t5, prompt="reverse {mood}: {source}")
    batch = batch_of(module, [{"source": "good", "target": "good", "mood": "sad"}])
    assert module.tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True).strip() == "reverse sad: good"
    with pytest.raises(InputError, match=r"prompt: 'reverse \{mood\}: \{source\}' names \{mood\}, which is neither"):
        batch_of(module, [{"source": "good", "target": "good"}])


def test_default_lora_targets_per_family(tiny_t5, tiny_gpt2, tmp_path):
    from transformers import MarianConfig, MarianMTModel

    marian = tmp_path / "marian"
    MarianMTModel(MarianConfig(vocab_size=400, d_model=16, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                               decoder_ffn_dim=32, pad_token_id=0, decoder_start_token_id=0)).save_pretrained(marian)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (marian / name).write_bytes((Path(tiny_t5) / name).read_bytes())
    expected = {tiny_t5: {"q", "v"}, tiny_gpt2: {"c_attn"}, str(marian): {"q_proj", "v_proj"}}
    for backbone, targets in expected.items():
        module = FineTuneModule(backbone, "translation")
        module.configure_model()
        adapted = {n.split(".")[-4] for n, p in module.named_parameters() if p.requires_grad and "lora_A" in n}
        assert adapted == targets, backbone
        assert sum(p.numel() for p in module.parameters() if p.requires_grad) < 0.2 * sum(
            p.numel() for p in module.parameters())  # no full head copied next to the adapter


@pytest.mark.parametrize("rows, source, message", [
    ([{"source": "a", "tgt": "b"}], "t", r"has no column 'target' \(model.task.init_args.target_column\)"),
    ([{"source": "a", "target": "b"}, {"source": "c", "target": "  "}], "t", r"row 2: column 'target' holds only"),
    ([{"source": "a", "target": None}], "t", r"row 1: column 'target' is missing or null"),
])
def test_bad_generation_inputs_are_named(tiny_t5, tmp_path, rows, source, message):
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(SystemExit):
        main(["fit", f"--model.backbone={tiny_t5}", "--model.task=translation", f"--data.train_file={train}",
              f"--trainer.default_root_dir={tmp_path}"])
    with pytest.raises(InputError, match=message):
        run(["fit", f"--model.backbone={tiny_t5}", "--model.task=translation", f"--data.train_file={train}",
             f"--trainer.default_root_dir={tmp_path}"])


def test_nested_rows_missing_the_language_are_named(tiny_t5, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"translation": {"en": "a", "fr": "b"}}])
    with pytest.raises(InputError, match=r"row 1: column 'translation' has no key 'de' \(it has 'en', 'fr'\)"):
        run(["fit", f"--model.backbone={tiny_t5}", "--model.task=Translation", "--model.task.source_lang=en",
             "--model.task.target_lang=de", f"--data.train_file={train}", f"--trainer.default_root_dir={tmp_path}"])


@pytest.mark.parametrize("name", ["summarization", "translation"])
def test_ready_configs_parse(name, capsys):
    config = Path(__file__).parents[1] / "configs" / f"{name}.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    assert f"class_path: tasks.{name}.{name.title()}" in capsys.readouterr().out


# --- chat templates (instruct models) --------------------------------------------------------------
def test_a_chat_template_makes_the_prompt_the_user_turn_and_the_loss_the_reply_and_its_end_of_turn(tiny_llama):
    module = module_for(tiny_llama, prompt="Reverse: {source}", chat=ChatFormat(system_prompt="Be brief."))
    task, tokenizer = module.task, module.tokenizer
    assert (task.decoder_only, task.chat.chat_template, task.chat.stop_token) == (True, True, "<|im_end|>")
    batch = batch_of(module, [{"source": "good cat", "target": "cat good"}, {"source": "a", "target": "dog sat"}])
    prompt = tokenizer.decode(batch["prompt_ids"][0][batch["prompt_attention_mask"][0].bool()])
    assert prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nReverse: good cat<|im_end|>\n"
                      "<|im_start|>assistant\n")
    for row, reply in enumerate(["cat good", "dog sat"]):
        in_loss = batch["labels"][row][batch["labels"][row] != -100]
        assert tokenizer.decode(in_loss) == reply + "<|im_end|>"  # the stop token is trained, the prompt is not
        # the sequence the loss is on is what the template renders for the whole conversation
        rendered = tokenizer.apply_chat_template(
            [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": f"Reverse: {['good cat', 'a'][row]}"},
             {"role": "assistant", "content": reply}], tokenize=False)
        sequence = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        assert rendered.startswith(tokenizer.decode(sequence))
        assert rendered[len(tokenizer.decode(sequence)):] == "\n"  # only the template's newline after the stop token


def test_chat_template_can_be_switched_off_and_is_refused_where_it_cannot_apply(tiny_llama, tiny_gpt2, tiny_t5):
    plain = module_for(tiny_llama, chat=ChatFormat(chat_template=False))
    batch = batch_of(plain, [{"source": "good cat", "target": "cat good"}])
    assert plain.tokenizer.decode(batch["prompt_ids"][0]) == "good cat\n"
    assert module_for(tiny_gpt2).task.chat.chat_template is False  # a base model: no template, today's format
    with pytest.raises(InputError, match=r"chat_template: the tokenizer of .* has no chat template \(a base model\)"):
        module_for(tiny_gpt2, chat=ChatFormat(chat_template=True))
    with pytest.raises(InputError, match=r"chat_template: an encoder-decoder backbone"):
        module_for(tiny_t5, chat=ChatFormat(chat_template=True))
    with pytest.raises(InputError, match=r"stop_token: '<\|nope\|>' is not a token of"):
        module_for(tiny_llama, chat=ChatFormat(stop_token="<|nope|>"))


def test_a_template_that_does_not_render_prompt_then_reply_stops_before_training(tiny_llama):
    # a stop token that is not what the template ends a turn with: refused at setup, before any data
    with pytest.raises(InputError, match=r"chat.chat_template: the chat template of .* does not render the "
                                         r"conversation 'Hi'... as its turns one after the other, each assistant "
                                         r"reply followed by the stop token '<\|im_start\|>': at turn 2 it renders "
                                         r"'.*Hello<\|im_end\|>"):
        module_for(tiny_llama, chat=ChatFormat(stop_token="<|im_start|>"))
    # every row is checked: a template that trims the reply does not render this row's reply as it is
    module = module_for(tiny_llama)
    module.tokenizer.chat_template = CHATML_TEMPLATE.replace("message['content']", "message['content'] | trim")
    batch_of(module, [{"source": "good cat", "target": "cat good"}])
    with pytest.raises(InputError, match=r"does not render the conversation 'good cat'... .* at turn 2 it renders "
                                         r"'.*\\ncat good<\|im_end\|>.*' where '.*\\n cat good<\|im_end\|>' "
                                         r"was expected"):
        batch_of(module, [{"source": "good cat", "target": "cat good"}, {"source": "good cat", "target": " cat good"}])
