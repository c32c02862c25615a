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

from finetune.chat import (OPTION, ChatFormat, GenerationSettings, conversation_problem, pad, prompt_batch,
                           prompt_ends, require_decoder, sequence_batch)
from finetune.columns import column_values, conversation_row
from finetune.errors import InputError
from finetune.files import value_kind
from finetune.target_tokens import IGNORE, TargetTokens, target_tokens
from finetune.task import Column, Task, task_option


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


@dataclass(frozen=True)
class InstructionTuning(Task):
    """Instruction tuning and language modelling of a decoder-only LM.

    Args:
        format: `messages` (conversations), `prompt` (instruction rows) or `text` (raw text).
        messages_column: format messages: the column of {role, content} lists.
        prompt: format prompt: the user turn made from a row (`{column}` is any column; write `{{` for a brace;
            trailing whitespace is stripped, so Alpaca rows with an empty input end at the instruction).
        completion_column: format prompt: the column of the replies.
        text_column: format text: the column of raw text.
        chat: `chat_template`, `system_prompt`, `stop_token`: the tokenizer's chat template (None: when it has one;
            format messages needs one), an optional system turn (for conversations without one), the token that
            ends a reply (None: the template's end of turn, else eos).
        train_on_prompt: also train on everything but the replies (system and user turns, template text).
        packing: whole examples packed into rows of `max_length` tokens, `data.batch_size` rows a batch (the core
            picks examples that fill them); attention stays within an example (its position ids restart at 0),
            so the loss is the same as without packing, with little padding.
        max_length: tokens per example (longer ones are truncated, with a warning; a text becomes windows).
        generation: decoding settings of `predict` (greedy by default).
    """

    format: Literal["messages", "prompt", "text"] = "messages"
    messages_column: str = "messages"
    prompt: str = "{instruction}\n\n{input}"
    completion_column: str = "output"
    text_column: str = "text"
    chat: ChatFormat = field(default_factory=ChatFormat)
    train_on_prompt: bool = False
    packing: bool = False
    max_length: int = 1024
    generation: GenerationSettings = field(default_factory=GenerationSettings)

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise InputError(f"{task_option('max_length')}: must be at least 2, got {self.max_length}")

    def columns(self) -> list[Column]:
        if self.format == "messages":
            return [Column("messages_column", "messages")]  # (`check_rows` checks the turns)
        if self.format == "prompt":  # (and the columns the prompt names: `check_rows`)
            return [Column("completion_column", target=True)]
        return [Column("text_column")]

    def model_class(self, config: PretrainedConfig) -> type:
        return AutoModelForCausalLM

    def backbone_options(self, config: PretrainedConfig, tokenizer: Any) -> dict[str, Any]:
        require_decoder(config, tokenizer, "instruction tuning")
        chat = self.chat.settle(tokenizer)
        if self.format == "messages" and not chat.chat_template:
            raise InputError(f"{task_option('format')}: messages are rendered with a chat template, and "
                             f"{tokenizer.name_or_path!r} has none or {OPTION}.chat_template is false; use an instruct "
                             "backbone, or format: prompt")
        return {"chat": chat}

    # --- data ----------------------------------------------------------------------------------
    def check_rows(self, split: str, rows: Any, where: str) -> None:
        if self.format == "messages":
            # (read through datasets, which decodes the messages that mixed types store as JSON; `column_values`
            # reads them raw)
            for row, messages in enumerate(rows[self.messages_column], start=1):
                problem = conversation_problem(messages, predicting=split == "predict")
                if problem:
                    raise InputError(f"{where}, row {row}: column {self.messages_column!r} "
                                     f"({task_option('messages_column')}) {problem}")
        elif self.format == "prompt":
            self.check_prompt(rows, where)

    def check_prompt(self, rows: Any, where: str) -> None:
        """The prompt names columns of the rows, which hold text, and no row's prompt is empty."""
        try:
            names = list(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(self.prompt)
                                       if name is not None))
        except ValueError as err:
            raise InputError(f"{task_option('prompt')}: {self.prompt!r} is not a template ({err}); write {{{{ "
                             "and }} for literal braces") from err
        for name in names:
            if name not in rows.column_names:
                raise InputError(f"{task_option('prompt')}: {self.prompt!r} names {{{name}}}, which is not a "
                                 f"column of {where}; its columns are: {', '.join(rows.column_names)}")
        values = {name: column_values(rows, name) for name in names}
        for row in range(len(rows)):
            for name in names:
                if not isinstance(values[name][row], str):
                    raise InputError(f"{where}, row {row + 1}: column {name!r} (named by {task_option('prompt')}) "
                                     f"must hold text, got {value_kind(values[name][row]) or 'null'}: "
                                     f"{values[name][row]!r:.60}")
            if not self.prompt.format_map({name: values[name][row] for name in names}).strip():
                raise InputError(f"{where}, row {row + 1}: the prompt ({task_option('prompt')}) is empty: columns "
                                 f"{', '.join(map(repr, names))} hold no text")

    def prompts(self, examples: dict[str, list]) -> list[str]:
        rows = [dict(zip(examples, values)) for values in zip(*examples.values())]
        return [self.prompt.format_map(row).rstrip() for row in rows]

    def conversations(self, examples: dict[str, list], with_targets: bool) -> list[list[dict[str, str]]]:
        """Each row as messages; for prediction, up to the last user turn."""
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
        return rows

    def preprocess(self, examples: dict[str, list], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        if self.format == "text":
            return self.text_features(examples[self.text_column], tokenizer, with_targets)
        conversations = self.conversations(examples, with_targets)
        if not with_targets:  # the prompt, with the assistant's turn opened
            return {"input_ids": prompt_ends(self.chat.prompt_ids(conversations, tokenizer), self.max_length)}
        encoded = [self.chat.encode(messages, tokenizer, self.train_on_prompt) for messages in conversations]
        long = [i for i, (ids, _) in enumerate(encoded) if len(ids) > self.max_length]
        features = {"input_ids": [ids[:self.max_length] for ids, _ in encoded],
                    "labels": [labels[:self.max_length] for _, labels in encoded]}
        if long:
            lost = sum(all(label == IGNORE for label in features["labels"][i][1:]) for i in long)
            rank_zero_warn(
                f"{len(long)} of {len(encoded)} examples are longer than {task_option('max_length')}="
                f"{self.max_length} tokens and were truncated"
                + (f"; {lost} of them keep no reply token and add nothing to the loss" if lost else ""))
        return features

    def text_features(self, texts: list[str], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        """Raw text: windows of max_length tokens that overlap by one, so every token but a text's first is
        predicted exactly once (a window's first token only serves as context). To predict, the text's end."""
        encoded = tokenizer(texts)["input_ids"]
        if not with_targets:
            return {"input_ids": prompt_ends(encoded, self.max_length)}
        windows, mapping = [], []
        for example, ids in enumerate(encoded):
            for start in range(0, max(len(ids) - 1, 1), self.max_length - 1):
                windows.append(ids[start:start + self.max_length])
                mapping.append(example)
        return {"input_ids": windows, "labels": windows, "overflow_to_sample_mapping": mapping}

    def packed_row_length(self) -> Optional[int]:
        return self.max_length if self.packing else None

    def collate(self, features: list[dict], tokenizer: Any, with_targets: bool) -> dict[str, torch.Tensor]:
        if not with_targets:
            return prompt_batch([f["input_ids"] for f in features], tokenizer.pad_token_id)
        if self.packing:
            return self.pack(features, tokenizer.pad_token_id)
        return sequence_batch([f["input_ids"] for f in features], [f["labels"] for f in features],
                              tokenizer.pad_token_id)

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
        return [{"generated_text": text} for text in self.chat.generate(model, batch, tokenizer, self.generation)]

    def chat_row(self, messages: list[dict[str, str]]) -> Optional[dict[str, Any]]:
        return conversation_row(self, messages)
