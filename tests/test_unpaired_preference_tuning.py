"""Unpaired preference tuning (KTO): the loss, z0 and rewards against TRL's KTOTrainer, the mismatched pairs of the
KL estimate, exact metrics, bad rows, and the task through the conformance kit."""

import copy
import json
import random
import re

import pytest
import torch
from test_preference_tuning import max_difference

from conftest import KIT_PROCESSES, SHARED, WORDS, write_jsonl
from finetune.chat import GenerationSettings
from finetune.cli import main
from finetune.errors import InputError
from finetune.files import read_data_file
from finetune.generation import IGNORE
from finetune.lora import LoraSettings
from finetune.module import FineTuneModule
from finetune.testing import check_task
from tasks.unpaired_preference_tuning import UnpairedPreferenceScores, UnpairedPreferenceTuning, mismatched

VOCABULARY = sum(WORDS.values(), [])
TASK_PATH = "tasks.unpaired_preference_tuning.UnpairedPreferenceTuning"


def turn(role, content):
    return {"role": role, "content": content}


def unpaired(n, seed=0, plain=False) -> list[dict]:
    """A prompt of words; a desirable completion holds positive words, an undesirable one negative words. Prompts
    and completions are messages, or texts with `plain`."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        desirable = i % 2 == 0 if i < 2 else rng.random() < 0.5
        completion = " ".join(rng.sample(WORDS["pos" if desirable else "neg"], rng.randint(1, 4)))
        prompt = " ".join(rng.sample(VOCABULARY, rng.randint(3, 8)))
        rows.append({"prompt": prompt if plain else [turn("user", prompt)],
                     "completion": completion if plain else [turn("assistant", completion)], "label": desirable})
    return rows


def batch_of(task, tokenizer, rows) -> dict[str, torch.Tensor]:
    features = task.preprocess({k: [r[k] for r in rows] for k in rows[0]}, tokenizer, with_targets=True)
    batch = task.collate([{k: v[i] for k, v in features.items()} for i in range(len(rows))], tokenizer, True)
    batch["index"] = torch.arange(len(rows))
    return batch


def trained_module(backbone, seed=0, **options) -> FineTuneModule:
    """A module whose weights moved away from the reference (LoRA's B starts at zero: policy = reference)."""
    torch.manual_seed(0)
    lora = LoraSettings(target_modules="all-linear")
    module = FineTuneModule(backbone, UnpairedPreferenceTuning(**options), lora=lora)
    module.configure_model()
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in module.model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    module.model.eval()
    return module


def text_of(value):
    return value if isinstance(value, str) else value[0]["content"]


def test_each_prompt_is_scored_with_its_completion_and_with_another_rows(tiny_llama):
    module = FineTuneModule(tiny_llama, UnpairedPreferenceTuning(), lora=None)
    task, tokenizer = module.task, module.tokenizer
    rows = unpaired(5)
    rows[2:4] = unpaired(4, plain=True)[2:4]  # (texts)
    rows[2]["prompt"] = rows[1]["prompt"]  # (row 2's next row with another prompt is row 3... and row 1's is row 3)
    batch = batch_of(task, tokenizer, rows)
    assert batch["input_ids"].shape[0] == 10 and batch["desirable"].tolist() == [r["label"] for r in rows]
    partners = [1, 3, 3, 4, 0]
    assert mismatched([[1], [2], [2], [3], [4]]) == partners and mismatched([[1], [1]]) == [1, 0]
    for i in range(10):
        row, completion = rows[i % 5], rows[i if i < 5 else partners[i - 5]]["completion"]
        labels = batch["labels"][i]
        assert tokenizer.decode(labels[labels != IGNORE]) == text_of(completion) + "<|im_end|>"
        length = int(batch["attention_mask"][i].sum())
        prompt = tokenizer.decode(batch["input_ids"][i][:length][labels[:length] == IGNORE])
        assert prompt.endswith(text_of(row["prompt"]) + "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("seed, kl_positive", [(4, True), (1, False)], ids=["z0-positive", "z0-clamped"])
def test_loss_z0_and_rewards_equal_trl_kto_trainer_on_the_same_batch_and_weights(tiny_llama, tmp_path, seed,
                                                                                    kl_positive):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback

    options = dict(beta=0.3, desirable_weight=1.3, undesirable_weight=0.8)
    module = trained_module(tiny_llama, seed=seed, **options)
    batch = batch_of(module.task, module.tokenizer, unpaired(7, seed=1))
    with torch.no_grad():
        outputs = module.task_outputs(batch)
        loss = module.task.loss(outputs, batch)
    scores = UnpairedPreferenceScores()
    module.task.update_metrics(scores, outputs, batch, module.model, module.tokenizer)
    ours = scores.compute()

    logged = {}

    class Logged(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.update(logs)

    policy = copy.deepcopy(module.model).merge_and_unload()
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama)
    dataset = Dataset.from_list([{"prompt": "a", "completion": "b", "label": True},
                                 {"prompt": "c", "completion": "d", "label": False}])
    config = trl.KTOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False, **options)
    trainer = trl.KTOTrainer(model=policy, ref_model=reference, args=config, train_dataset=dataset,
                             processing_class=module.tokenizer, callbacks=[Logged()])
    trainer.model.eval()
    matched, other = (slice(0, 7), slice(7, 14))
    completion_mask = (batch["labels"] != IGNORE).long()
    inputs = {"input_ids": batch["input_ids"][matched], "attention_mask": batch["attention_mask"][matched],
              "completion_mask": completion_mask[matched], "label": batch["desirable"],
              "KL_input_ids": batch["input_ids"][other], "KL_attention_mask": batch["attention_mask"][other],
              "KL_completion_mask": completion_mask[other]}
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, inputs)
    trainer.log({})

    assert (logged["eval_kl"] > 0) == kl_positive  # (z0 > 0 moves the loss; below 0 it is clamped)
    ours["kl"] = ours["kl"].clamp(min=0)
    print("kto max abs difference to TRL:", max_difference(loss, theirs, ours, logged, ("chosen", "rejected",
                                                                                         "margins", "kl")))
    assert ours["kl"].item() == pytest.approx(logged["eval_kl"], abs=1e-5)
    assert loss.item() == pytest.approx(theirs.item(), abs=1e-5)
    assert ours["chosen_reward"].item() == pytest.approx(logged["eval_rewards/chosen"], abs=1e-5)
    assert ours["rejected_reward"].item() == pytest.approx(logged["eval_rewards/rejected"], abs=1e-5)
    assert ours["reward_margin"].item() == pytest.approx(logged["eval_rewards/margins"], abs=1e-5)


