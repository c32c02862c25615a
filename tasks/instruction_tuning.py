"""Instruction tuning and language modelling: a decoder-only LM trained on conversations, instruction rows
or raw text, scored by perplexity and token accuracy.

Formats (`format`):
- messages: OpenAI-style lists of {role, content} (system / user / assistant, multi-turn), rendered with the
  backbone's chat template. The loss is on every assistant reply and its end-of-turn token, nothing else.
- prompt: a `prompt` template over the row's columns (Alpaca's instruction and input by default) is the user
  turn and `completion_column` the reply; without a chat template, `prompt + newline`, the reply and eos.
- text: raw text (continued pre-training), every token in the loss; a long text becomes several windows.
"""

import string
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torchmetrics import Metric, MetricCollection
from transformers import AutoModelForCausalLM, PretrainedConfig

from finetune.columns import column_values, conversation_row
from finetune.errors import InputError
from finetune.files import value_kind
from finetune.generation import IGNORE, GenerationSettings, GenerationTask, pad
from finetune.target_tokens import TargetTokens, target_tokens
from finetune.task import Column, Task

ROLES = ("system", "user", "assistant")
# The chat template is checked on this conversation at setup, before any data is read.
PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
         {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Sure"}]


class TokenScores(Metric):
    """`perplexity` (exp of the mean negative log-likelihood) and `token_accuracy` (greedy next-token
    predictions) over the target tokens of a split. The sums are states, so the values are exact whatever the
    batching and the number of processes."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("nll", "correct", "tokens"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, tokens: TargetTokens) -> None:
        self.nll -= tokens.logps.detach().double().sum()
        self.correct += tokens.correct.sum()
        self.tokens += len(tokens.logps)

    def compute(self) -> dict[str, torch.Tensor]:
        tokens = self.tokens.clamp(min=1)
        return {"perplexity": torch.exp(self.nll / tokens), "token_accuracy": self.correct / tokens}


def conversation_problem(messages: Any, predicting: bool) -> Optional[str]:
    """What is wrong with a `messages` value, or None."""
    if not isinstance(messages, list) or not messages:
        return (f"must hold a non-empty list of messages {{\"role\": ..., \"content\": ...}}, got "
                f"{value_kind(messages) or 'null'}: {messages!r:.60}")
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or message.get("role") is None:
            return f"message {number} must be an object with a role and a content, got {message!r:.60}"
        if message["role"] not in ROLES:
            return f"message {number} has the role {message['role']!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str):
            return (f"message {number} ({message['role']}) must have a string content, got "
                    f"{value_kind(message.get('content')) or 'null'}: {message.get('content')!r:.40}")
    roles = [message["role"] for message in messages]
    if predicting and "user" not in roles:
        return "has no user turn to reply to"
    if not predicting and "assistant" not in roles:
        return "has no assistant turn to train on"
    return None


def difference(found: str, expected: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(found, expected)) if a != b), min(len(found), len(expected)))
    start = max(at - 20, 0)
    return f"{found[start:at + 30]!r} where {expected[start:at + 30]!r} was expected"


@dataclass(frozen=True)
class InstructionTuning(Task):
    """Options:
    format: `messages` (conversations), `prompt` (instruction rows) or `text` (raw text).
    messages_column: format messages: the column of {role, content} lists.
    prompt / completion_column: format prompt: the user turn made from a row (`{column}` is any column; write
        `{{` for a brace; trailing whitespace is stripped, so Alpaca rows with an empty input end at the
        instruction) and the column of the reply.
    text_column: format text: the column of raw text.
    chat_template / system_prompt / stop_token: as in GenerationTask (finetune/generation.py): the tokenizer's
        chat template (None: when it has one; format messages needs one), an optional system turn (for
        conversations without one), the token that ends a reply (None: the template's end of turn, else eos).
    train_on_prompt: also train on everything but the replies (system and user turns, template text).
    packing: whole examples packed into rows of `max_length` tokens, `data.batch_size` rows a batch (the core
        picks examples that fill them); attention stays within an example (its position ids restart at 0), so
        the loss is the same as without packing, with little padding.
    max_length: tokens per example (longer ones are truncated, with a warning; a text becomes windows).
    generation: decoding settings of `predict` (greedy by default).
    """

    format: Literal["messages", "prompt", "text"] = "messages"
    messages_column: str = "messages"
    prompt: str = "{instruction}\n\n{input}"
    completion_column: str = "output"
    text_column: str = "text"
    chat_template: Optional[bool] = None
    system_prompt: Optional[str] = None
    stop_token: Optional[str] = None
    train_on_prompt: bool = False
    packing: bool = False
    max_length: int = 1024
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def __post_init__(self) -> None:
        if isinstance(self.generation, dict):  # (as checkpoints store it)
            object.__setattr__(self, "generation", GenerationSettings(**self.generation))
        if self.max_length < 2:
            raise InputError(f"model.task.init_args.max_length: must be at least 2, got {self.max_length}")

    @property
    def generator(self) -> GenerationTask:
        """The decoder-only generation core with this task's template, stop token and decoding settings."""
        return GenerationTask(chat_template=self.chat_template, system_prompt=self.system_prompt,
                              stop_token=self.stop_token, generation=self.generation, decoder_only=True)

    def columns(self) -> list[Column]:
        if self.format == "messages":
            return [Column("messages_column", "messages")]  # (`check_rows` checks the turns)
        if self.format == "prompt":  # (and the columns the prompt names: `check_rows`)
            return [Column("completion_column", target=True)]
        return [Column("text_column")]

    def model_class(self, config: PretrainedConfig) -> type:
        return AutoModelForCausalLM

    def backbone_options(self, config: PretrainedConfig, tokenizer: Any) -> dict[str, Any]:
        if config.is_encoder_decoder:
            raise InputError(f"model.backbone: {tokenizer.name_or_path!r} is an encoder-decoder model; instruction "
                             "tuning trains a decoder-only (causal) LM, e.g. SmolLM2, Llama, Qwen or GPT-2")
        found = self.generator.backbone_options(config, tokenizer)
        options = {"chat_template": found["chat_template"], "stop_token": found["stop_token"]}
        if self.format == "messages" and not options["chat_template"]:
            raise InputError(f"model.task.init_args.format: messages are rendered with a chat template, and "
                             f"{tokenizer.name_or_path!r} has none or chat_template is false; use an instruct "
                             "backbone, or format: prompt")
        if options["chat_template"] and self.format != "text":
            self.with_options(**options).encode(PROBE, tokenizer)  # the template check, before any data
        return options

    # --- data ----------------------------------------------------------------------------------
    def check_rows(self, split: str, rows: Any, where: str) -> None:
        if self.format == "messages":
            # (read through datasets, which decodes the messages that mixed types store as JSON; `column_values`
            # reads them raw)
            for row, messages in enumerate(rows[self.messages_column], start=1):
                problem = conversation_problem(messages, predicting=split == "predict")
                if problem:
                    raise InputError(f"{where}, row {row}: column {self.messages_column!r} "
                                     f"(model.task.init_args.messages_column) {problem}")
        elif self.format == "prompt":
            self.check_prompt(rows, where)

    def check_prompt(self, rows: Any, where: str) -> None:
        """The prompt names columns of the rows, which hold text, and no row's prompt is empty."""
        try:
            names = list(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(self.prompt)
                                       if name is not None))
        except ValueError as err:
            raise InputError(f"model.task.init_args.prompt: {self.prompt!r} is not a template ({err}); write {{{{ "
                             "and }} for literal braces") from err
        for name in names:
            if name not in rows.column_names:
                raise InputError(f"model.task.init_args.prompt: {self.prompt!r} names {{{name}}}, which is not a "
                                 f"column of {where}; its columns are: {', '.join(rows.column_names)}")
        values = {name: column_values(rows, name) for name in names}
        for row in range(len(rows)):
            for name in names:
                if not isinstance(values[name][row], str):
                    raise InputError(f"{where}, row {row + 1}: column {name!r} (named by model.task.init_args.prompt) "
                                     f"must hold text, got {value_kind(values[name][row]) or 'null'}: "
                                     f"{values[name][row]!r:.60}")
            if not self.prompt.format_map({name: values[name][row] for name in names}).strip():
                raise InputError(f"{where}, row {row + 1}: the prompt (model.task.init_args.prompt) is empty: columns "
                                 f"{', '.join(map(repr, names))} hold no text")

    def prompts(self, examples: dict[str, list]) -> list[str]:
        rows = [dict(zip(examples, values)) for values in zip(*examples.values())]
        return [self.prompt.format_map(row).rstrip() for row in rows]

    def conversations(self, examples: dict[str, list], with_targets: bool) -> list[list[dict[str, str]]]:
        """Each row as messages, with the system prompt; for prediction, up to the last user turn."""
        if self.format == "messages":
            rows = [[{"role": m["role"], "content": m["content"]} for m in messages]
                    for messages in examples[self.messages_column]]
        else:
            rows = [[{"role": "user", "content": prompt}] for prompt in self.prompts(examples)]
            if with_targets:
                for messages, reply in zip(rows, examples[self.completion_column]):
                    messages.append({"role": "assistant", "content": reply})
        if not with_targets:
            rows = [messages[:max(i for i, m in enumerate(messages) if m["role"] == "user") + 1] for messages in rows]
        if self.system_prompt is not None:
            rows = [messages if messages[0]["role"] == "system" else
                    [{"role": "system", "content": self.system_prompt}, *messages] for messages in rows]
        return rows

    def encode(self, messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int]]:
        """A conversation's tokens and labels through the chat template: every assistant reply and the stop token
        after it in the loss, the text between replies not (unless `train_on_prompt`). The text before a reply is
        tokenized alone, as `predict` tokenizes a prompt, and the reply after it, as the model generates it."""
        stop = tokenizer.convert_tokens_to_ids(self.stop_token)
        ids: list[int] = []
        labels: list[int] = []
        done = ""  # the conversation's text so far
        for turn, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
            reply = message["content"] + self.stop_token
            rendered = tokenizer.apply_chat_template(messages[:turn + 1], tokenize=False)
            first_user = next((m["content"] for m in messages if m["role"] == "user"), "")
            for found, expected in ((prompt[:len(done)], done), (rendered[:len(prompt + reply)], prompt + reply)):
                if found != expected:
                    raise InputError(
                        f"model.task.init_args.chat_template: the chat template of {tokenizer.name_or_path!r} does "
                        f"not render the conversation {first_user[:40]!r}... as its turns one after the "
                        f"other, each assistant reply followed by the stop token {self.stop_token!r}: at turn "
                        f"{turn + 1} it renders {difference(found, expected)}, so the loss would not be on the "
                        "replies. Set stop_token to the token that ends the template's assistant turn, or use "
                        "format: prompt with chat_template: false")
            segment = tokenizer(prompt[len(done):], add_special_tokens=False)["input_ids"]
            reply_ids = tokenizer(message["content"], add_special_tokens=False)["input_ids"] + [stop]
            ids += segment + reply_ids
            labels += (segment if self.train_on_prompt else [IGNORE] * len(segment)) + reply_ids
            done = prompt + reply
        return ids, labels

    def encode_plain(self, prompt: str, reply: str, tokenizer: Any) -> tuple[list[int], list[int]]:
        """A base model's format: the prompt and a newline (with the tokenizer's special tokens), the reply, eos."""
        prompt_ids = tokenizer(self.generator.render(prompt, tokenizer))["input_ids"]
        reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [
            tokenizer.convert_tokens_to_ids(self.stop_token)]
        return prompt_ids + reply_ids, (prompt_ids if self.train_on_prompt else [IGNORE] * len(prompt_ids)) + reply_ids

    def preprocess(self, examples: dict[str, list], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        if self.format == "text":
            return self.text_features(examples[self.text_column], tokenizer, with_targets)
        if not with_targets:  # the prompt, with the assistant's turn opened
            if self.chat_template:
                texts = [tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                         for messages in self.conversations(examples, with_targets)]
            else:
                texts = [self.generator.render(prompt, tokenizer) for prompt in self.prompts(examples)]
            return {"input_ids": self.prompt_ends(tokenizer(texts, add_special_tokens=not self.chat_template)
                                                  ["input_ids"])}
        if self.chat_template:
            encoded = [self.encode(messages, tokenizer) for messages in self.conversations(examples, with_targets)]
        else:
            encoded = [self.encode_plain(prompt, reply, tokenizer)
                       for prompt, reply in zip(self.prompts(examples), examples[self.completion_column])]
        long = [i for i, (ids, _) in enumerate(encoded) if len(ids) > self.max_length]
        features = {"input_ids": [ids[:self.max_length] for ids, _ in encoded],
                    "labels": [labels[:self.max_length] for _, labels in encoded]}
        if long:
            lost = sum(all(label == IGNORE for label in features["labels"][i][1:]) for i in long)
            rank_zero_warn(
                f"{len(long)} of {len(encoded)} examples are longer than model.task.init_args.max_length="
                f"{self.max_length} tokens and were truncated"
                + (f"; {lost} of them keep no reply token and add nothing to the loss" if lost else ""))
        return features

    def prompt_ends(self, prompts: list[list[int]]) -> list[list[int]]:
        """Prompts longer than max_length keep their last tokens, where the reply starts (with a warning)."""
        long = sum(len(ids) > self.max_length for ids in prompts)
        if long:
            rank_zero_warn(f"{long} of {len(prompts)} prompts are longer than model.task.init_args.max_length="
                           f"{self.max_length} tokens; they keep their last {self.max_length}")
        return [ids[-self.max_length:] for ids in prompts]

    def text_features(self, texts: list[str], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        """Raw text: windows of max_length tokens that overlap by one, so every token but a text's first is
        predicted exactly once (a window's first token only serves as context). To predict, the text's end."""
        encoded = tokenizer(texts)["input_ids"]
        if not with_targets:
            return {"input_ids": self.prompt_ends(encoded)}
        windows, mapping = [], []
        for example, ids in enumerate(encoded):
            for start in range(0, max(len(ids) - 1, 1), self.max_length - 1):
                windows.append(ids[start:start + self.max_length])
                mapping.append(example)
        return {"input_ids": windows, "labels": windows, "overflow_to_sample_mapping": mapping}

    def packed_row_length(self) -> Optional[int]:
        return self.max_length if self.packing else None

    def collate(self, features: list[dict], tokenizer: Any, with_targets: bool) -> dict[str, torch.Tensor]:
        if not with_targets:  # prompts, padded on the left for generation
            prompts = [f["input_ids"] for f in features]
            return {"prompt_ids": pad(prompts, tokenizer.pad_token_id, left=True),
                    "prompt_attention_mask": pad([[1] * len(p) for p in prompts], 0, left=True)}
        if self.packing:
            return self.pack(features, tokenizer.pad_token_id)
        ids = [f["input_ids"] for f in features]
        return {"input_ids": pad(ids, tokenizer.pad_token_id), "attention_mask": pad([[1] * len(i) for i in ids], 0),
                "labels": pad([f["labels"] for f in features], IGNORE)}

    def pack(self, features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """The examples, in order (the core's, row after row), joined into rows of at most max_length tokens (a
        new row where the next example does not fit), padded at the row ends. Position ids restart at 0 with every
        example (and the padding): from them transformers builds block-diagonal causal attention, for SDPA, eager
        attention and FlashAttention's variable-length path alike. No token predicts the next example's first."""
        rows: list[dict[str, list[int]]] = []
        for feature in features:
            ids = feature["input_ids"]
            if not rows or len(rows[-1]["input_ids"]) + len(ids) > self.max_length:
                rows.append({"input_ids": [], "labels": [], "position_ids": []})
            rows[-1]["input_ids"] += ids
            rows[-1]["labels"] += [IGNORE] + feature["labels"][1:]
            rows[-1]["position_ids"] += list(range(len(ids)))
        longest = max(len(row["input_ids"]) for row in rows)
        return {"input_ids": pad([row["input_ids"] for row in rows], pad_id),
                "labels": pad([row["labels"] for row in rows], IGNORE),
                "position_ids": torch.tensor([row["position_ids"] + list(range(longest - len(row["position_ids"])))
                                              for row in rows])}

    # --- model ---------------------------------------------------------------------------------
    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> TargetTokens:
        # (no cache: training needs none, and with one transformers does not read packed examples from the
        # position ids, so attention would cross them)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        return target_tokens(model, {**inputs, "use_cache": False}, batch["labels"])

    def loss(self, outputs: TargetTokens, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # (a batch whose examples lost every reply to truncation has no target token: its loss is 0, of weight 0)
        return -outputs.logps.sum() / max(len(outputs.logps), 1)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    # --- evaluation and prediction -------------------------------------------------------------
    def metrics(self, split: str, context: Any) -> MetricCollection:
        return MetricCollection({} if split == "train" else {"tokens": TokenScores()})

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict, model: Any, tokenizer: Any) -> None:
        metrics.update(outputs)

    def predict(self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[dict[str, Any]]:
        return [{"generated_text": text} for text in self.generator.generate(model, batch, tokenizer)]

    def chat_row(self, messages: list[dict[str, str]]) -> Optional[dict[str, Any]]:
        return conversation_row(self, messages)
