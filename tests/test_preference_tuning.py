"""Preference tuning (DPO, IPO, SimPO, ORPO): the loss and rewards against TRL's DPOTrainer, CPOTrainer (SimPO) and
ORPOTrainer, the reference model (and none for SimPO and ORPO), exact metrics, bad pairs, and the task through the
conformance kit."""

import copy
import json
import random
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import KIT_PROCESSES, SHARED, WORDS, write_jsonl
from finetune.chat import GenerationSettings
from finetune.errors import InputError
from finetune.files import read_data_file
from finetune.generation import IGNORE
from finetune.lora import LoraSettings
from finetune.module import FineTuneModule
from finetune.testing import check_task
from tasks.preference_tuning import PreferenceScores, PreferenceTuning

VOCABULARY = sum(WORDS.values(), [])


def turn(role, content):
    return {"role": role, "content": content}


def pairs(n, seed=0, plain=False) -> list[dict]:
    """A prompt of words; chosen: positive words, rejected: negative ones. Prompts are conversations (some
    multi-turn), or texts with `plain`."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(VOCABULARY, rng.randint(3, 8))
        chosen = " ".join(rng.sample(WORDS["pos"], rng.randint(1, 4)))
        rejected = " ".join(rng.sample(WORDS["neg"], rng.randint(1, 5)))
        prompt = [turn("user", " ".join(words))]
        if i % 3 == 2:
            prompt = [turn("system", "be nice"), turn("user", "hi"), turn("assistant", "nice"), *prompt]
        if plain:
            prompt = " ".join(words)
        rows.append({"prompt": prompt, "chosen": [turn("assistant", chosen)], "rejected": rejected})
    return rows


def batch_of(task, tokenizer, rows) -> dict[str, torch.Tensor]:
    features = task.preprocess({k: [r[k] for r in rows] for k in rows[0]}, tokenizer, with_targets=True)
    batch = task.collate([{k: v[i] for k, v in features.items()} for i in range(len(rows))], tokenizer, True)
    batch["index"] = torch.arange(len(rows))
    return batch


def max_difference(loss, trl_loss, ours: dict, logged: dict, names=("chosen", "rejected", "margins", "accuracies")):
    """The largest absolute difference between our loss and rewards and TRL's (for the report: pytest -s)."""
    keys = {"chosen": "chosen_reward", "rejected": "rejected_reward", "margins": "reward_margin",
            "accuracies": "reward_accuracy", "kl": "kl"}
    return max([abs(loss.item() - trl_loss.item())] + [
        abs(ours[keys[name]].item() - logged[f"eval_rewards/{name}" if name != "kl" else "eval_kl"]) for name in names])


def trained_module(backbone, lora=LoraSettings(target_modules="all-linear"), **options) -> FineTuneModule:
    """A module whose weights moved away from the reference (LoRA's B starts at zero: policy = reference)."""
    torch.manual_seed(0)
    module = FineTuneModule(backbone, PreferenceTuning(**options), lora=lora)
    module.configure_model()
    with torch.no_grad():
        for name, parameter in module.model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    module.model.eval()
    return module


