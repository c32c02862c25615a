"""GRPO with verifiable rewards: the loss, advantages and KL against TRL's GRPOTrainer, rollouts, reward plugins
and their errors, the task through the conformance kit and the command line."""

import json
import math
import random

import pytest
import torch

from conftest import write_jsonl
from finetune.errors import InputError
from finetune.lora import LoraSettings
from finetune.module import FineTuneModule
from finetune.pipeline import collate, make_features
from finetune.target_tokens import IGNORE
from finetune.testing import check_task, rolled_out
from tasks.rewards import answer_format, extracted_answer, final_answer, length_penalty, reward_function
from tasks.verifiable_rewards import GRPO, advantages, completion_mask


def sums(n, seed=0, plain=False) -> list[dict]:
    """Addition problems: a prompt, the `final_answer` column the reward reads."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        prompt = f"the cat has {a} and {b} ?"
        rows.append({"prompt": prompt if plain else [{"role": "user", "content": prompt}], "final_answer": str(a + b)})
    return rows


def module_for(backbone, **options) -> FineTuneModule:
    """A module whose adapter moved away from the reference (LoRA's B starts at zero: policy = reference)."""
    torch.manual_seed(0)
    module = FineTuneModule(backbone, GRPO.from_options(options), lora=LoraSettings(target_modules="all-linear"))
    module.configure_model()
    with torch.no_grad():
        for parameter in module.model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    module.model.eval()
    return module


def data_batch(module, rows) -> dict:
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    features = make_features(columns, list(range(len(rows))), module.task, module.tokenizer, with_targets=True)
    return collate([{k: v[i] for k, v in features.items()} for i in range(len(rows))], module.task,
                   module.tokenizer, with_targets=True)


# --- TRL equality --------------------------------------------------------------------------------
def trl_inputs(batch, old_logps, reference_logps, pad_id) -> dict:
    """Our rollout batch as TRL's GRPOTrainer holds a generation batch: prompts left-padded, completions
    right-padded, per-token log-probabilities at completion positions."""
    targets = batch["labels"][:, 1:] != IGNORE
    prompts, completions, olds, references = [], [], [], []
    for ids, labels, keep, old, reference in zip(batch["input_ids"], batch["labels"], targets, old_logps,
                                                 reference_logps):
        start = int(keep.nonzero()[0]) + 1  # (position t predicts token t + 1)
        prompts.append(ids[:start].tolist())
        completions.append(labels[start:][labels[start:] != IGNORE].tolist())
        olds.append(old[keep].tolist())
        references.append(reference[keep].tolist())
    width = max(map(len, completions))
    left = max(map(len, prompts))

    def padded(rows, value, on_left=False):
        return torch.tensor([[value] * (n - len(r)) + r if on_left else r + [value] * (n - len(r))
                             for r, n in ((r, left if on_left else width) for r in rows)])

    return {"prompt_ids": padded(prompts, pad_id, True),
            "prompt_mask": padded([[1] * len(p) for p in prompts], 0, True),
            "completion_ids": padded(completions, pad_id),
            "completion_mask": padded([[1] * len(c) for c in completions], 0),
            "old_per_token_logps": padded(olds, 0.0), "ref_per_token_logps": padded(references, 0.0),
            "advantages": batch["advantages"], "num_items_in_batch": targets.sum()}


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_loss_equals_trl_grpo_trainer(tiny_llama, tmp_path, loss_type):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    options = dict(loss_type=loss_type, beta=0.04, epsilon=0.1, epsilon_high=0.15, num_iterations=2, num_generations=4,
                   reward_functions=["final_answer", "length_penalty"], reward_weights=[1.0, 0.5],
                   generation={"max_new_tokens": 12, "do_sample": True})
    module = module_for(tiny_llama, **options)
    task = module.task
    torch.manual_seed(1)
    batch = rolled_out(module, data_batch(module, sums(3)), 0)
    assert (batch["advantages"] != 0).all()  # (the completions' lengths differ: so do their rewards)
    # Old log-probabilities off the current ones (as after an update), so that ratios are clipped both ways.
    gen = torch.Generator().manual_seed(2)
    batch["old_logps"] = batch["old_logps"] + torch.randn(batch["old_logps"].shape, generator=gen) * 0.2
    outputs = module.task_outputs(batch)
    ours = task.loss(outputs, batch)

    config = GRPOConfig(output_dir=str(tmp_path), loss_type=loss_type, beta=0.04, epsilon=0.1, epsilon_high=0.15,
                        num_iterations=2, num_generations=4, per_device_train_batch_size=4,
                        max_completion_length=12, report_to=[], use_cpu=True, bf16=False)
    trainer = GRPOTrainer(model=module.model, reward_funcs=[final_answer, length_penalty], args=config,
                          train_dataset=Dataset.from_list(sums(4, plain=True)), processing_class=module.tokenizer)
    inputs = trl_inputs(batch, batch["old_logps"], outputs[1], module.tokenizer.pad_token_id)
    theirs = trainer.compute_loss(module.model, inputs)  # (eval mode: no accumulation scaling, as one step)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), (ours, theirs)
    logs = task.step_logs(outputs, batch)
    assert 0 < logs["clip_fraction"] < 1 and logs["kl"] > 0


def test_kl_and_clipping_are_trls_formulas(tiny_llama):
    """TRL 1.16 grpo_trainer.py lines 3096-3102 (k3 estimator exp(ref - logp) - (ref - logp) - 1, times the ratio
    with the default use_bias_correction_kl) and 3274-3276
    (low clipped: ratio < 1 - epsilon with a negative advantage; high: ratio > 1 + epsilon_high, positive)."""
    module = module_for(tiny_llama, beta=0.1, num_iterations=2, generation={"max_new_tokens": 8, "do_sample": True})
    torch.manual_seed(0)
    batch = rolled_out(module, data_batch(module, sums(2)), 0)
    batch["old_logps"] = batch["old_logps"] + 0.3 * torch.randn(batch["old_logps"].shape)
    with torch.no_grad():
        policy, reference = module.task_outputs(batch)
    mask = batch["labels"][:, 1:] != IGNORE
    ratio = torch.exp(policy - batch["old_logps"])[mask]
    kl = (torch.exp(reference - policy) - (reference - policy) - 1)[mask] * ratio
    advantage = batch["advantages"].unsqueeze(1).expand_as(mask)[mask]
    clipped = ((ratio < 0.8) & (advantage < 0)) | ((ratio > 1.2) & (advantage > 0))
    logs = module.task.step_logs((policy, reference), batch)
    assert math.isclose(logs["kl"], float(kl.mean()), rel_tol=1e-5)
    assert math.isclose(logs["clip_fraction"], float(clipped.float().mean()), rel_tol=1e-6)


def trl_advantages(rewards_per_func, weights, group, scale):
    """TRL 1.16 `_generate_and_score_completions` (grpo_trainer.py lines 2758-2810, sum_then_normalize), restated:
    it is inline in that method, which needs generation to run."""
    from trl.trainer.utils import nanstd

    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    mean = torch.nanmean(rewards.view(-1, group), dim=1).repeat_interleave(group)
    std = nanstd(rewards.view(-1, group), dim=1).repeat_interleave(group) if scale != "batch" else \
        nanstd(rewards).expand_as(rewards)
    result = rewards - mean
    if scale != "none":
        result = result / (std + 1e-4)
    return torch.nan_to_num(result, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trls(scale):
    torch.manual_seed(0)
    rewards = torch.randn(12, 2)
    rewards[3, 0] = float("nan")  # one function skipped a completion
    rewards[5] = float("nan")  # no function scored this one
    rewards[8:12, 1] = 0.5  # (a group of equal second rewards)
    weights = torch.tensor([1.0, 0.3])
    task = GRPO(reward_functions=["final_answer", "length_penalty"], reward_weights=[1.0, 0.3], scale_rewards=scale)
    ours = advantages(task.total_rewards(rewards), 4, scale)
    assert torch.allclose(ours, trl_advantages(rewards, weights, 4, scale), atol=1e-5)
    assert ours[5] == 0


# --- rollouts ------------------------------------------------------------------------------------
def test_rollout_groups_completions_and_masks_the_prompt(tiny_llama):
    module = module_for(tiny_llama, num_generations=3, generation={"max_new_tokens": 6, "do_sample": True})
    rows = sums(2)
    torch.manual_seed(0)
    batch = rolled_out(module, data_batch(module, rows), 0)
    tokenizer = module.tokenizer
    assert batch["index"].tolist() == [0, 0, 0, 1, 1, 1]
    for i in range(6):
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        prompt = tokenizer.decode(ids[labels == IGNORE][batch["attention_mask"][i][labels == IGNORE].bool()])
        assert prompt.endswith("<|im_start|>assistant\n") and rows[i // 3]["prompt"][0]["content"] in prompt
        completion = labels[labels != IGNORE]
        assert 1 <= len(completion) <= 6
        stops = (completion == tokenizer.convert_tokens_to_ids("<|im_end|>")).nonzero()
        assert len(stops) == 0 or stops[0] == len(completion) - 1  # the stop token ends it, nothing after
    group = batch["advantages"].view(2, 3)
    assert torch.allclose(group.sum(1), torch.zeros(2), atol=1e-4)


def test_completion_mask_keeps_the_first_stop_token():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 0, 0, 0, 0]])
    assert completion_mask(ids, [2]).int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_evaluation_rollout_is_greedy_and_scored(tiny_llama):
    module = module_for(tiny_llama, reward_functions=["final_answer", "length_penalty"])
    batch = data_batch(module, sums(3))
    first, again = (rolled_out(module, batch, None) for _ in range(2))
    assert torch.equal(first["rewards"], again["rewards"]) and first["rewards"].shape == (3, 2)
    texts = [row["generated_text"] for row in module.task.predict(module.model, batch, module.tokenizer)]
    assert first["rewards"][:, 1].tolist() == pytest.approx([-min(len(t) / 400, 1) for t in texts])


