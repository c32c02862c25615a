"""Instruction tuning and language modelling: loss masks, formats, windows, packing, perplexity, bad input."""

import json
import math
import random
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import KIT_PROCESSES, SHARED, WORDS, write_jsonl
from finetune.chat import ChatFormat, GenerationSettings
from finetune.cli import main, run
from finetune.errors import InputError
from finetune.files import read_data_file
from finetune.generation import IGNORE
from finetune.module import FineTuneModule
from finetune.testing import check_task
from tasks.instruction_tuning import InstructionTuning, TokenScores

ALPACA = SHARED / "data" / "alpaca"
VOCABULARY = sum(WORDS.values(), [])


def module_for(backbone, **options) -> FineTuneModule:
    module = FineTuneModule(backbone, InstructionTuning(**options), lora=None)
    module.configure_model()
    module.model.eval()
    return module


def features_of(task, tokenizer, rows, with_targets=True) -> list[dict]:
    features = task.preprocess({k: [r[k] for r in rows] for k in rows[0]}, tokenizer, with_targets)
    features.pop("overflow_to_sample_mapping", None)
    return [{k: v[i] for k, v in features.items()} for i in range(len(features["input_ids"]))]


def turn(role, content):
    return {"role": role, "content": content}


def conversations(n, seed=0, turns=3, most=4) -> list[dict]:
    """Learnable conversations: the assistant repeats the user's words reversed, over one to `turns` turns."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        messages = [turn("system", "reverse")] if i % 3 == 0 else []
        for _ in range(1 + i % turns):
            words = rng.sample(VOCABULARY, rng.randint(2, most))
            messages += [turn("user", " ".join(words)), turn("assistant", " ".join(reversed(words)))]
        rows.append({"messages": messages})
    return rows


def test_every_assistant_reply_and_its_end_of_turn_are_the_loss_and_nothing_else(tiny_llama):
    module = module_for(tiny_llama)
    task, tokenizer = module.task, module.tokenizer
    assert (task.chat.chat_template, task.chat.stop_token, tokenizer.pad_token) == (True, "<|im_end|>", "<|im_end|>")
    messages = [turn("system", "be brief"), turn("user", "good day"), turn("assistant", "great nice"),
                turn("user", "sad cloud"), turn("assistant", "cloud sad river")]
    (feature,) = features_of(task, tokenizer, [{"messages": messages}])
    ids, labels = feature["input_ids"], feature["labels"]
    # the tokens are the template's text (its trailing newline after the last turn is not trained on)
    assert tokenizer.decode(ids) + "\n" == tokenizer.apply_chat_template(messages, tokenize=False)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    replies = [tokenizer("great nice", add_special_tokens=False)["input_ids"] + [stop],
               tokenizer("cloud sad river", add_special_tokens=False)["input_ids"] + [stop]]
    in_loss = [label for label in labels if label != IGNORE]
    assert in_loss == replies[0] + replies[1]
    assert [i for i, label in zip(ids, labels) if label != IGNORE] == in_loss  # labels are the tokens themselves
    # the loss spans are contiguous: the replies end the sequence and sit right after each generation prompt
    assert labels[-len(replies[1]):] == replies[1]

    # train_on_prompt: every token is a target
    everything = InstructionTuning(train_on_prompt=True, chat=ChatFormat(chat_template=True, stop_token="<|im_end|>"))
    (whole,) = features_of(everything, tokenizer, [{"messages": messages}])
    assert whole["input_ids"] == ids and whole["labels"] == ids

    # in a batch, padding (the pad token is <|im_end|> too) is out of the loss, the stop token in it
    short = [turn("user", "door"), turn("assistant", "lamp")]
    batch = task.collate(features_of(task, tokenizer, [{"messages": messages}, {"messages": short}]), tokenizer, True)
    length = int(batch["attention_mask"][1].sum())
    assert (batch["labels"][1, length:] == IGNORE).all() and batch["labels"][1, length - 1] == stop
    assert task.loss_weight(batch) == len(in_loss) + len(tokenizer("lamp", add_special_tokens=False)["input_ids"]) + 1
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    keep = batch["labels"][:, 1:] != IGNORE
    by_hand = F.cross_entropy(logits[:, :-1][keep], batch["labels"][:, 1:][keep])
    torch.testing.assert_close(task.loss(task.forward(module.model, batch), batch), by_hand)


def test_predict_prompts_end_with_the_generation_prompt_after_the_last_user_turn(tiny_llama):
    module = module_for(tiny_llama, chat=ChatFormat(system_prompt="be kind"))
    task, tokenizer = module.task, module.tokenizer
    messages = [turn("user", "good"), turn("assistant", "nice"), turn("user", "sad"), turn("assistant", "bad")]
    rows = [{"messages": messages}, {"messages": messages[:3]}]  # ending with an assistant turn, or not
    prompts = [tokenizer.decode(f["input_ids"]) for f in features_of(task, tokenizer, rows, with_targets=False)]
    expected = tokenizer.apply_chat_template([turn("system", "be kind"), *messages[:3]], tokenize=False,
                                             add_generation_prompt=True)
    assert prompts == [expected, expected] and expected.endswith("<|im_start|>user\nsad<|im_end|>\n"
                                                                 "<|im_start|>assistant\n")


def test_prompt_format_fills_the_template_with_the_chat_template_or_the_plain_format(tiny_llama, tiny_gpt2):
    rows = [{"instruction": "reverse good bad", "input": "", "output": "bad good"},
            {"instruction": "reverse", "input": "sad cloud", "output": "cloud sad"}]
    chat = module_for(tiny_llama, format="prompt")
    tokenizer = chat.tokenizer
    features = features_of(chat.task, tokenizer, rows)
    users = ["reverse good bad", "reverse\n\nsad cloud"]  # (no trailing blank lines when the input is empty)
    for feature, user, row in zip(features, users, rows):
        rendered = tokenizer.apply_chat_template([turn("user", user), turn("assistant", row["output"])],
                                                 tokenize=False)
        assert tokenizer.decode(feature["input_ids"]) + "\n" == rendered
        assert tokenizer.decode([t for t in feature["labels"] if t != IGNORE]) == row["output"] + "<|im_end|>"

    plain = module_for(tiny_gpt2, format="prompt")  # no chat template: prompt, newline, reply, eos
    assert (plain.task.chat.chat_template, plain.task.chat.stop_token) == (False, "</s>")
    features = features_of(plain.task, plain.tokenizer, rows)
    tok = plain.tokenizer
    for feature, user, row in zip(features, users, rows):
        prompt = tok(user + "\n")["input_ids"]
        reply = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert feature["input_ids"] == prompt + reply and feature["labels"] == [IGNORE] * len(prompt) + reply
    (predict,) = features_of(plain.task, tok, [{"instruction": "reverse", "input": "sad"}], with_targets=False)
    assert predict["input_ids"] == tok("reverse\n\nsad\n")["input_ids"]


def test_raw_text_becomes_windows_that_predict_every_token_but_the_first_once(tiny_llama):
    module = module_for(tiny_llama, format="text", max_length=8)
    task, tokenizer = module.task, module.tokenizer
    texts = [" ".join(VOCABULARY[:9]), "good", "the cat sat on the mat"]
    features = task.preprocess({"text": texts}, tokenizer, True)
    for example, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        windows = [w for w, i in zip(features["labels"], features["overflow_to_sample_mapping"]) if i == example]
        assert all(len(w) <= 8 for w in windows)
        assert [t for w in windows for t in w[1:]] == ids[1:]  # each window's first token is context only
        assert windows[0][0] == ids[0]
    assert len(tokenizer(texts[0])["input_ids"]) > 8 and features["overflow_to_sample_mapping"].count(0) > 1

    # through the data module: the windows map back to their example, which `predict` continues from its end
    batch = task.collate([{k: v[i] for k, v in features.items() if k != "overflow_to_sample_mapping"}
                          for i in range(len(features["input_ids"]))], tokenizer, True)
    assert task.loss_weight(batch) == sum(len(tokenizer(t)["input_ids"]) - 1 for t in texts)
    with pytest.warns(UserWarning, match="^1 of 1 prompts are longer than .*=8 tokens; they keep their last 8"):
        (prompt,) = task.preprocess({"text": [texts[0]]}, tokenizer, False)["input_ids"]
    assert prompt == tokenizer(texts[0])["input_ids"][-8:]


def per_token_losses(task, model, batch) -> torch.Tensor:
    """The cross-entropy of every target token, in row-major order (examples in order, packed or not)."""
    return -task.forward(model, batch).logps


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_and_unpacked_batches_give_the_same_loss_on_every_token(tiny_llama, attention):
    unpacked, packed = module_for(tiny_llama, max_length=200), module_for(tiny_llama, max_length=200, packing=True)
    for module in (unpacked, packed):
        module.model.set_attn_implementation(attention)
    tokenizer = unpacked.tokenizer
    features = features_of(unpacked.task, tokenizer, conversations(12, seed=3))
    lengths = [len(f["input_ids"]) for f in features]
    assert min(lengths) < 50 and 100 < max(lengths) < 200  # (various lengths: several examples share a row)

    plain_batch = unpacked.task.collate([dict(f) for f in features], tokenizer, True)
    packed_batch = packed.task.collate([dict(f) for f in features], tokenizer, True)
    assert packed_batch["input_ids"].shape[0] < len(features) and packed_batch["input_ids"].shape[1] <= 200
    assert "attention_mask" not in packed_batch  # (attention follows the restarting position ids)
    # every example whole, in order, its position ids restarting at 0; a row ends where the next does not fit
    row, offset = 0, 0
    for feature in features:
        ids = feature["input_ids"]
        if offset + len(ids) > 200:
            row, offset = row + 1, 0
        assert packed_batch["input_ids"][row, offset:offset + len(ids)].tolist() == ids
        assert packed_batch["position_ids"][row, offset:offset + len(ids)].tolist() == list(range(len(ids)))
        assert packed_batch["labels"][row, offset] == IGNORE  # (no prediction across the boundary)
        offset += len(ids)
    assert row == packed_batch["input_ids"].shape[0] - 1
    real = sum(lengths)
    assert 1 - real / packed_batch["input_ids"].numel() < 1 - real / plain_batch["input_ids"].numel()  # padding

    assert packed.task.loss_weight(packed_batch) == unpacked.task.loss_weight(plain_batch)
    with torch.no_grad():
        expected = per_token_losses(unpacked.task, unpacked.model, plain_batch)
        found = per_token_losses(packed.task, packed.model, packed_batch)
        torch.testing.assert_close(found, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed.task.loss(packed.task.forward(packed.model, packed_batch), packed_batch),
                                   expected.mean(), atol=1e-5, rtol=1e-5)
        # (the test can fail: with positions that do not restart, examples attend to the ones before them)
        crossing = dict(packed_batch, position_ids=torch.arange(packed_batch["input_ids"].shape[1]).expand(
            packed_batch["input_ids"].shape[0], -1))
        assert not torch.allclose(per_token_losses(packed.task, packed.model, crossing), expected, atol=1e-3)


def test_perplexity_is_exp_of_the_mean_token_nll_whatever_the_batching(tiny_llama):
    module = module_for(tiny_llama)
    task, tokenizer = module.task, module.tokenizer
    features = features_of(task, tokenizer, conversations(7, seed=5))
    with torch.no_grad():
        nll, tokens, correct = 0.0, 0, 0
        for feature in features:  # by hand, one example at a time
            ids, labels = torch.tensor([feature["input_ids"]]), torch.tensor(feature["labels"][1:])
            logits = module.model(input_ids=ids).logits[0, :-1]
            keep = labels != IGNORE
            nll += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            tokens += int(keep.sum())
            correct += int((logits[keep].argmax(-1) == labels[keep]).sum())
        for size in (1, 3, 7):
            for packing in (False, True):
                metrics = task.with_options(packing=packing).metrics("val", None)
                for start in range(0, len(features), size):
                    batch = task.with_options(packing=packing).collate(
                        [dict(f) for f in features[start:start + size]], tokenizer, True)
                    task.update_metrics(metrics, task.forward(module.model, batch), batch, module.model, tokenizer)
                values = metrics.compute()
                assert values["perplexity"].item() == pytest.approx(math.exp(nll / tokens), rel=1e-6)
                assert values["token_accuracy"].item() == pytest.approx(correct / tokens, abs=1e-12)
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert TokenScores().compute()["perplexity"] == 1  # (an empty split: no tokens, no surprise)


@pytest.mark.parametrize("processes", KIT_PROCESSES)
def test_conforms_with_packing_and_perplexity_is_the_same_in_two_processes(processes, tmp_path):
    """(In one process the kit's checks and the token mean; the comparison with two runs with the slow tests.)"""
    rows = conversations(15, seed=1)  # validation: 15 rows, odd, split over 2 processes
    task = InstructionTuning(packing=True, max_length=160, generation=GenerationSettings(max_new_tokens=6))
    report = check_task(task, rows, workdir=tmp_path, backbone="llama", epochs=3, processes=processes,
                        extra_args=["--model.lora=null"])
    one, two = report.metrics_by_processes[1], report.metrics_by_processes[processes]
    if processes > 1:
        assert one["val/perplexity"] == pytest.approx(two["val/perplexity"], rel=1e-6)
    assert one["val/perplexity"] == pytest.approx(math.exp(one["val/loss"]), rel=1e-5)  # the core's token mean
    assert report.train_losses[-1] < report.train_losses[0]
    assert len(report.predictions) == 15 and all("<|im" not in p["generated_text"] for p in report.predictions)


def test_learns_the_replies_and_predicts_them_without_template_tokens(tiny_llama, tmp_path):
    rows = conversations(4, seed=2, turns=2, most=3)
    train, val = write_jsonl(tmp_path / "t.jsonl", rows * 8), write_jsonl(tmp_path / "v.jsonl", rows)
    common = [f"--model.backbone={tiny_llama}", "--model.task=InstructionTuning",
              "--model.task.generation.max_new_tokens=8", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={tmp_path}"]
    cli = run(["fit", *common, f"--data.train_file={train}", f"--data.val_file={val}", "--model.lora=null",
               "--model.optimizer.lr=0.01", "--data.batch_size=8", "--trainer.max_epochs=40",
               "--trainer.check_val_every_n_epoch=40", "--seed_everything=0"])
    metrics = cli.trainer.callback_metrics
    assert metrics["val/perplexity"] < 1.5 and metrics["val/token_accuracy"] == 1
    assert metrics["val/perplexity"].item() == pytest.approx(math.exp(metrics["val/loss"].item()), rel=1e-5)

    out = tmp_path / "predictions.jsonl"
    (ckpt,) = tmp_path.rglob("*.ckpt")
    main(["predict", *common, f"--ckpt_path={ckpt}", f"--data.predict_file={val}",
          f"--predictions.output_file={out}"])
    predicted = [json.loads(line)["generated_text"] for line in out.read_text().splitlines()]
    # the rows end with an assistant turn: that reply is dropped, and generated from the turns before it
    assert predicted == [row["messages"][-1]["content"] for row in rows]


def test_long_examples_are_truncated_with_a_count_in_the_log(tiny_llama):
    module = module_for(tiny_llama)
    rows = [{"messages": [turn("user", "good"), turn("assistant", "nice")]},
            {"messages": [turn("user", " ".join(VOCABULARY[:12])), turn("assistant", "nice")]},
            {"messages": [turn("user", "good"), turn("assistant", " ".join(VOCABULARY[:12]))]}]
    short = len(features_of(module.task, module.tokenizer, rows[:1])[0]["input_ids"])
    task = module.task.with_options(max_length=short + 2)
    with pytest.warns(UserWarning, match=f"^2 of 3 examples are longer than .*max_length={short + 2} "
                                         "tokens and were truncated; 1 of them keep no reply token"):
        features = features_of(task, module.tokenizer, rows)
    assert [len(f["input_ids"]) for f in features] == [short, short + 2, short + 2]
    assert features[2]["labels"][-4:] == features[2]["input_ids"][-4:]  # (the reply's start is kept)


BAD_MESSAGES = [
    ("hello", "must hold a non-empty list of messages"),
    ([], "must hold a non-empty list of messages"),
    (["hello"], "message 1 must be an object with a role and a content, got 'hello'"),
    ([{"role": "bot", "content": "x"}], "message 1 has the role 'bot'; expected one of system, user, assistant"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}],
     "message 2 (assistant) must have a string content, got a number: 5"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "message 2 (assistant) must have a string content"),
    ([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}], "has no assistant turn to train on"),
    # (a chat template cannot render the conversation before a first reply of the assistant)
    ([turn("assistant", "hello"), turn("user", "hi"), turn("assistant", "hello")],
     "starts with the assistant's turn (message 1); after an optional system turn a conversation starts with the "
     "user's"),
    ([turn("system", "x"), turn("assistant", "hello"), turn("user", "hi"), turn("assistant", "hello")],
     "starts with the assistant's turn (message 2)"),
    ([turn("user", "hi"), turn("assistant", "")], "message 2 (assistant) is empty ('')"),
    ([turn("user", "hi"), turn("assistant", "hello"), turn("user", "  "), turn("assistant", "x")],
     "message 3 (user) is empty ('  ')"),
]


