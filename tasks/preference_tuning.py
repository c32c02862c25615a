"""Preference tuning (DPO, IPO, SimPO, ORPO): a decoder-only LM learns to prefer the chosen completion of a
prompt to the rejected one.

Rows: `prompt` (a conversation: a list of {role, content} messages ending with a user turn, or a text: one
user turn), `chosen` and `rejected` (the assistant's reply: a text, or a list of one assistant message). Both
completions of a batch's pairs run in one forward pass; only their tokens (and the end-of-turn token after
them) count. DPO and IPO measure the model against a reference: the same model with the LoRA adapter switched
off (no second copy in memory; with `lora: null` the core keeps a frozen copy of the backbone). SimPO and ORPO
have no reference: the core neither builds nor runs one.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
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
from finetune.target_tokens import IGNORE, target_tokens
from finetune.task import Column, Task, task_option


class PreferenceScores(Metric):
    """Over the pairs of a split: `reward_accuracy` (the chosen completion's reward above the rejected one's; a
    tie counts one half, so a model equal to its reference scores 0.5), `reward_margin` (mean chosen - rejected
    reward), `chosen_reward` and `rejected_reward` (means). A reward is beta x what the loss compares
    (`PreferenceTuning.compared`). Sums are the states: exact whatever the batching and processes."""

    full_state_update = False

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta
        for name in ("pairs", "wins", "chosen", "rejected"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> None:
        chosen, rejected = chosen_rewards.double(), rejected_rewards.double()
        self.pairs += len(chosen)
        self.wins += (chosen > rejected).sum() + 0.5 * (chosen == rejected).sum()
        self.chosen += chosen.sum()
        self.rejected += rejected.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        pairs = self.pairs.clamp(min=1)
        return {"reward_accuracy": self.wins / pairs, "reward_margin": (self.chosen - self.rejected) / pairs,
                "chosen_reward": self.chosen / pairs, "rejected_reward": self.rejected / pairs}


def completion_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each sequence's scored tokens (its completion and the end-of-turn token)."""
    return (batch["labels"][:, 1:] != IGNORE).sum(-1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (Maechler 2012: log1p below -log 2, expm1 above)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class Scores(NamedTuple):
    """`PreferenceTuning.forward`'s outputs: each sequence's completion log-probability (the chosen completions,
    then the rejected ones); for ORPO also the chosen sequences' summed log-probability of every token (the prompt
    included) and how many tokens that is."""

    completions: torch.Tensor
    chosen_sequences: Optional[torch.Tensor] = None
    chosen_tokens: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class PreferenceTuning(Task):
    """Preference tuning (DPO, IPO, SimPO, ORPO) of a decoder-only LM on chosen/rejected pairs.

    Args:
        prompt_column: the column of prompts (a conversation, or a text).
        chosen_column: the column of the preferred completions.
        rejected_column: the column of the rejected completions.
        loss_type: `sigmoid` (DPO: -log sigmoid(beta x margin of log-ratios to the reference)), `ipo` (IPO: (margin
            of per-token log-ratios - 1 / (2 beta))^2), `simpo` (SimPO, no reference: -log sigmoid(beta x margin of
            mean per-token log-probabilities - gamma)) or `orpo` (ORPO, no reference: the chosen sequences' token
            mean negative log-likelihood, prompt included, - beta x log sigmoid(log odds ratio of the mean per-token
            probabilities)).
        beta: DPO's beta (how far the model may move from the reference), IPO's tau, SimPO's beta (its paper uses
            2 to 2.5), ORPO's lambda (the weight of the odds-ratio term).
        gamma: SimPO's target reward margin (TRL's `simpo_gamma`).
        label_smoothing: sigmoid and simpo losses: the share of pairs assumed mislabelled (conservative DPO), 0 to
            0.5.
        chat: `chat_template`, `system_prompt`, `stop_token`, as in instruction tuning (a prompt of several turns
            needs a chat template).
        max_length: tokens per pair; a longer pair keeps its prompt's end (at least half of max_length) and its
            completions' start.
        generation: decoding settings of `predict` (greedy by default).
    """

    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    loss_type: Literal["sigmoid", "ipo", "simpo", "orpo"] = "sigmoid"
    beta: float = 0.1
    gamma: float = 0.5
    label_smoothing: float = 0.0
    chat: ChatFormat = field(default_factory=ChatFormat)
    max_length: int = 1024
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    @property
    def compares_to_reference(self) -> bool:  # (the core reads it from the task: SimPO and ORPO build no reference)
        return self.loss_type in ("sigmoid", "ipo")

    def __post_init__(self) -> None:
        if self.beta <= 0:
            raise InputError(f"{task_option('beta')}: must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise InputError(f"{task_option('label_smoothing')}: must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type in ("ipo", "orpo"):
            raise InputError(f"{task_option('label_smoothing')}: the {self.loss_type} loss has no label smoothing "
                             f"(sigmoid and simpo have); got {self.label_smoothing}")
        if self.max_length < 4:
            raise InputError(f"{task_option('max_length')}: must be at least 4, got {self.max_length}")

    def columns(self) -> list[Column]:
        return [Column("prompt_column", "messages"), Column("chosen_column", "id", target=True),
                Column("rejected_column", "id", target=True)]

    def model_class(self, config: PretrainedConfig) -> type:
        return AutoModelForCausalLM

    def backbone_options(self, config: PretrainedConfig, tokenizer: Any) -> dict[str, Any]:
        require_decoder(config, tokenizer, "preference tuning")
        return {"chat": self.chat.settle(tokenizer)}

    # --- data ----------------------------------------------------------------------------------
    def check_rows(self, split: str, rows: Any, where: str) -> None:
        targets = split != "predict"
        names = [self.prompt_column] + ([self.chosen_column, self.rejected_column] if targets else [])
        for row, values in enumerate(zip(*(rows[name] for name in names)), start=1):
            problem = prompt_problem(values[0])
            if problem:
                raise InputError(f"{where}, row {row}: column {self.prompt_column!r} "
                                 f"({task_option('prompt_column')}) {problem}")
            if targets:
                for option, value in zip(("chosen_column", "rejected_column"), values[1:]):
                    problem = completion_problem(value)
                    if problem:
                        raise InputError(f"{where}, row {row}: column {getattr(self, option)!r} "
                                         f"({task_option(option)}) {problem}")
                if reply_text(values[1]).strip() == reply_text(values[2]).strip():
                    raise InputError(f"{where}, row {row}: the chosen and the rejected completion are the same text "
                                     f"({reply_text(values[1])!r:.60}); a pair must differ to say which is preferred")

    def preprocess(self, examples: dict[str, list], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        conversations = [prompt_messages(prompt) for prompt in examples[self.prompt_column]]
        if not with_targets:  # the prompt, with the assistant's turn opened
            return {"input_ids": prompt_ends(self.chat.prompt_ids(conversations, tokenizer), self.max_length)}
        features: dict[str, list] = {"input_ids": [], "chosen": [], "rejected": []}
        long = 0
        for messages, chosen, rejected in zip(conversations, examples[self.chosen_column],
                                              examples[self.rejected_column]):
            # (the chosen reply's rendering checks the template; the rejected one follows the same prompt)
            prompt_ids, chosen_ids = self.chat.encode_reply(messages, reply_text(chosen), tokenizer)
            rejected_ids = self.chat.reply_ids(reply_text(rejected), tokenizer)
            if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > self.max_length:
                long += 1
                prompt_ids, (chosen_ids, rejected_ids) = fitted(prompt_ids, [chosen_ids, rejected_ids], self.max_length)
            features["input_ids"].append(prompt_ids)
            features["chosen"].append(chosen_ids)
            features["rejected"].append(rejected_ids)
        if long:
            rank_zero_warn(f"{long} of {len(conversations)} pairs are longer than {task_option('max_length')}="
                           f"{self.max_length} tokens: their prompts keep their end and their completions their start")
        return features

    def collate(self, features: list[dict], tokenizer: Any, with_targets: bool) -> dict[str, torch.Tensor]:
        prompts = [f["input_ids"] for f in features]
        if not with_targets:
            return prompt_batch(prompts, tokenizer.pad_token_id)
        # one batch of 2n sequences: the n prompts with their chosen completions, then with their rejected ones
        prompts *= 2
        completions = [f["chosen"] for f in features] + [f["rejected"] for f in features]
        return sequence_batch([p + c for p, c in zip(prompts, completions)],
                              [[IGNORE] * len(p) + c for p, c in zip(prompts, completions)], tokenizer.pad_token_id)

    # --- model ---------------------------------------------------------------------------------
    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> Scores:
        """Each sequence's completion log-probability (the core runs this on the model and, for DPO and IPO, on its
        reference); ORPO also scores the chosen sequences' prompts, for its SFT term."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        rows = len(batch["labels"])
        if self.loss_type != "orpo":
            return Scores(target_tokens(model, inputs, batch["labels"]).per_row(rows))
        # ORPO's SFT term covers the chosen sequences' prompts too, as its authors' code and TRL's (trl#1516, #2527)
        pairs = rows // 2
        whole = torch.where(batch["attention_mask"][:pairs] == 1, batch["input_ids"][:pairs], IGNORE)
        scored = torch.cat([whole, batch["labels"][pairs:]])
        tokens = target_tokens(model, inputs, scored)
        completion = (batch["labels"][:, 1:] != IGNORE)[scored[:, 1:] != IGNORE]
        chosen = tokens.rows < pairs
        return Scores(tokens.logps.new_zeros(rows).index_add(0, tokens.rows[completion], tokens.logps[completion]),
                      tokens.logps[chosen].sum(), chosen.sum())

    def compared(self, outputs: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) per pair: what the loss compares, and the rewards are beta times: the log-probability
        ratio of the model to its reference (DPO, IPO), or the model's mean log-probability per completion token
        (SimPO, ORPO: TRL's rewards)."""
        if self.compares_to_reference:
            policy, reference = outputs
            return (policy.completions - reference.completions).chunk(2)
        return (outputs.completions / completion_tokens(batch)).chunk(2)

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen, rejected = self.compared(outputs, batch)
        if self.loss_type == "ipo":  # per-token log-ratios (as IPO's authors and TRL normalise them)
            chosen_tokens, rejected_tokens = completion_tokens(batch).clamp(min=1).chunk(2)
            return ((chosen / chosen_tokens - rejected / rejected_tokens - 1 / (2 * self.beta)) ** 2).mean()
        if self.loss_type == "orpo":  # log odds(p) = log p - log(1 - p), of the mean per-token probabilities
            log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
            return -outputs.chosen_sequences / outputs.chosen_tokens - self.beta * F.logsigmoid(log_odds).mean()
        margin = self.beta * (chosen - rejected) - (self.gamma if self.loss_type == "simpo" else 0)
        smoothing = self.label_smoothing
        return (-F.logsigmoid(margin) * (1 - smoothing) - F.logsigmoid(-margin) * smoothing).mean()

    # --- evaluation and prediction -------------------------------------------------------------
    def metrics(self, split: str, context: Any) -> MetricCollection:
        return MetricCollection({"rewards": PreferenceScores(self.beta)})

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict, model: Any, tokenizer: Any) -> None:
        chosen, rejected = self.compared(outputs, batch)
        metrics.update(self.beta * chosen.detach(), self.beta * rejected.detach())

    def predict(self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[dict[str, Any]]:
        return [{"generated_text": text} for text in self.chat.generate(model, batch, tokenizer, self.generation)]

    def chat_row(self, messages: list[dict[str, str]]) -> Optional[dict[str, Any]]:
        return conversation_row(self, messages)
