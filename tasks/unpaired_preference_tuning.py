"""Unpaired preference tuning (KTO): a decoder-only LM learns from completions marked desirable or undesirable,
each on its own (no pairs), measured against a reference: the backbone as it was before this training.

Rows: `prompt` (a conversation ending with a user turn, or a text), `completion` (the assistant's reply: a text, or
a list of one assistant message) and `label` (true: desirable, false: undesirable). KTO's reference point z0, the
KL divergence of the model from its reference, is estimated on the batch: each prompt with another row's completion
(the next row of the batch with another prompt), as KTO's authors and TRL do. A batch of n rows runs as n matched
sequences (with gradients) and n mismatched ones (without), on the model and on the reference (the adapter
switched off, as for DPO).
"""

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torchmetrics import Metric, MetricCollection
from transformers import AutoModelForCausalLM, PretrainedConfig

from finetune.chat import (
    ChatFormat,
    GenerationSettings,
    completion_problem,
    fitted,
    prompt_batch,
    prompt_ends,
    prompt_messages,
    prompt_problem,
    reply_text,
    require_decoder,
    sequence_batch,
)
from finetune.columns import conversation_row
from finetune.errors import InputError
from finetune.files import value_kind
from finetune.target_tokens import IGNORE, target_tokens
from finetune.task import Column, Task, task_option