# --- reward functions ----------------------------------------------------------------------------
def test_built_in_rewards():
    assert extracted_answer("so 3 + 4 = 7\n#### 7") == 7
    assert extracted_answer("the answer is \\boxed{1,250}. Then 3") == 1250
    assert extracted_answer("it costs $12.50 and 3 more, so 15.5.") == 15.5
    assert extracted_answer("no number") is None
    assert final_answer([], ["#### 12", "12 apples", "13", "x"], final_answer=["12", "12", "12", "12"]) == \
        [1.0, 1.0, 0.0, 0.0]
    assert answer_format([], ["so\n#### 12", "12", "#### 12 dollars"]) == [1.0, 0.0, 0.0]
    assert final_answer([], [[{"role": "assistant", "content": "so 12"}]], final_answer=[12]) == [1.0]  # (TRL's form)
    assert length_penalty([], ["a" * 200, "a" * 1000]) == [-0.5, -1.0]


def bad_count(prompts, completions, **columns):
    return [1.0] * (len(completions) - 1)


def fails_on_seven(prompts, completions, final_answer, **columns):
    return [1 / (int(answer) - 7) for answer in final_answer]


def skips_all(prompts, completions, **columns):
    return [None] * len(completions)


def test_reward_plugin_errors_name_the_function_and_row(tiny_llama):
    rows = sums(4) + [{"prompt": [{"role": "user", "content": "the cat has 3 and 4 ?"}], "final_answer": "7"}]
    name = f"{__name__}:fails_on_seven"
    module = module_for(tiny_llama, reward_functions=[name], generation={"max_new_tokens": 4, "do_sample": True})
    with pytest.raises(InputError, match=rf"reward function '{name}' failed: ZeroDivisionError.*row 4 \(0-based\)"):
        rolled_out(module, data_batch(module, rows), 0)
    module.task = module.task.with_options(reward_functions=[f"{__name__}.bad_count"])
    with pytest.raises(InputError, match=r"bad_count' returned 19 values for 20 completions \(0-based rows "
                                         r"\[0, 1, 2, 3, 4\]"):
        rolled_out(module, data_batch(module, rows), 0)
    with pytest.raises(InputError, match="reward function 'nowhere': not a registered reward function"):
        GRPO(reward_functions=["nowhere"])
    with pytest.raises(InputError, match="cannot be imported"):
        reward_function("tasks.rewards:missing")
    with pytest.raises(InputError, match="2 weights for 1 reward functions"):
        GRPO(reward_weights=[1.0, 2.0])