def test_loss_follows_the_papers_formula_and_metrics_add_up_over_batches(tiny_llama):
    """KTO's eq. 7 with z0 = max(0, mean mismatched log-ratio), from log-probabilities computed one sequence at a
    time; the metric sums over two batches give the values of one; an untrained model's rewards and KL are 0."""
    module = trained_module(tiny_llama, beta=0.5, desirable_weight=2.0)
    rows = unpaired(6, seed=2)
    batch = batch_of(module.task, module.tokenizer, rows)
    with torch.no_grad():
        policy, reference = module.task_outputs(batch)
        loss = module.task.loss((policy, reference), batch)
        by_hand = []
        for model in (module.model, None):
            logps = []
            for ids, labels in zip(batch["input_ids"], batch["labels"]):
                keep = labels != IGNORE
                end = int(keep.nonzero().max()) + 1
                if model is None:
                    with module.model.disable_adapter():
                        logits = module.model(input_ids=ids[:end][None]).logits[0, :-1]
                else:
                    logits = model(input_ids=ids[:end][None]).logits[0, :-1]
                positions = keep[:end].nonzero().flatten()
                logps.append(logits.log_softmax(-1)[positions - 1, ids[positions]].sum())
            by_hand.append(torch.stack(logps))
    assert by_hand[0].tolist() == pytest.approx(policy.tolist(), abs=1e-4)
    assert by_hand[1].tolist() == pytest.approx(reference.tolist(), abs=1e-4)
    ratio = by_hand[0] - by_hand[1]
    z0 = max(0.0, ratio[6:].mean().item())
    expected = [2.0 * (1 - torch.sigmoid(0.5 * (r - z0))) if row["label"] else 1 - torch.sigmoid(0.5 * (z0 - r))
                for r, row in zip(ratio[:6], rows)]
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-5)

    desirable = batch["desirable"]
    whole, halves = UnpairedPreferenceScores(), UnpairedPreferenceScores()
    whole.update(0.5 * ratio[:6], desirable, ratio[6:])
    for part in (slice(0, 2), slice(2, 6)):
        halves.update(0.5 * ratio[:6][part], desirable[part], ratio[6:][part])
    for name, value in whole.compute().items():
        assert halves.compute()[name].item() == pytest.approx(value.item(), abs=1e-12), name
    assert whole.compute()["chosen_reward"].item() == pytest.approx(0.5 * ratio[:6][desirable].mean().item())

    untrained = FineTuneModule(tiny_llama, UnpairedPreferenceTuning(), lora=LoraSettings())
    untrained.configure_model()
    untrained.model.eval()
    with torch.no_grad():
        outputs = untrained.task_outputs(batch)
        assert untrained.task.loss(outputs, batch).item() == pytest.approx(0.5)  # 1 - sigmoid(0)
    start = UnpairedPreferenceScores()
    untrained.task.update_metrics(start, outputs, batch, untrained.model, untrained.tokenizer)
    assert {k: v.item() for k, v in start.compute().items()} == {
        "chosen_reward": 0.0, "rejected_reward": 0.0, "reward_margin": 0.0, "kl": 0.0}


