"""Preference tuning (DPO, IPO): a decoder-only LM learns to prefer the chosen completion of a prompt to the
rejected one, measured against a reference: the backbone as it was before this training.

Rows: `prompt` (a conversation: a list of {role, content} messages ending with a user turn, or a text: one
user turn), `chosen` and `rejected` (the assistant's reply: a text, or a list of one assistant message). Both
completions of a batch's pairs run in one forward pass; only their tokens (and the end-of-turn token after
them) count. The reference is the same model with the LoRA adapter switched off (no second copy in memory);
with `lora: null` the core keeps a frozen copy of the backbone.
"""

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torchmetrics import Metric, MetricCollection
from transformers import AutoModelForCausalLM, PretrainedConfig

from finetune.columns import conversation_row
from finetune.errors import InputError
from finetune.files import value_kind
from finetune.generation import IGNORE, GenerationSettings, pad
from finetune.target_tokens import target_tokens
from finetune.task import Column, Task
from tasks.instruction_tuning import InstructionTuning, conversation_problem


class PreferenceScores(Metric):
    """Over the pairs of a split: `reward_accuracy` (the chosen completion's reward above the rejected one's; a
    tie counts one half, so a model equal to its reference scores 0.5), `reward_margin` (mean chosen - rejected
    reward), `chosen_reward` and `rejected_reward` (means). A reward is beta x (the model's log-probability of
    the completion - the reference's). Sums are the states: exact whatever the batching and processes."""

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