@pytest.mark.parametrize("value, problem", BAD_MESSAGES)
def test_bad_conversations_are_named_by_file_row_and_column(value, problem, tmp_path):
    good = {"messages": [turn("user", "hi"), turn("assistant", "hello")]}
    path = write_jsonl(tmp_path / "train.jsonl", [good, {"messages": value}])
    where = "data.train_file (train.jsonl)"
    rows = read_data_file(path, where, [])
    expected = f"{where}, row 2: column 'messages' (model.task.init_args.messages_column) {problem}"
    with pytest.raises(InputError, match="^" + re.escape(expected)):
        InstructionTuning().check_rows("train", rows, where)
    InstructionTuning().check_rows("train", rows.select([0]), where)  # (the good row passes)


def test_a_conversation_the_assistant_starts_stops_before_training_naming_its_row(tiny_llama, tmp_path):
    """(Before, transformers' "Cannot apply chat template to an empty conversation", from the first reply's prompt.)"""
    good = {"messages": [turn("user", "hi"), turn("assistant", "hello")]}
    starts = {"messages": [turn("assistant", "hello"), turn("user", "hi"), turn("assistant", "nice")]}
    train = write_jsonl(tmp_path / "t.jsonl", [good, starts])
    with pytest.raises(InputError, match=r"^data.train_file \(.*t.jsonl\), row 2: column 'messages' .* starts with "
                                         r"the assistant's turn \(message 1\)"):
        run(["fit", f"--model.backbone={tiny_llama}", "--model.task=InstructionTuning", f"--data.train_file={train}",
             f"--trainer.default_root_dir={tmp_path}"])
    assert not list(tmp_path.rglob("*.ckpt"))


