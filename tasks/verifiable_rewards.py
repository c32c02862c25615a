"""Online reinforcement learning with verifiable rewards: group relative policy optimisation (GRPO, DAPO, Dr. GRPO)
of a decoder-only LM.

Rows: a prompt (a conversation ending with a user turn, or a text) and whatever other columns the reward functions
read (e.g. `final_answer`). Every training step the core asks the task for a rollout (`Task.rollout`): the model
samples `num_generations` completions of each prompt of the batch (the `generation` settings; batched, left-padded,
KV-cached), the reward functions (`tasks/rewards.py`) score them, and each reward becomes an advantage: minus its
group's mean, divided by the group's (or the batch's) standard deviation. The loss is the clipped policy-gradient
loss on the completion tokens (and the stop token ending them), with a KL term to the reference (the backbone with
the adapter switched off) when `beta` > 0. A group stays in its process: every process samples its own prompts'.

The losses are TRL's (`GRPOTrainer`, trl 1.16) on the same completions: `grpo` the mean over completions of
their token means, `dapo` the mean over all completion tokens of the optimizer step (every micro-batch and
process), `dr_grpo` the mean over completions of their token sums divided by `generation.max_new_tokens`. Unlike
TRL, log-probabilities are the model's at temperature 1 whatever the sampling temperature.

Validation and test generate one greedy completion per prompt and report the mean reward per function (for
`final_answer`, the accuracy); their loss is minus the weighted reward.
"""

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from torchmetrics import Metric, MetricCollection
from transformers import AutoModelForCausalLM, PretrainedConfig

from finetune.chat import (
    ChatFormat,
    GenerationSettings,
    decoded_texts,
    prompt_batch,
    prompt_ends,
    prompt_messages,
    prompt_problem,
    require_decoder,
    sequence_batch,
)
from finetune.columns import conversation_row
from finetune.errors import InputError
from finetune.target_tokens import IGNORE, target_tokens
from finetune.task import Column, Task, task_option
from tasks.rewards import reward_function

SAMPLING = GenerationSettings(max_new_tokens=128, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)