def completion_problem(value: Any) -> Optional[str]:
    """What is wrong with a `chosen` or `rejected` value, or None."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") != "assistant":
            return f"holds a message of the role {value[0].get('role')!r}; a completion is the assistant's reply"
        value = value[0].get("content")
    elif not isinstance(value, str):
        return (f"must hold the assistant's reply: a text, or a list of one {{\"role\": \"assistant\", \"content\": "
                f"...}} message; got {value_kind(value) or 'null'}: {value!r:.60}")
    if not isinstance(value, str) or not value.strip():
        return f"is an empty completion ({value!r:.40})"
    return None


def reply_text(value: Any) -> str:
    return value if isinstance(value, str) else value[0]["content"]


@dataclass(frozen=True)
class PreferenceTuning(Task):
    """Options:
    prompt_column / chosen_column / rejected_column: the prompt and the two completions of a pair.
    loss_type: `sigmoid` (DPO: -log sigmoid(beta x margin of log-ratios)) or `ipo` (IPO: (margin of per-token
        log-ratios - 1 / (2 beta))^2).
    beta: how far the model may move from the reference (DPO's beta, IPO's tau).
    label_smoothing: sigmoid loss: the share of pairs assumed mislabelled (conservative DPO), 0 to 0.5.
    chat_template / system_prompt / stop_token / max_length / generation: as in InstructionTuning. A pair longer
        than max_length keeps its prompt's end (at least half of max_length) and its completions' start.
    """

    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    chat_template: Optional[bool] = None
    system_prompt: Optional[str] = None
    stop_token: Optional[str] = None
    max_length: int = 1024
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    compares_to_reference = True

    def __post_init__(self) -> None:
        if isinstance(self.generation, dict):  # (as checkpoints store it)
            object.__setattr__(self, "generation", GenerationSettings(**self.generation))
        if self.beta <= 0:
            raise InputError(f"model.task.init_args.beta: must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise InputError(f"model.task.init_args.label_smoothing: must be in [0, 0.5), got {self.label_smoothing}")
        if self.max_length < 4:
            raise InputError(f"model.task.init_args.max_length: must be at least 4, got {self.max_length}")

    @property
    def conversations(self) -> InstructionTuning:
        """Instruction tuning's rendering of conversations (template, its checks, stop token) and generation."""
        return InstructionTuning(chat_template=self.chat_template, system_prompt=self.system_prompt,
                                 stop_token=self.stop_token, max_length=self.max_length, generation=self.generation)

    def columns(self) -> list[Column]:
        return [Column("prompt_column", "messages"), Column("chosen_column", "id", target=True),
                Column("rejected_column", "id", target=True)]

    def model_class(self, config: PretrainedConfig) -> type:
        return AutoModelForCausalLM

    def backbone_options(self, config: PretrainedConfig, tokenizer: Any) -> dict[str, Any]:
        if config.is_encoder_decoder:
            raise InputError(f"model.backbone: {tokenizer.name_or_path!r} is an encoder-decoder model; preference "
                             "tuning trains a decoder-only (causal) LM, e.g. SmolLM2, Llama, Qwen or GPT-2")
        return self.conversations.with_options(format="prompt").backbone_options(config, tokenizer)

    # --- data ----------------------------------------------------------------------------------
    def check_rows(self, split: str, rows: Any, where: str) -> None:
        targets = split != "predict"
        names = [self.prompt_column] + ([self.chosen_column, self.rejected_column] if targets else [])
        for row, values in enumerate(zip(*(rows[name] for name in names)), start=1):
            prompt = values[0]
            problem = None if isinstance(prompt, str) else conversation_problem(prompt, predicting=True)
            if problem is None and not isinstance(prompt, str) and prompt[-1]["role"] != "user":
                problem = "must end with a user turn (the completions are the reply to it)"
            if problem:
                raise InputError(f"{where}, row {row}: column {self.prompt_column!r} "
                                 f"(model.task.init_args.prompt_column) {problem}")
            if targets:
                for option, value in zip(("chosen_column", "rejected_column"), values[1:]):
                    problem = completion_problem(value)
                    if problem:
                        raise InputError(f"{where}, row {row}: column {getattr(self, option)!r} "
                                         f"(model.task.init_args.{option}) {problem}")
                if reply_text(values[1]).strip() == reply_text(values[2]).strip():
                    raise InputError(f"{where}, row {row}: the chosen and the rejected completion are the same text "
                                     f"({reply_text(values[1])!r:.60}); a pair must differ to say which is preferred")

    def messages(self, prompt: Any) -> list[dict[str, str]]:
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
            [{"role": m["role"], "content": m["content"]} for m in prompt]

    def encode(self, prompt: Any, reply: str, tokenizer: Any) -> tuple[list[int], list[int]]:
        """(prompt tokens, completion tokens with the stop token), as instruction tuning renders the conversation."""
        conversations = self.conversations
        if self.chat_template:
            messages = conversations.conversations({"messages": [self.messages(prompt)]}, with_targets=True)[0]
            ids, _ = conversations.encode([*messages, {"role": "assistant", "content": reply}], tokenizer)
        elif isinstance(prompt, str):
            ids, _ = conversations.encode_plain(prompt, reply, tokenizer)
        else:
            raise InputError(f"model.task.init_args.prompt_column: the prompts are conversations, which need a chat "
                             f"template, and {tokenizer.name_or_path!r} has none or chat_template is false")
        completion = len(self.completion_ids(reply, tokenizer))
        return ids[:-completion], ids[-completion:]

    def completion_ids(self, reply: str, tokenizer: Any) -> list[int]:
        """A reply's tokens and the stop token, as instruction tuning tokenizes a reply (after its prompt)."""
        stop = tokenizer.convert_tokens_to_ids(self.stop_token)
        return tokenizer(reply, add_special_tokens=False)["input_ids"] + [stop]

    def preprocess(self, examples: dict[str, list], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        prompts = examples[self.prompt_column]
        if not with_targets:  # the prompt, with the assistant's turn opened (instruction tuning's prediction)
            rows = {"messages": [self.messages(p) for p in prompts]} if self.chat_template else \
                {"instruction": prompts}
            return self.conversations.with_options(
                format="messages" if self.chat_template else "prompt", prompt="{instruction}"
            ).preprocess(rows, tokenizer, with_targets=False)
        features: dict[str, list] = {"input_ids": [], "chosen": [], "rejected": []}
        long = 0
        for prompt, chosen, rejected in zip(prompts, examples[self.chosen_column], examples[self.rejected_column]):
            # (the chosen reply's rendering checks the template; the rejected one follows the same prompt)
            prompt_ids, chosen_ids = self.encode(prompt, reply_text(chosen), tokenizer)
            rejected_ids = self.completion_ids(reply_text(rejected), tokenizer)
            longest = max(len(chosen_ids), len(rejected_ids))
            if len(prompt_ids) + longest > self.max_length:
                long += 1
                prompt_ids = prompt_ids[-max(self.max_length - longest, self.max_length // 2):]
                room = self.max_length - len(prompt_ids)
                chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
            features["input_ids"].append(prompt_ids)
            features["chosen"].append(chosen_ids)
            features["rejected"].append(rejected_ids)
        if long:
            rank_zero_warn(f"{long} of {len(prompts)} pairs are longer than model.task.init_args.max_length="
                           f"{self.max_length} tokens: their prompts keep their end and their completions their start")
        return features

    def collate(self, features: list[dict], tokenizer: Any, with_targets: bool) -> dict[str, torch.Tensor]:
        if not with_targets:
            return self.conversations.collate(features, tokenizer, with_targets)
        # one batch of 2n sequences: the n prompts with their chosen completions, then with their rejected ones
        prompts = [f["input_ids"] for f in features] * 2
        completions = [f["chosen"] for f in features] + [f["rejected"] for f in features]
        sequences = [p + c for p, c in zip(prompts, completions)]
        return {"input_ids": pad(sequences, tokenizer.pad_token_id),
                "attention_mask": pad([[1] * len(s) for s in sequences], 0),
                "labels": pad([[IGNORE] * len(p) + c for p, c in zip(prompts, completions)], IGNORE)}

    # --- model ---------------------------------------------------------------------------------
    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each sequence's completion log-probability (the core runs this on the model and on its reference)."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        return target_tokens(model, inputs, batch["labels"]).per_row(len(batch["labels"]))

    def log_ratios(self, outputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) log-probability ratios of the model to its reference, per pair."""
        policy, reference = outputs
        return (policy - reference).chunk(2)

    def loss(self, outputs: tuple[torch.Tensor, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen, rejected = self.log_ratios(outputs)
        if self.loss_type == "ipo":  # per-token log-ratios (as IPO's authors and TRL normalise them)
            tokens = (batch["labels"][:, 1:] != IGNORE).sum(-1).clamp(min=1)
            chosen_tokens, rejected_tokens = tokens.chunk(2)
            return ((chosen / chosen_tokens - rejected / rejected_tokens - 1 / (2 * self.beta)) ** 2).mean()
        margin = self.beta * (chosen - rejected)
        smoothing = self.label_smoothing
        return (-F.logsigmoid(margin) * (1 - smoothing) - F.logsigmoid(-margin) * smoothing).mean()

    # --- evaluation and prediction -------------------------------------------------------------
    def metrics(self, split: str, context: Any) -> MetricCollection:
        return MetricCollection({"rewards": PreferenceScores(self.beta)})

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict, model: Any, tokenizer: Any) -> None:
        chosen, rejected = self.log_ratios(outputs)
        metrics.update(self.beta * chosen.detach(), self.beta * rejected.detach())

    def predict(self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[dict[str, Any]]:
        return self.conversations.predict(model, batch, tokenizer)

    def chat_row(self, messages: list[dict[str, str]]) -> Optional[dict[str, Any]]:
        return conversation_row(self, messages)