def test_only_completion_tokens_and_their_end_of_turn_are_scored(tiny_llama):
    module = FineTuneModule(tiny_llama, PreferenceTuning(), lora=None)
    task, tokenizer = module.task, module.tokenizer
    for rows in (pairs(3), pairs(3, plain=True)):
        batch = batch_of(task, tokenizer, rows)
        assert batch["input_ids"].shape[0] == 6  # the 3 chosen sequences, then the 3 rejected ones
        for i, row in enumerate(rows * 2):
            reply = row["chosen"][0]["content"] if i < 3 else row["rejected"]
            labels = batch["labels"][i]
            length = int(batch["attention_mask"][i].sum())
            assert tokenizer.decode(labels[labels != IGNORE]) == reply + "<|im_end|>"
            prompt = tokenizer.decode(batch["input_ids"][i][:length][labels[:length] == IGNORE])
            assert prompt.endswith("<|im_start|>assistant\n")
            assert ("be nice" in prompt) == (i % 3 == 2 and isinstance(row["prompt"], list))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_rewards_equal_trl_dpo_trainer_on_the_same_batch_and_weights(tiny_llama, tmp_path, loss_type):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    module = trained_module(tiny_llama, loss_type=loss_type, beta=0.2)
    batch = batch_of(module.task, module.tokenizer, pairs(6, seed=1))
    with torch.no_grad():
        outputs = module.task_outputs(batch)
        loss = module.task.loss(outputs, batch)
    scores = PreferenceScores(beta=0.2)
    module.task.update_metrics(scores, outputs, batch, module.model, module.tokenizer)
    ours = scores.compute()

    logged = {}

    class Logged(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.update(logs)

    # TRL takes a PEFT model's adapter as it is for its reference: give it the two models instead, the adapter
    # merged into the policy
    policy = copy.deepcopy(module.model).merge_and_unload()
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama)
    dataset = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    config = trl.DPOConfig(output_dir=str(tmp_path), beta=0.2, loss_type=loss_type, report_to="none", use_cpu=True,
                           bf16=False)  # (TRL's default runs the reference under bf16 autocast)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=dataset,
                             processing_class=module.tokenizer, callbacks=[Logged()])
    trainer.model.eval()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != IGNORE).long()}
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, inputs)
    trainer.log({})

    assert ours["chosen_reward"] != 0 and ours["reward_margin"] != 0  # (the weights differ from the reference)
    print(loss_type, "max abs difference to TRL:", max_difference(loss, theirs, ours, logged))
    assert loss.item() == pytest.approx(theirs.item(), abs=1e-5)
    assert ours["chosen_reward"].item() == pytest.approx(logged["eval_rewards/chosen"], abs=1e-5)
    assert ours["rejected_reward"].item() == pytest.approx(logged["eval_rewards/rejected"], abs=1e-5)
    assert ours["reward_margin"].item() == pytest.approx(logged["eval_rewards/margins"], abs=1e-5)
    assert ours["reward_accuracy"].item() == pytest.approx(logged["eval_rewards/accuracies"], abs=1e-6)


def test_losses_follow_the_papers_formulas_and_metrics_add_up_over_batches(tiny_llama):
    """Conservative DPO (label smoothing) from the DPO paper's formula; the rewards' sums over two batches give
    the values of one; a model equal to its reference scores accuracy 0.5 and margin 0."""
    module = trained_module(tiny_llama, beta=0.5, label_smoothing=0.2)
    rows = pairs(8, seed=2)
    batch = batch_of(module.task, module.tokenizer, rows)
    with torch.no_grad():
        policy, reference = module.task_outputs(batch)
        loss = module.task.loss((policy, reference), batch)
        policy, reference = policy.completions, reference.completions
    # log-probabilities by hand, one sequence at a time
    logps = []
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        keep = labels != IGNORE
        logits = module.model(input_ids=ids[:int(keep.nonzero().max()) + 1][None]).logits[0, :-1]
        logps.append(sum(F.log_softmax(logits[t - 1], -1)[ids[t]] for t in keep.nonzero().flatten().tolist()))
    assert torch.stack(logps).tolist() == pytest.approx(policy.tolist(), abs=1e-4)
    ratio = policy - reference
    margin = 0.5 * (ratio[:8] - ratio[8:])
    expected = (-F.logsigmoid(margin) * 0.8 - F.logsigmoid(-margin) * 0.2).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)

    whole, halves = PreferenceScores(0.5), PreferenceScores(0.5)
    whole.update(0.5 * ratio[:8], 0.5 * ratio[8:])
    for part in (slice(0, 3), slice(3, 8)):
        halves.update(0.5 * ratio[:8][part], 0.5 * ratio[8:][part])
    for name, value in whole.compute().items():
        assert halves.compute()[name].item() == pytest.approx(value.item(), abs=1e-12), name

    untrained = FineTuneModule(tiny_llama, PreferenceTuning(), lora=LoraSettings())
    untrained.configure_model()
    untrained.model.eval()
    with torch.no_grad():
        outputs = untrained.task_outputs(batch)
    start = PreferenceScores(0.1)
    untrained.task.update_metrics(start, outputs, batch, untrained.model, untrained.tokenizer)
    assert {k: v.item() for k, v in start.compute().items()} == {
        "reward_accuracy": 0.5, "reward_margin": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0}