def test_bad_prompt_rows_and_settings_stop_before_training(tiny_llama, tiny_t5, tiny_gpt2, tmp_path):
    where = "data.val_file (v.jsonl)"
    rows = read_data_file(write_jsonl(tmp_path / "v.jsonl", [{"instruction": "a", "input": "", "output": "b"},
                                                             {"instruction": "", "input": " ", "output": "b"}]),
                          where, [])
    with pytest.raises(InputError, match=r"v.jsonl\), row 2: the prompt \(model.task.init_args.prompt\) is empty"):
        InstructionTuning(format="prompt").check_rows("val", rows, where)
    with pytest.raises(InputError, match=r"names \{question\}, which is not a column of data.val_file \(v.jsonl\); "
                                         "its columns are: instruction, input, output"):
        InstructionTuning(format="prompt", prompt="{question}").check_rows("val", rows, where)
    numbers = read_data_file(write_jsonl(tmp_path / "n.jsonl", [{"instruction": 3, "output": "b"}]), where, [])
    with pytest.raises(InputError, match=r"row 1: column 'instruction' \(named by model.task.init_args.prompt\) "
                                         "must hold text, got a number"):
        InstructionTuning(format="prompt", prompt="{instruction}").check_rows("val", numbers, where)
    conversation = read_data_file(write_jsonl(tmp_path / "p.jsonl", [{"messages": [turn("assistant", "x")]}]),
                                  where, [])
    with pytest.raises(InputError, match="row 1: .* has no user turn to reply to"):
        InstructionTuning().check_rows("predict", conversation, where)

    with pytest.raises(InputError, match="is an encoder-decoder model; instruction tuning trains a decoder-only"):
        FineTuneModule(tiny_t5, InstructionTuning())
    with pytest.raises(InputError, match="format: messages are rendered with a chat template, and .* has none"):
        FineTuneModule(tiny_gpt2, InstructionTuning())
    # a stop token that does not end the template's assistant turn: the setup check names the template
    with pytest.raises(InputError, match="chat template of .* does not render the conversation 'Hi'... .* each "
                                         "assistant reply followed by the stop token '<\\|im_start\\|>': at turn 2"):
        FineTuneModule(tiny_llama, InstructionTuning(chat=ChatFormat(stop_token="<|im_start|>")))

    # through the command: an empty reply of the training file, named before any training
    train = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "a", "input": "", "output": "b"},
                                               {"instruction": "a", "input": "", "output": ""}])
    with pytest.raises(InputError, match=r"^data.train_file \(.*t.jsonl\), row 2: column 'output' is empty"):
        run(["fit", f"--model.backbone={tiny_llama}", "--model.task=InstructionTuning", "--model.task.format=prompt",
             f"--data.train_file={train}", f"--trainer.default_root_dir={tmp_path}"])
    assert not list(tmp_path.rglob("*.ckpt"))