def test_completions_no_function_scores_get_no_advantage(tiny_llama):
    module = module_for(tiny_llama, reward_functions=[f"{__name__}:skips_all"],
                        generation={"max_new_tokens": 4, "do_sample": True})
    batch = rolled_out(module, data_batch(module, sums(2)), 0)
    assert batch["advantages"].abs().sum() == 0 and batch["rewards"].isnan().all()


# --- the task through the core -------------------------------------------------------------------
def test_conformance(tiny_llama, tmp_path):
    task = GRPO.from_options(dict(reward_functions=["final_answer", "length_penalty"], num_generations=2,
                                  loss_type="grpo", beta=0.05, num_iterations=2,
                                  generation={"max_new_tokens": 6, "do_sample": True}))
    report = check_task(task, sums(12), workdir=tmp_path, backbone="llama", processes=1, epochs=2)
    assert {"val/reward", "val/reward_final_answer", "val/reward_length_penalty", "val/loss"} <= set(report.metrics)
    assert len(report.predictions) == 12 and all(isinstance(p["generated_text"], str) for p in report.predictions)


def test_cli_fit_logs_rewards_samples_and_timings(tiny_llama, tmp_path):
    from finetune.cli import run

    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", sums(n, seed)) for split, n, seed in
             (("train", 8, 0), ("val", 4, 1))}
    task = {"class_path": "tasks.verifiable_rewards.GRPO",
            "init_args": {"reward_functions": ["final_answer", "length_penalty"], "reward_weights": [1.0, 0.2],
                          "num_generations": 2, "samples_every_n_steps": 2,
                          "generation": {"max_new_tokens": 6, "do_sample": True}}}
    run(["fit", f"--model.backbone={tiny_llama}", f"--model.task={json.dumps(task)}",
         f"--data.train_file={files['train']}", f"--data.val_file={files['val']}", "--data.batch_size=2",
         "--trainer.max_epochs=1", "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path / 'logs'}",
         "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={tmp_path}",
         "--trainer.enable_progress_bar=false", "--seed_everything=0"])
    (metrics,) = (tmp_path / "logs").rglob("metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    for name in ("train/loss", "train/reward_final_answer", "train/reward_length_penalty_std", "train/reward_total",
                 "train/completion_length", "train/clip_fraction", "train/rollout_seconds", "train/train_seconds",
                 "val/reward_final_answer", "val/reward"):
        assert name in header, name
    samples = [json.loads(line) for line in next((tmp_path / "logs").rglob("samples.jsonl")).read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 0, 0, 0, 2, 2, 2, 2]  # every 2nd of 4 steps, 2 prompts x 2
    assert set(samples[0]) == {"step", "index", "prompt", "completion", "rewards", "advantage"}
    assert set(samples[0]["rewards"]) == {"final_answer", "length_penalty"}