class RewardMeans(Metric):
    """The mean reward per reward function over a split's completions (those it scored) and the mean weighted
    total (`reward`). Sums are the states: exact whatever the batching and processes."""

    full_state_update = False

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = names
        self.add_state("sums", torch.zeros(len(names) + 1, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(len(names) + 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, rewards: torch.Tensor, totals: torch.Tensor) -> None:
        values = torch.cat([rewards, totals.unsqueeze(1)], 1).double()
        scored = ~values.isnan()
        self.sums += values.nan_to_num().sum(0)
        self.counts += scored.sum(0)

    def compute(self) -> dict[str, torch.Tensor]:
        means = self.sums / self.counts.clamp(min=1)
        return {**{f"reward_{name}": mean for name, mean in zip(self.names, means)}, "reward": means[-1]}


def nanstd(values: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """The sample standard deviation (n - 1) of the values that are not NaN."""
    mean = values.nanmean(dim=dim, keepdim=True)
    count = (~values.isnan()).sum(dim=dim, keepdim=True)
    variance = ((values - mean) ** 2).nanmean(dim=dim, keepdim=True) * count / (count - 1)
    return variance.sqrt().squeeze() if dim is None else variance.sqrt().squeeze(dim)


def advantages(rewards: torch.Tensor, group_size: int, scale: str) -> torch.Tensor:
    """Each completion's advantage from its total reward (NaN: unscored): minus its group's mean, divided by the
    std of its group (`group`), of the batch (`batch`) plus 1e-4, or not (`none`); 0 for an unscored one."""
    groups = rewards.view(-1, group_size)
    centred = (groups - groups.nanmean(1, keepdim=True)).flatten()
    if scale == "group":
        centred = centred / (nanstd(groups, 1).repeat_interleave(group_size) + 1e-4)
    elif scale == "batch":
        centred = centred / (nanstd(rewards) + 1e-4)
    return centred.nan_to_num(nan=0.0)


def completion_mask(ids: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """The generated tokens up to and including the first stop token of each row (the rest is padding)."""
    stops = torch.isin(ids, torch.tensor(stop_ids, device=ids.device)).int()
    return (stops.cumsum(1) - stops) == 0


@dataclass(frozen=True)
class GRPO(Task):
    """Group relative policy optimisation (GRPO, DAPO, Dr. GRPO) with verifiable rewards, of a decoder-only LM.

    Args:
        prompt_column: the column of prompts (a conversation ending with a user turn, or a text).
        reward_functions: the reward functions, each a registered name (`final_answer`, `answer_format`,
            `length_penalty`) or an import path `module:function`, called with the prompts, the completions and
            every other column of the rows (see tasks/rewards.py).
        reward_weights: the weight of each reward function in the total reward (None: 1 each).
        num_generations: completions sampled per prompt (a group; G).
        loss_type: `grpo` (mean over completions of their token means), `dapo` (mean over the step's completion
            tokens) or `dr_grpo` (mean over completions of their token sums / generation.max_new_tokens).
        scale_rewards: an advantage is the reward minus its group's mean, divided by the std of the `group`, of
            the `batch` (this process's micro-batch), or `none`.
        epsilon: the probability ratio is clipped below at 1 - epsilon.
        epsilon_high: and above at 1 + epsilon_high (None: epsilon; DAPO uses 0.28).
        num_iterations: optimizer steps per rollout: one sampling serves that many steps, its ratios taken to
            the log-probabilities of the model that sampled it (mu in the GRPO paper). The data's batches of the
            steps in between are not rolled out: an epoch samples 1 / num_iterations of the prompts.
        beta: weight of the KL term to the reference (the backbone with the adapter switched off); 0: none.
        samples_every_n_steps: every N optimizer steps the rollout's prompts, completions, rewards and advantages
            are appended to `samples.jsonl` in the run's log directory (0: never).
        chat: `chat_template`, `system_prompt`, `stop_token`, as in instruction tuning.
        max_prompt_length: longer prompts keep their last tokens.
        generation: how completions are sampled in training (`do_sample`, `temperature`, `top_k`, `top_p`,
            `max_new_tokens`); validation, test and predict decode greedily with its `max_new_tokens`.
    """

    prompt_column: str = "prompt"
    reward_functions: list[str] = field(default_factory=lambda: ["final_answer"])
    reward_weights: Optional[list[float]] = None
    num_generations: int = 4
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    num_iterations: int = 1
    beta: float = 0.0
    samples_every_n_steps: int = 10
    chat: ChatFormat = field(default_factory=ChatFormat)
    max_prompt_length: int = 512
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(**vars(SAMPLING)))

    def __post_init__(self) -> None:
        if not self.reward_functions:
            raise InputError(f"{task_option('reward_functions')}: name at least one reward function")
        for name in self.reward_functions:
            reward_function(name)  # (a wrong name fails now, not at the first step)
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_functions):
            raise InputError(f"{task_option('reward_weights')}: {len(self.reward_weights)} weights for "
                             f"{len(self.reward_functions)} reward functions; give one per function")
        for option, least in (("num_generations", 2), ("num_iterations", 1), ("max_prompt_length", 1)):
            if getattr(self, option) < least:
                raise InputError(f"{task_option(option)}: must be at least {least}, got {getattr(self, option)}")
        if self.beta < 0 or self.epsilon < 0 or (self.epsilon_high or 0) < 0:
            raise InputError(f"{task_option('beta')}, epsilon and epsilon_high must not be negative")

    def rollout_steps(self) -> int:
        return self.num_iterations

    @property
    def compares_to_reference(self) -> bool:  # (the reference's log-probabilities only for the KL term)
        return self.beta != 0

    def columns(self) -> list[Column]:
        return [Column("prompt_column", "messages")]

    def model_class(self, config: PretrainedConfig) -> type:
        return AutoModelForCausalLM

    def backbone_options(self, config: PretrainedConfig, tokenizer: Any) -> dict[str, Any]:
        require_decoder(config, tokenizer, "GRPO")
        return {"chat": self.chat.settle(tokenizer)}

    # --- data ----------------------------------------------------------------------------------
    def check_rows(self, split: str, rows: Any, where: str) -> None:
        for row, prompt in enumerate(rows[self.prompt_column], start=1):
            problem = prompt_problem(prompt)
            if problem:
                raise InputError(f"{where}, row {row}: column {self.prompt_column!r} "
                                 f"({task_option('prompt_column')}) {problem}")

    def preprocess(self, examples: dict[str, list], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        prompts = examples[self.prompt_column]
        conversations = [prompt_messages(p) for p in prompts]
        ids = prompt_ends(self.chat.prompt_ids(conversations, tokenizer), self.max_prompt_length)
        if not with_targets:
            return {"input_ids": ids}
        # The row as the reward functions read it (JSON: columns of any type fit one Arrow column).
        rows = [json.dumps({key: values[i] for key, values in examples.items()}) for i in range(len(prompts))]
        return {"input_ids": ids, "row": rows}

    def collate(self, features: list[dict], tokenizer: Any, with_targets: bool) -> dict[str, Any]:
        batch: dict[str, Any] = prompt_batch([f["input_ids"] for f in features], tokenizer.pad_token_id)
        if with_targets:
            batch["rows"] = [json.loads(f["row"]) for f in features]
        return batch

    # --- rollouts ------------------------------------------------------------------------------
    def rollout(self, model: Any, batch: dict[str, Any], tokenizer: Any, step: Optional[int]) -> dict[str, Any]:
        group = 1 if step is None else self.num_generations
        prompt_ids = batch["prompt_ids"].repeat_interleave(group, 0)
        prompt_mask = batch["prompt_attention_mask"].repeat_interleave(group, 0)
        settings = self.generation if step is not None else GenerationSettings(self.generation.max_new_tokens)
        stop_ids = self.chat.stop_ids(tokenizer)
        output = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **settings.generate_kwargs(),
                                eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        completion_ids = output[:, prompt_ids.shape[1]:]
        mask = completion_mask(completion_ids, stop_ids)
        completions = decoded_texts(completion_ids.masked_fill(~mask, tokenizer.pad_token_id), tokenizer)
        rows = [row for row in batch["rows"] for _ in range(group)]
        index = batch["index"].repeat_interleave(group)
        rewards = self.rewards(rows, completions, index.tolist())
        totals = self.total_rewards(rewards)
        if step is None:
            return {"rewards": rewards, "totals": totals, "index": index}
        prompts = [ids[keep.bool()].tolist() for ids, keep in zip(prompt_ids, prompt_mask)]
        replies = [ids[keep].tolist() for ids, keep in zip(completion_ids, mask)]
        rolled = sequence_batch([p + r for p, r in zip(prompts, replies)],
                                [[IGNORE] * len(p) + r for p, r in zip(prompts, replies)], tokenizer.pad_token_id)
        rolled.update(rewards=rewards, advantages=advantages(totals, group, self.scale_rewards), index=index)
        if self.num_iterations > 1:  # the sampling model's log-probabilities, for the steps that reuse the rollout
            rolled["old_logps"] = self.token_logps(model, rolled)
        if self.samples_every_n_steps and step % self.samples_every_n_steps == 0:
            rolled["samples"] = [
                {"index": int(i), "prompt": row[self.prompt_column], "completion": completion,
                 "rewards": dict(zip(self.reward_functions, [None if r != r else r for r in values])),
                 "advantage": float(advantage)}
                for i, row, completion, values, advantage in zip(
                    index, rows, completions, rewards.tolist(), rolled["advantages"])]
        return rolled

    def rewards(self, rows: list[dict], completions: list[str], examples: list[int]) -> torch.Tensor:
        """Each reward function's rewards of the completions (NaN where it returned None), one column each."""
        prompts = [row[self.prompt_column] for row in rows]
        columns = {key: [row[key] for row in rows] for key in rows[0] if key != self.prompt_column}
        scores = []
        for name in self.reward_functions:
            function = reward_function(name)
            try:
                values = function(prompts=prompts, completions=completions, **columns)
            except Exception as err:  # (user code: name it and the row it fails on)
                raise InputError(f"reward function {name!r} failed: {type(err).__name__}: {err} "
                                 f"(on {failing_row(function, prompts, completions, columns, examples)})") from err
            values = list(values) if isinstance(values, (list, tuple)) else values
            if not isinstance(values, list) or len(values) != len(completions):
                raise InputError(f"reward function {name!r} returned {describe(values)} for {len(completions)} "
                                 f"completions (0-based rows {sorted(set(examples))} of the data file); it must return "
                                 "one float (or None) per completion")
            for value, example in zip(values, examples):
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise InputError(f"reward function {name!r} returned {value!r} for a completion of row {example} "
                                     "(0-based) of the data file; a reward is a float, or None to skip")
            scores.append([float("nan") if v is None else float(v) for v in values])
        return torch.tensor(scores, dtype=torch.float32).T

    def total_rewards(self, rewards: torch.Tensor) -> torch.Tensor:
        """The weighted sum of a completion's rewards (None counts 0), NaN when no function scored it."""
        weights = torch.tensor(self.reward_weights or [1.0] * rewards.shape[1])
        totals = (rewards * weights).nansum(1)
        return totals.masked_fill(rewards.isnan().all(1), float("nan"))

    # --- model ---------------------------------------------------------------------------------
    def token_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The completion tokens' log-probabilities, at their positions in `labels[:, 1:]` (0 elsewhere)."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        targets = batch["labels"][:, 1:] != IGNORE
        return torch.zeros(targets.shape, device=targets.device).masked_scatter(
            targets, target_tokens(model, inputs, batch["labels"]).logps)

    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The completion tokens' log-probabilities (`token_logps`); nothing for an evaluation rollout."""
        return self.token_logps(model, batch) if "labels" in batch else None

    def token_losses(self, outputs: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per completion token (rows x positions, 0 off the completions): the clipped policy-gradient loss (plus
        beta x KL), the ratio's clipping and the KL to the reference."""
        logps, reference = outputs if self.compares_to_reference else (outputs, None)
        old = batch.get("old_logps", logps.detach())
        ratio = torch.exp(logps - old)
        advantage = batch["advantages"].unsqueeze(1)
        clipped = torch.clamp(ratio, 1 - self.epsilon, 1 + (self.epsilon if self.epsilon_high is None
                                                            else self.epsilon_high))
        losses = -torch.min(ratio * advantage, clipped * advantage)
        kl = torch.zeros_like(logps)
        if reference is not None:
            # (k3 estimator, weighted by the ratio: unbiased for completions sampled by the old model, as TRL's
            # default `use_bias_correction_kl`)
            kl = (torch.exp(reference - logps) - (reference - logps) - 1) * ratio
            losses = losses + self.beta * kl
        mask = (batch["labels"][:, 1:] != IGNORE).float()
        clipping = ((ratio < 1 - self.epsilon) & (advantage < 0)) | ((ratio > clipped) & (advantage > 0))
        return {"loss": losses * mask, "clipped": clipping.float() * mask, "kl": kl.detach() * mask, "mask": mask}

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "labels" not in batch:  # evaluation: minus the mean weighted reward of the greedy completions
            return -batch["totals"].nan_to_num().mean()
        token = self.token_losses(outputs, batch)
        tokens = token["mask"].sum(1)
        if self.loss_type == "grpo":
            return (token["loss"].sum(1) / tokens.clamp(min=1)).mean()
        if self.loss_type == "dr_grpo":
            return (token["loss"].sum(1) / self.generation.max_new_tokens).mean()
        return token["loss"].sum() / tokens.sum().clamp(min=1)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        if self.loss_type == "dapo" and "labels" in batch:  # completion tokens
            return int((batch["labels"][:, 1:] != IGNORE).sum())
        return len(batch["index"])

    def step_logs(self, outputs: Any, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Reward mean and std per function and of the total, completion length, clipped share, KL."""
        with torch.no_grad():
            token = self.token_losses(outputs, batch)
        tokens = token["mask"].sum()
        logs = {"completion_length": float(tokens / len(token["mask"])),
                "clip_fraction": float(token["clipped"].sum() / tokens.clamp(min=1))}
        if self.compares_to_reference:
            logs["kl"] = float(token["kl"].sum() / tokens.clamp(min=1))
        totals = self.total_rewards(batch["rewards"])
        for name, values in [*zip(self.reward_functions, batch["rewards"].T), ("total", totals)]:
            logs[f"reward_{name}"] = float(values.nanmean())
            logs[f"reward_{name}_std"] = float(nanstd(values)) if (~values.isnan()).sum() > 1 else 0.0
        return logs

    # --- evaluation and prediction -------------------------------------------------------------
    def metrics(self, split: str, context: Any) -> MetricCollection:
        return MetricCollection({"rewards": RewardMeans(list(self.reward_functions))})

    def computes_metrics(self, split: str, fit_epoch: Optional[int]) -> bool:
        return split != "train"  # (training reports its rewards per step)

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict, model: Any, tokenizer: Any) -> None:
        metrics.update(batch["rewards"], batch["totals"])

    def predict(self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[dict[str, Any]]:
        greedy = GenerationSettings(self.generation.max_new_tokens)
        return [{"generated_text": text} for text in self.chat.generate(model, batch, tokenizer, greedy)]

    def chat_row(self, messages: list[dict[str, str]]) -> Optional[dict[str, Any]]:
        return conversation_row(self, messages)


def failing_row(function: Any, prompts: list, completions: list[str], columns: dict[str, list],
                examples: list[int]) -> str:
    """Which row a reward function fails on, found by calling it on one completion at a time."""
    for i, example in enumerate(examples):
        try:
            function(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
                     **{key: values[i:i + 1] for key, values in columns.items()})
        except Exception:
            return f"row {example} (0-based) of the data file, completion {completions[i]!r:.80}"
    return f"the batch of rows {sorted(set(examples))} (0-based) of the data file, though on no single row"


def describe(values: Any) -> str:
    return f"{len(values)} values" if isinstance(values, list) else f"a {type(values).__name__}"