def test_the_mismatched_pairs_carry_no_gradient(tiny_llama):
    module = trained_module(tiny_llama)
    module.model.train()
    batch = batch_of(module.task, module.tokenizer, unpaired(4))
    policy = module.task.forward(module.model, batch)
    assert policy.requires_grad
    policy[4:].sum().backward(retain_graph=True)  # (the mismatched half: no path to the weights)
    assert all(p.grad is None or not p.grad.any() for p in module.model.parameters())
    policy[:4].sum().backward()
    assert all(p.grad.any() for p in module.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("processes", KIT_PROCESSES)
def test_conforms_learns_the_preference_and_is_exact_in_two_processes(processes, tmp_path):
    """(In one process the kit's checks and learning; the comparison with two runs with the slow tests.)"""
    rows = unpaired(15, seed=3)  # validation: 15 rows, odd, split over 2 processes
    task = UnpairedPreferenceTuning(beta=0.5, generation=GenerationSettings(max_new_tokens=4))
    report = check_task(task, rows, workdir=tmp_path, backbone="llama", epochs=4, processes=processes,
                        extra_args=["--model.lora.target_modules=all-linear", "--model.optimizer.lr=0.02"])
    one, two = report.metrics_by_processes[1], report.metrics_by_processes[processes]
    for name in ("val/loss", "val/reward_margin", "val/chosen_reward", "val/kl") if processes > 1 else ():
        assert one[name] == pytest.approx(two[name], abs=1e-6), name
    assert report.train_losses[-1] < report.train_losses[0]
    assert report.metrics["val/reward_margin"] > 0
    assert report.metrics["val/chosen_reward"] > 0 > report.metrics["val/rejected_reward"]
    assert len(report.predictions) == 15 and all("<|im" not in p["generated_text"] for p in report.predictions)


BAD_ROWS = [
    ({"prompt": [turn("user", "hi"), turn("assistant", "x")]}, "column 'prompt' (model.task.init_args.prompt_column) "
     "must end with a user turn"),
    ({"completion": ""}, "column 'completion' (model.task.init_args.completion_column) is an empty completion"),
    ({"completion": [turn("user", "x")]}, "column 'completion' (model.task.init_args.completion_column) holds a "
     "message of the role 'user'"),
    ({"label": 1}, "column 'label' (model.task.init_args.label_column) must be true (a desirable completion) or false "
     "(an undesirable one), got a number: 1"),
]


@pytest.mark.parametrize("change, problem", BAD_ROWS)
def test_bad_rows_are_named_by_file_row_and_field(change, problem, tmp_path):
    good = [{"prompt": "hi", "completion": "good", "label": True},
            {"prompt": "hi", "completion": "bad", "label": False}]
    path = write_jsonl(tmp_path / "train.jsonl", [*good, {**good[0], **change}])
    where = "data.train_file (train.jsonl)"
    with pytest.raises(InputError, match="^" + re.escape(f"{where}, row 3: {problem}")):
        UnpairedPreferenceTuning().check_rows("train", read_data_file(path, where, []), where)
    UnpairedPreferenceTuning().check_rows("train", read_data_file(path, where, []).select([0, 1]), where)


def test_unbalanced_rows_get_the_weights_kto_advises(tmp_path):
    rows = [{"prompt": "hi", "completion": "good", "label": True}] * 3 + [
        {"prompt": "hi", "completion": "bad", "label": False}]
    dataset = read_data_file(write_jsonl(tmp_path / "train.jsonl", rows), "data.train_file", [])
    with pytest.warns(UserWarning, match=re.escape("3 desirable and 1 undesirable training rows: with these weights "
                                                   "the desirable ones weigh 3.00 x the undesirable ones, KTO's paper "
                                                   "advises 1 to 4/3: set model.task.init_args.desirable_weight in "
                                                   "[0.33, 0.44]")):
        UnpairedPreferenceTuning().check_rows("train", dataset, "data.train_file")
    UnpairedPreferenceTuning(desirable_weight=0.4).check_rows("train", dataset, "data.train_file")  # (no warning)
    with pytest.warns(UserWarning, match="the training rows are all desirable"):
        UnpairedPreferenceTuning().check_rows("train", dataset.select([0, 1]), "data.train_file")


def test_bad_settings_are_named():
    for option in ("beta", "desirable_weight", "undesirable_weight"):
        with pytest.raises(InputError, match=f"model.task.init_args.{option}: must be positive, got 0"):
            UnpairedPreferenceTuning(**{option: 0})


def test_every_option_has_help_text(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.task.help", TASK_PATH])
    shown = capsys.readouterr().out
    blocks = re.split(r"\n(?=  --model\.task\.)", shown.split("\n\n", 2)[-1])[1:]
    assert len(blocks) >= 9
    undocumented = [block.split()[0] for block in blocks
                    if not re.sub(r"--model\.task\.\S+( \S+)?,?", "", block.split("(type:")[0]).strip()]
    assert not undocumented, f"options without help text: {undocumented}"


def test_rows_derived_from_the_shared_pairs_read_check_and_encode(tiny_llama, tmp_path):
    """The benchmark's KTO rows: each pair's chosen completion desirable, its rejected one undesirable."""
    path = SHARED / "data" / "preference" / "validation.jsonl"
    if not path.exists():
        pytest.skip("../shared/data/preference is not here")
    pairs = [json.loads(line) for line in path.read_text().splitlines()]
    rows = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for side in ("chosen", "rejected") for p in pairs]
    task = FineTuneModule(tiny_llama, UnpairedPreferenceTuning(max_length=64), lora=None).task
    where = "data.val_file"
    task.check_rows("val", read_data_file(str(write_jsonl(tmp_path / "validation.jsonl", rows)), where, []), where)
    tokenizer = FineTuneModule(tiny_llama, task, lora=None).tokenizer
    with pytest.warns(UserWarning, match="rows are longer than model.task.init_args.max_length=64"):
        batch = batch_of(task, tokenizer, rows[:4] + rows[-4:])
    assert batch["input_ids"].shape == (16, 64) and ((batch["labels"] != IGNORE).sum(-1) > 0).all()
    assert batch["desirable"].tolist() == [True] * 4 + [False] * 4