def test_resume_mid_rollout_is_exact(tiny_llama, tmp_path):
    """Stopped at step 3 of 6, where the rollout of step 2 is still in use (num_iterations 2), a resumed run samples
    the same completions and ends with the same weights: the rollout is checkpointed, and sampling is seeded by the
    step."""
    from finetune.cli import run

    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", sums(n, seed)) for split, n, seed in
             (("train", 12, 0), ("val", 2, 1))}
    task = {"class_path": "tasks.verifiable_rewards.GRPO",
            "init_args": {"reward_functions": ["length_penalty"], "num_generations": 2, "num_iterations": 2,
                          "beta": 0.1, "samples_every_n_steps": 1,
                          "generation": {"max_new_tokens": 6, "do_sample": True}}}

    def fit(root, *extra):
        callback = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(root / "checkpoints"), "filename": "{step}",
                                  "every_n_train_steps": 1, "save_top_k": -1}}
        run(["fit", f"--model.backbone={tiny_llama}", f"--model.task={json.dumps(task)}",
             f"--data.train_file={files['train']}", f"--data.val_file={files['val']}", "--data.batch_size=2",
             "--model.optimizer.lr=0.05", "--model.lora.target_modules=all-linear", "--trainer.max_steps=6",
             f"--trainer.callbacks={json.dumps([callback])}", "--trainer.logger=CSVLogger",
             f"--trainer.logger.save_dir={root / 'logs'}", f"--trainer.default_root_dir={root}",
             "--trainer.enable_progress_bar=false", "--seed_everything=0", *extra])
        return [json.loads(line) for line in next((root / "logs").rglob("samples.jsonl")).read_text().splitlines()]

    whole = fit(tmp_path / "whole")
    resumed = fit(tmp_path / "resumed", f"--ckpt_path={tmp_path / 'whole' / 'checkpoints' / 'step=3.ckpt'}")
    assert {s["step"] for s in resumed} == {4}  # (step 3 reused step 2's rollout, from the checkpoint)
    assert [s for s in whole if s["step"] == 4] == resumed
    expected = torch.load(tmp_path / "whole" / "checkpoints" / "step=6.ckpt", weights_only=True)["state_dict"]
    found = torch.load(tmp_path / "resumed" / "checkpoints" / "step=6.ckpt", weights_only=True)["state_dict"]
    assert expected.keys() == found.keys()
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=0, atol=0)


def test_config_file_fits(tiny_llama, tmp_path):
    from conftest import REPO
    from finetune.cli import run

    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", sums(n, seed)) for split, n, seed in
             (("train", 4, 0), ("val", 2, 1))}
    cli = run(["fit", "--config", str(REPO / "configs" / "grpo.yaml"), f"--model.backbone={tiny_llama}",
               f"--data.train_file={files['train']}", f"--data.val_file={files['val']}",
               "--model.task.init_args.prompt_column=prompt", "--model.task.init_args.num_generations=2",
               "--model.task.init_args.generation.max_new_tokens=4", "--trainer.max_steps=1",
               "--trainer.val_check_interval=1", f"--trainer.default_root_dir={tmp_path}",
               "--trainer.enable_progress_bar=false", "--trainer.logger=false"])
    assert cli.trainer.global_step == 1
    assert cli.model.task.reward_functions == ["final_answer", "answer_format"]
    assert "val/reward_final_answer" in cli.trainer.callback_metrics