class UnpairedPreferenceScores(Metric):
    """Over the rows of a split (TRL's KTO figures, as exact means): `chosen_reward` (mean reward of the desirable
    completions), `rejected_reward` (of the undesirable ones), `reward_margin` (their difference) and `kl` (the
    mean log-probability ratio of the model to its reference on the mismatched prompt-completion pairs: what z0
    estimates, before its clamp at 0). A reward is beta x the log-ratio of the completion. Sums are the states."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("rows", "desirable", "undesirable", "chosen", "rejected", "kl"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, rewards: torch.Tensor, desirable: torch.Tensor, mismatched_log_ratios: torch.Tensor) -> None:
        rewards = rewards.double()
        self.rows += len(rewards)
        self.desirable += desirable.sum()
        self.undesirable += (~desirable).sum()
        self.chosen += rewards[desirable].sum()
        self.rejected += rewards[~desirable].sum()
        self.kl += mismatched_log_ratios.double().sum()

    def compute(self) -> dict[str, torch.Tensor]:
        chosen, rejected = self.chosen / self.desirable.clamp(min=1), self.rejected / self.undesirable.clamp(min=1)
        return {"chosen_reward": chosen, "rejected_reward": rejected, "reward_margin": chosen - rejected,
                "kl": self.kl / self.rows.clamp(min=1)}


def mismatched(prompts: list[list[int]]) -> list[int]:
    """For each row of a batch, the row whose completion it is paired with for the KL estimate: the next one
    (cyclically) with another prompt; the next one when all prompts are the same."""
    n = len(prompts)
    return [next((j % n for j in range(i + 1, i + n) if prompts[j % n] != prompts[i]), (i + 1) % n) for i in range(n)]


@dataclass(frozen=True)
class UnpairedPreferenceTuning(Task):
    """Unpaired preference tuning (KTO) of a decoder-only LM on completions marked desirable or undesirable.

    Args:
        prompt_column: the column of prompts (a conversation, or a text).
        completion_column: the column of completions (the assistant's reply).
        label_column: the column saying whether the completion is desirable (true) or undesirable (false).
        beta: how far the model may move from the reference (KTO's beta).
        desirable_weight: the weight of a desirable row's loss (KTO's lambda_D).
        undesirable_weight: the weight of an undesirable row's loss (KTO's lambda_U); with more rows of one kind,
            choose the weights so that lambda_D x desirable rows / (lambda_U x undesirable rows) is in [1, 4/3].
        chat: `chat_template`, `system_prompt`, `stop_token`, as in instruction tuning.
        max_length: tokens per sequence; a longer one keeps its prompt's end (at least half of max_length) and its
            completion's start.
        generation: decoding settings of `predict` (greedy by default).
    """

    prompt_column: str = "prompt"
    completion_column: str = "completion"
    label_column: str = "label"
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    chat: ChatFormat = field(default_factory=ChatFormat)
    max_length: int = 1024
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    compares_to_reference = True

    def __post_init__(self) -> None:
        for option in ("beta", "desirable_weight", "undesirable_weight"):
            if getattr(self, option) <= 0:
                raise InputError(f"{task_option(option)}: must be positive, got {getattr(self, option)}")
        if self.max_length < 4:
            raise InputError(f"{task_option('max_length')}: must be at least 4, got {self.max_length}")

    def columns(self) -> list[Column]:
        return [Column("prompt_column", "messages"), Column("completion_column", "id", target=True),
                Column("label_column", "label", target=True)]

    def model_class(self, config: PretrainedConfig) -> type:
        return AutoModelForCausalLM

    def backbone_options(self, config: PretrainedConfig, tokenizer: Any) -> dict[str, Any]:
        require_decoder(config, tokenizer, "preference tuning")
        return {"chat": self.chat.settle(tokenizer)}

    # --- data ----------------------------------------------------------------------------------
    def check_rows(self, split: str, rows: Any, where: str) -> None:
        targets = split != "predict"
        names = [self.prompt_column] + ([self.completion_column, self.label_column] if targets else [])
        for row, values in enumerate(zip(*(rows[name] for name in names)), start=1):
            problems = {"prompt_column": prompt_problem(values[0])}
            if targets:
                problems["completion_column"] = completion_problem(values[1])
                if not isinstance(values[2], bool):
                    problems["label_column"] = (f"must be true (a desirable completion) or false (an undesirable "
                                                f"one), got {value_kind(values[2])}: {values[2]!r:.40}")
            for option, problem in problems.items():
                if problem:
                    raise InputError(f"{where}, row {row}: column {getattr(self, option)!r} ({task_option(option)}) "
                                     f"{problem}")
        if split == "train":
            self.check_balance(sum(rows[self.label_column]), len(rows))

    def check_balance(self, desirable: int, rows: int) -> None:
        """KTO's paper (eq. 8): the weighted desirable rows should be 1 to 4/3 times the weighted undesirable ones."""
        undesirable = rows - desirable
        if not desirable or not undesirable:
            rank_zero_warn(f"the training rows are all {'un' * (not desirable)}desirable: KTO learns from both kinds")
            return
        ratio = self.desirable_weight * desirable / (self.undesirable_weight * undesirable)
        if not 1 <= ratio <= 4 / 3:
            low = self.undesirable_weight * undesirable / desirable
            rank_zero_warn(f"{desirable} desirable and {undesirable} undesirable training rows: with these weights "
                           f"the desirable ones weigh {ratio:.2f} x the undesirable ones, KTO's paper advises 1 to "
                           f"4/3: set {task_option('desirable_weight')} in [{low:.2f}, {low * 4 / 3:.2f}]")

    def preprocess(self, examples: dict[str, list], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        conversations = [prompt_messages(prompt) for prompt in examples[self.prompt_column]]
        if not with_targets:  # the prompt, with the assistant's turn opened
            return {"input_ids": prompt_ends(self.chat.prompt_ids(conversations, tokenizer), self.max_length)}
        features: dict[str, list] = {"input_ids": [], "completion": [], "desirable": []}
        long = 0
        for messages, completion, label in zip(conversations, examples[self.completion_column],
                                               examples[self.label_column]):
            prompt_ids, completion_ids = self.chat.encode_reply(messages, reply_text(completion), tokenizer)
            if len(prompt_ids) + len(completion_ids) > self.max_length:
                long += 1
                prompt_ids, (completion_ids,) = fitted(prompt_ids, [completion_ids], self.max_length)
            features["input_ids"].append(prompt_ids)
            features["completion"].append(completion_ids)
            features["desirable"].append(label)
        if long:
            rank_zero_warn(f"{long} of {len(conversations)} rows are longer than {task_option('max_length')}="
                           f"{self.max_length} tokens: their prompts keep their end and their completions their start")
        return features

    def collate(self, features: list[dict], tokenizer: Any, with_targets: bool) -> dict[str, torch.Tensor]:
        prompts = [f["input_ids"] for f in features]
        if not with_targets:
            return prompt_batch(prompts, tokenizer.pad_token_id)
        # 2n sequences: the n prompts with their completions, then with another row's (for the KL estimate); a
        # mismatched sequence longer than max_length loses its completion's end
        completions = [f["completion"] for f in features]
        completions += [completions[j][:self.max_length - len(prompts[i])] for i, j in enumerate(mismatched(prompts))]
        prompts *= 2
        batch = sequence_batch([p + c for p, c in zip(prompts, completions)],
                               [[IGNORE] * len(p) + c for p, c in zip(prompts, completions)], tokenizer.pad_token_id)
        batch["desirable"] = torch.tensor([f["desirable"] for f in features], dtype=torch.bool)
        return batch

    # --- model ---------------------------------------------------------------------------------
    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each sequence's completion log-probability: the matched ones, then the mismatched ones (without
        gradients: z0 is a constant of the loss). The core runs this on the model and on its reference."""
        rows = len(batch["desirable"])
        logps = []
        for part in (slice(0, rows), slice(rows, 2 * rows)):
            inputs = {"input_ids": batch["input_ids"][part], "attention_mask": batch["attention_mask"][part],
                      "use_cache": False}
            with torch.set_grad_enabled(torch.is_grad_enabled() and part.start == 0):
                logps.append(target_tokens(model, inputs, batch["labels"][part]).per_row(rows))
        return torch.cat(logps)

    def log_ratios(self, outputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(matched, mismatched) log-probability ratios of the model to its reference, per row."""
        policy, reference = outputs
        return (policy - reference).chunk(2)

    def loss(self, outputs: tuple[torch.Tensor, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        matched, mismatched_ratios = self.log_ratios(outputs)
        z0 = mismatched_ratios.detach().mean().clamp(min=0)
        desirable = batch["desirable"]
        losses = torch.where(desirable, self.desirable_weight * (1 - torch.sigmoid(self.beta * (matched - z0))),
                             self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z0 - matched))))
        return losses.mean()

    # --- evaluation and prediction -------------------------------------------------------------
    def metrics(self, split: str, context: Any) -> MetricCollection:
        return MetricCollection({"rewards": UnpairedPreferenceScores()})

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict, model: Any, tokenizer: Any) -> None:
        matched, mismatched_ratios = self.log_ratios(outputs)
        metrics.update(self.beta * matched.detach(), batch["desirable"], mismatched_ratios.detach())

    def predict(self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[dict[str, Any]]:
        return [{"generated_text": text} for text in self.chat.generate(model, batch, tokenizer, self.generation)]

    def chat_row(self, messages: list[dict[str, str]]) -> Optional[dict[str, Any]]:
        return conversation_row(self, messages)