def trl_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our batch of 2n sequences as TRL's paired trainers (CPO, ORPO) take it: chosen_* and rejected_* halves."""
    halves = {key: batch[key].chunk(2) for key in ("input_ids", "attention_mask", "labels")}
    return {f"{side}_{key}": parts[i] for key, parts in halves.items() for i, side in enumerate(("chosen", "rejected"))}


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_and_rewards_equal_trl_on_the_same_batch_and_weights(tiny_llama, tmp_path, loss_type):
    """SimPO against CPOTrainer(loss_type="simpo", cpo_alpha=0), ORPO against ORPOTrainer: the loss and the logged
    rewards (beta x mean per-token log-probability) of one batch, evaluated by both on the same weights."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    options = dict(beta=2.0, gamma=0.7, label_smoothing=0.1) if loss_type == "simpo" else dict(beta=0.3)
    module = trained_module(tiny_llama, loss_type=loss_type, **options)
    assert module.reference_model is None and not module.task.compares_to_reference
    batch = batch_of(module.task, module.tokenizer, pairs(6, seed=1))
    with torch.no_grad():
        outputs = module.task_outputs(batch)
        loss = module.task.loss(outputs, batch)
    scores = PreferenceScores(beta=options["beta"])
    module.task.update_metrics(scores, outputs, batch, module.model, module.tokenizer)
    ours = scores.compute()

    policy = copy.deepcopy(module.model).merge_and_unload()
    dataset = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])
    common = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, beta=options["beta"])
    if loss_type == "simpo":
        config = CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.7, label_smoothing=0.1)
        trainer = CPOTrainer(model=policy, args=config, train_dataset=dataset, processing_class=module.tokenizer)
    else:
        config = ORPOConfig(**common)
        trainer = ORPOTrainer(model=policy, args=config, train_dataset=dataset, processing_class=module.tokenizer)
    trainer.model.eval()
    with torch.no_grad():
        theirs, logged = trainer.get_batch_loss_metrics(trainer.model, trl_batch(batch), train_eval="eval")

    assert ours["reward_margin"] != 0 and loss.item() > 0
    print(loss_type, "max abs difference to TRL:", max_difference(loss, theirs, ours, logged))
    assert loss.item() == pytest.approx(theirs.item(), abs=1e-5)
    assert ours["chosen_reward"].item() == pytest.approx(logged["eval_rewards/chosen"], abs=1e-5)
    assert ours["rejected_reward"].item() == pytest.approx(logged["eval_rewards/rejected"], abs=1e-5)
    assert ours["reward_margin"].item() == pytest.approx(logged["eval_rewards/margins"], abs=1e-5)
    assert ours["reward_accuracy"].item() == pytest.approx(logged["eval_rewards/accuracies"], abs=1e-6)


def test_reference_free_losses_follow_the_papers_formulas(tiny_llama):
    """SimPO: -log sigmoid(beta (mean log p_c - mean log p_r) - gamma); ORPO: the chosen sequences' token-mean NLL
    (prompt included) - lambda log sigmoid(log odds_c - log odds_r), odds of the mean per-token probability; each from
    log-probabilities computed one token at a time."""
    rows = pairs(5, seed=4)
    for loss_type, options in (("simpo", dict(beta=2.5, gamma=1.0)), ("orpo", dict(beta=0.5))):
        module = trained_module(tiny_llama, loss_type=loss_type, **options)
        batch = batch_of(module.task, module.tokenizer, rows)
        with torch.no_grad():
            loss = module.task.loss(module.task_outputs(batch), batch)
            logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        token_logps = F.log_softmax(logits[:, :-1].double(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        completion = batch["labels"][:, 1:] != IGNORE
        mean = (token_logps * completion).sum(-1) / completion.sum(-1)
        chosen, rejected = mean[:5], mean[5:]
        if loss_type == "simpo":
            expected = -F.logsigmoid(2.5 * (chosen - rejected) - 1.0).mean()
        else:
            real = batch["attention_mask"][:5, 1:] == 1
            nll = -token_logps[:5][real].mean()
            odds = (chosen - torch.log(1 - chosen.exp())) - (rejected - torch.log(1 - rejected.exp()))
            expected = nll - 0.5 * F.logsigmoid(odds).mean()
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5), loss_type


def test_with_lora_null_the_reference_is_a_frozen_copy(tiny_llama):
    module = trained_module(tiny_llama, lora=None)
    batch = batch_of(module.task, module.tokenizer, pairs(4))
    fresh = FineTuneModule(tiny_llama, PreferenceTuning(), lora=None)
    fresh.configure_model()
    fresh.model.eval()
    with torch.no_grad():
        assert module.reference_outputs(batch).completions.tolist() == pytest.approx(
            fresh.task.forward(fresh.model, batch).completions.tolist(), abs=1e-6)  # the backbone as loaded
        assert module.task.forward(module.model, batch).completions.tolist() != pytest.approx(
            module.reference_outputs(batch).completions.tolist(), abs=1e-3)
    assert not any(p.requires_grad for p in module.reference_model.parameters())
    assert not any(name.startswith("reference_model.") for name in module.trainable_names())


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo", "orpo"])
@pytest.mark.parametrize("processes", KIT_PROCESSES)
def test_conforms_learns_the_preference_and_is_exact_in_two_processes(processes, loss_type, tmp_path):
    """(In one process the kit's checks and learning; the comparison with two runs with the slow tests.)"""
    rows = pairs(15, seed=3)  # validation: 15 pairs, odd, split over 2 processes
    beta = {"sigmoid": 0.5, "simpo": 2.0, "orpo": 0.5}[loss_type]
    task = PreferenceTuning(loss_type=loss_type, beta=beta, generation=GenerationSettings(max_new_tokens=4))
    report = check_task(task, rows, workdir=tmp_path, backbone="llama", epochs=4, processes=processes,
                        extra_args=["--model.lora.target_modules=all-linear", "--model.optimizer.lr=0.02"])
    one, two = report.metrics_by_processes[1], report.metrics_by_processes[processes]
    for name in ("val/loss", "val/reward_accuracy", "val/reward_margin", "val/chosen_reward") if processes > 1 else ():
        assert one[name] == pytest.approx(two[name], abs=1e-6), name
    assert report.train_losses[-1] < report.train_losses[0]
    assert report.metrics["val/reward_margin"] > 0 and report.metrics["val/reward_accuracy"] > 0.5
    assert len(report.predictions) == 15 and all("<|im" not in p["generated_text"] for p in report.predictions)


BAD_PAIRS = [
    ({"prompt": [turn("user", "hi"), turn("assistant", "x")]}, "column 'prompt' (model.task.init_args.prompt_column) "
     "must end with a user turn"),
    ({"prompt": [{"role": "bot", "content": "x"}]}, "column 'prompt' (model.task.init_args.prompt_column) message 1 "
     "has the role 'bot'"),
    ({"prompt": [turn("assistant", "x"), turn("user", "hi")]}, "column 'prompt' (model.task.init_args.prompt_column) "
     "starts with the assistant's turn (message 1)"),
    ({"prompt": [turn("user", "")]}, "column 'prompt' (model.task.init_args.prompt_column) message 1 (user) is empty"),
    ({"chosen": ""}, "column 'chosen' (model.task.init_args.chosen_column) is an empty completion"),
    ({"rejected": [turn("assistant", "  ")]}, "column 'rejected' (model.task.init_args.rejected_column) is an empty "
     "completion"),
    ({"chosen": [turn("user", "x")]}, "column 'chosen' (model.task.init_args.chosen_column) holds a message of the "
     "role 'user'"),
    ({"chosen": 5}, "column 'chosen' (model.task.init_args.chosen_column) must hold the assistant's reply"),
    ({"rejected": "good"}, "the chosen and the rejected completion are the same text ('good')"),
]


@pytest.mark.parametrize("change, problem", BAD_PAIRS)
def test_bad_pairs_are_named_by_file_row_and_field(change, problem, tmp_path):
    good = {"prompt": [turn("user", "hi")], "chosen": [turn("assistant", "good")], "rejected": "bad"}
    path = write_jsonl(tmp_path / "train.jsonl", [good, {**good, **change}])
    where = "data.train_file (train.jsonl)"
    with pytest.raises(InputError, match="^" + re.escape(f"{where}, row 2: {problem}")):
        PreferenceTuning().check_rows("train", read_data_file(path, where, []), where)
    PreferenceTuning().check_rows("train", read_data_file(path, where, []).select([0]), where)


def test_without_a_chat_template_a_prompt_is_one_user_turn(tiny_gpt2):
    task = FineTuneModule(tiny_gpt2, PreferenceTuning(), lora=None).task
    tokenizer = FineTuneModule(tiny_gpt2, task, lora=None).tokenizer
    rows = pairs(3, plain=True)
    batch = batch_of(task, tokenizer, rows)  # the base format: the prompt, a newline, the completion and eos
    prompt = tokenizer(rows[0]["prompt"] + "\n")["input_ids"]
    completion = tokenizer(rows[0]["chosen"][0]["content"], add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]
    assert batch["input_ids"][0][:len(prompt + completion)].tolist() == prompt + completion
    assert batch["labels"][0][:len(prompt + completion)].tolist() == [IGNORE] * len(prompt) + completion
    with pytest.raises(InputError, match=r"chat.chat_template: conversations of several turns are rendered with a "
                                         "chat template, and the backbone has none"):
        batch_of(task, tokenizer, pairs(3))  # (the third prompt is a conversation of several turns)


def test_bad_settings_and_backbones_are_named(tiny_t5):
    with pytest.raises(InputError, match="beta: must be positive"):
        PreferenceTuning(beta=0)
    with pytest.raises(InputError, match=re.escape("label_smoothing: must be in [0, 0.5)")):
        PreferenceTuning(label_smoothing=0.5)
    with pytest.raises(InputError, match="encoder-decoder model; preference tuning trains a decoder-only"):
        FineTuneModule(tiny_t5, PreferenceTuning())


def test_the_shared_pairs_read_check_and_encode(tiny_llama):
    path = SHARED / "data" / "preference" / "validation.jsonl"
    if not path.exists():
        pytest.skip("../shared/data/preference is not here")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    where = "data.val_file"
    task = FineTuneModule(tiny_llama, PreferenceTuning(max_length=64), lora=None).task
    dataset = read_data_file(str(path), where, [])
    task.check_rows("val", dataset, where)
    with pytest.warns(UserWarning, match="pairs are longer than model.task.init_args.max_length=64"):
        batch = batch_of(task, FineTuneModule(tiny_llama, task, lora=None).tokenizer, rows[:8])
    assert batch["input_ids"].shape == (16, 64) and ((batch["labels"] != IGNORE).sum(-1) > 0).all()


def test_the_chat_endpoint_serves_the_prompt_column():
    messages = [turn("system", "be brief"), turn("user", "hi")]
    assert PreferenceTuning(prompt_column="question").chat_row(messages) == {"question": messages}


def test_the_core_checks_the_conversation_column_first(tmp_path):
    from finetune.columns import check_columns

    good = {"prompt": [turn("user", "hi")], "chosen": "good", "rejected": "bad"}
    path = write_jsonl(tmp_path / "train.jsonl", [good, {**good, "prompt": []}])
    where = "data.train_file (train.jsonl)"
    with pytest.raises(InputError, match=re.escape(f"{where}, row 2: column 'prompt' must hold a conversation: a "
                                                   "non-empty list of messages")):
        check_columns(PreferenceTuning(), read_data_file(path, where, []), "train", where)