needs_alpaca = pytest.mark.skipif(not ALPACA.is_dir(), reason="../shared/data/alpaca is not here")


@pytest.mark.slow
@needs_alpaca
def test_smollm2_lora_on_alpaca_rows_fits_validates_and_predicts(smollm2, tmp_path):
    path, _ = smollm2
    rows = [json.loads(line) for line in (ALPACA / "train.jsonl").read_text().splitlines()]
    rows = sorted(rows, key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))[:12]
    train, val = write_jsonl(tmp_path / "t.jsonl", rows[:8]), write_jsonl(tmp_path / "v.jsonl", rows[8:])
    predict = write_jsonl(tmp_path / "p.jsonl", [{k: r[k] for k in ("instruction", "input")} for r in rows[8:]])
    common = [f"--model.backbone={path}", "--model.task=InstructionTuning", "--model.task.format=prompt",
              "--model.task.generation.max_new_tokens=16", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={tmp_path}"]
    cli = run(["fit", *common, f"--data.train_file={train}", f"--data.val_file={val}", "--data.batch_size=4",
               "--trainer.max_steps=2", "--model.task.packing=true", "--model.task.max_length=256"])
    task, tokenizer = cli.model.task, cli.model.tokenizer
    assert (task.chat.chat_template, task.chat.stop_token) == (True, "<|im_end|>")
    (feature,) = features_of(task, tokenizer, rows[:1])
    assert tokenizer.decode([t for t in feature["labels"] if t != IGNORE]) == rows[0]["output"] + "<|im_end|>"
    metrics = cli.trainer.callback_metrics
    assert 1 < metrics["val/perplexity"] < 100
    assert metrics["val/perplexity"].item() == pytest.approx(math.exp(metrics["val/loss"].item()), rel=1e-5)

    out = tmp_path / "predictions.jsonl"
    (ckpt,) = tmp_path.rglob("*.ckpt")
    main(["predict", *common, f"--ckpt_path={ckpt}", f"--data.predict_file={predict}",
          f"--predictions.output_file={out}"])
    predicted = [json.loads(line)["generated_text"] for line in out.read_text().splitlines()]
    assert len(predicted) == 4 and all(text.strip() and "<|im" not in text for text in predicted)
