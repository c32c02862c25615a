"""The generation core shared by text-to-text tasks (summarization, translation, ...).

One task class serves both model families; the backbone's config chooses the family once (`family`), which
makes the features and batches, runs the model, computes the loss and generates:
- encoder-decoder (T5, BART, Marian, mBART: `AutoModelForSeq2SeqLM`): source -> encoder,
  target -> labels (padding ignored in the loss);
- decoder-only (GPT-2, Llama, Qwen, ...: `AutoModelForCausalLM`): the prompt is the user turn of the task's
  `chat` format (finetune/chat.py) and the target the reply, with the prompt and padding masked out of the loss.
Subclasses choose the columns and the metrics.
"""

import string
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, PretrainedConfig

from finetune.chat import OPTION, ChatFormat, GenerationSettings, decoded_texts, prompt_batch, sequence_batch
from finetune.columns import conversation_row
from finetune.errors import InputError
from finetune.target_tokens import IGNORE, target_tokens
from finetune.task import Column, Task, task_option


@dataclass(frozen=True)
class GenerationTask(Task):
    """Text to text: a source text in, a target text generated (encoder-decoders and decoder-only LMs).

    Args:
        source_column: the column of input texts.
        target_column: the column of the texts to generate.
        prompt: the model's input made from a row: `{source}` is the source text, `{column}` any other column
            of the row (e.g. `summarize: {source}` for T5, `Translate to German: {source}`; write `{{` for a brace).
        chat: decoder-only backbones: how the prompt and the target are rendered (`chat_template`, `system_prompt`,
            `stop_token`): by default the user and assistant turns of the tokenizer's chat template, or
            `prompt + newline`, the target and eos for a base model.
        max_source_length: longer source texts are truncated to this many tokens.
        max_target_length: longer target texts are truncated to this many tokens.
        label_smoothing: of the cross-entropy loss.
        generate_every_n_epochs: during `fit`, validation always reports the loss and generates and scores
            every N epochs (0: never). A standalone `validate` or `test` always generates.
        generation: decoding settings for metrics and `predict`.
        decoder_only: set from the backbone's config (a causal LM, or an encoder-decoder).
    """

    source_column: str = "source"
    target_column: str = "target"
    prompt: str = "{source}"
    chat: ChatFormat = field(default_factory=ChatFormat)
    max_source_length: int = 512
    max_target_length: int = 128
    label_smoothing: float = 0.0
    generate_every_n_epochs: int = 1
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    decoder_only: Optional[bool] = None

    length_limits = {"input_ids": "max_source_length", "labels": "max_target_length"}

    def __post_init__(self) -> None:
        for option in ("max_source_length", "max_target_length"):
            if getattr(self, option) < 2:
                raise InputError(f"{task_option(option)}: must be at least 2, got {getattr(self, option)}")

    def backbone_options(self, config: PretrainedConfig, tokenizer: Any) -> dict[str, Any]:
        if not config.is_encoder_decoder:
            return {"decoder_only": True, "chat": self.chat.settle(tokenizer)}
        if self.chat.chat_template:
            raise InputError(f"{OPTION}.chat_template: an encoder-decoder backbone reads the prompt as it is; chat "
                             "templates are for decoder-only (causal) models")
        return {"decoder_only": False, "chat": replace(self.chat, chat_template=False)}

    def model_class(self, config: PretrainedConfig) -> type:
        return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM

    @property
    def family(self) -> Union["EncoderDecoder", "DecoderOnly"]:
        """What the backbone's family does with the rows, the batches and the model."""
        return DecoderOnly(self) if self.decoder_only else EncoderDecoder(self)

    # --- columns: the first input column is the source, the target column the target -----------
    def columns(self) -> list[Column]:
        return [Column("source_column"), Column("target_column", target=True)]

    def source_texts(self, examples: dict[str, list]) -> list[str]:
        return self.column_texts(examples, target=False)

    def target_texts(self, examples: dict[str, list]) -> list[str]:
        return self.column_texts(examples, target=True)

    def column_texts(self, examples: dict[str, list], target: bool) -> list[str]:
        column = next(c for c in self.columns() if c.target == target)
        values = examples[getattr(self, column.option)]
        return [value[column.field] for value in values] if column.field else values

    # --- data ----------------------------------------------------------------------------------
    def prompts(self, examples: dict[str, list], sources: list[str]) -> list[str]:
        """The `prompt` template filled in for each row."""
        try:
            return [self.prompt.format_map({**{k: v[i] for k, v in examples.items()}, "source": source})
                    for i, source in enumerate(sources)]
        except KeyError as err:
            raise InputError(f"{task_option('prompt')}: {self.prompt!r} names {{{err.args[0]}}}, which is "
                             "neither {source} nor a column of the data") from err
        except (ValueError, IndexError) as err:
            raise InputError(f"{task_option('prompt')}: {self.prompt!r} is not a template ({err}); write {{{{ "
                             "and }} for literal braces") from err

    def preprocess(self, examples: dict[str, list], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        return self.family.preprocess(examples, tokenizer, with_targets)

    def collate(self, features: list[dict], tokenizer: Any, with_targets: bool) -> dict[str, torch.Tensor]:
        return self.family.collate(features, tokenizer, with_targets)

    # --- model ---------------------------------------------------------------------------------
    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> Any:
        return self.family.forward(model, batch)

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.family.loss(outputs, batch)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return self.family.loss_weight(batch)

    def generate(self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[str]:
        return self.family.generate(model, batch, tokenizer)

    # --- evaluation ----------------------------------------------------------------------------
    def text_metrics(self) -> dict[str, Any]:
        """{name: torchmetrics Metric updated with (predicted texts, reference texts)}."""
        raise NotImplementedError

    def metrics(self, split: str, context: Any) -> MetricCollection:
        return MetricCollection({} if split == "train" else self.text_metrics())

    def computes_metrics(self, split: str, fit_epoch: Optional[int]) -> bool:
        if split == "train":
            return False
        if split == "val" and fit_epoch is not None:
            return self.generate_every_n_epochs > 0 and (fit_epoch + 1) % self.generate_every_n_epochs == 0
        return True

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict, model: Any, tokenizer: Any) -> None:
        predictions = self.generate(model, batch, tokenizer)
        references = decoded_texts(batch["labels"].masked_fill(batch["labels"] == IGNORE, tokenizer.pad_token_id),
                                   tokenizer)
        metrics.update(predictions, references)

    def predict(self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[dict[str, Any]]:
        return [{"generated_text": text} for text in self.generate(model, batch, tokenizer)]

    def chat_row(self, messages: list[dict[str, str]]) -> Optional[dict[str, Any]]:
        # (the last user message is the source; a prompt naming other columns has nothing to fill them with)
        names = {name for _, name, _, _ in string.Formatter().parse(self.prompt) if name}
        return conversation_row(self, messages) if names <= {"source"} else None


@dataclass(frozen=True)
class EncoderDecoder:
    """The source goes to the encoder, the target is the label sequence (padded with IGNORE)."""

    task: GenerationTask

    def preprocess(self, examples: dict[str, list], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        task = self.task
        prompts = task.prompts(examples, task.source_texts(examples))
        features = dict(tokenizer(prompts, max_length=task.max_source_length, truncation=True))
        if with_targets:
            features["labels"] = tokenizer(text_target=task.target_texts(examples),
                                           max_length=task.max_target_length, truncation=True)["input_ids"]
        return features

    def collate(self, features: list[dict], tokenizer: Any, with_targets: bool) -> dict[str, torch.Tensor]:
        return dict(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)(features))

    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> Any:
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=decoder_input_ids)

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs.logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE,
                               label_smoothing=self.task.label_smoothing)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())

    def generate(self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[str]:
        with torch.inference_mode():
            output = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    **self.task.generation.generate_kwargs(), pad_token_id=tokenizer.pad_token_id)
        return decoded_texts(output, tokenizer)


@dataclass(frozen=True)
class DecoderOnly:
    """Prompt, target and stop token in one sequence, the prompt and padding out of the loss. `input_ids` holds
    the prompt alone (generation, length grouping) and `labels` the reply's tokens and the stop token; collate
    joins them for the loss and pads the prompts on the left for generation."""

    task: GenerationTask

    def preprocess(self, examples: dict[str, list], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        task = self.task
        # The source is truncated (not the prompt, whose end opens the reply).
        sources = task.source_texts(examples)
        cut = tokenizer(sources, add_special_tokens=False, max_length=task.max_source_length, truncation=True)
        sources = [tokenizer.decode(ids) if len(ids) >= task.max_source_length else text
                   for ids, text in zip(cut["input_ids"], sources)]
        conversations = [[{"role": "user", "content": prompt}] for prompt in task.prompts(examples, sources)]
        if not with_targets:
            return {"input_ids": task.chat.prompt_ids(conversations, tokenizer)}
        features: dict[str, list] = {"input_ids": [], "labels": []}
        for messages, target in zip(conversations, task.target_texts(examples)):
            prompt, reply = task.chat.encode_reply(messages, target, tokenizer)
            features["input_ids"].append(prompt)
            features["labels"].append(reply[:-1][:task.max_target_length - 1] + reply[-1:])  # (keeps the stop token)
        return features

    def collate(self, features: list[dict], tokenizer: Any, with_targets: bool) -> dict[str, torch.Tensor]:
        prompts = [f["input_ids"] for f in features]
        batch = prompt_batch(prompts, tokenizer.pad_token_id)
        if with_targets:
            batch.update(sequence_batch([p + f["labels"] for p, f in zip(prompts, features)],
                                        [[IGNORE] * len(p) + f["labels"] for p, f in zip(prompts, features)],
                                        tokenizer.pad_token_id))
        return batch

    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> Any:
        # the scores of the target tokens only (finetune/target_tokens.py)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        return target_tokens(model, inputs, batch["labels"], vocab_mean=self.task.label_smoothing > 0)

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # cross-entropy, with torch's label smoothing: towards the uniform distribution
        nll, smoothing = -outputs.logps, self.task.label_smoothing
        if smoothing:
            nll = (1 - smoothing) * nll - smoothing * outputs.vocab_mean_logps
        return nll.sum() / max(len(nll), 1)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def generate(self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[str]:
        return self.task.chat.generate(model, batch, tokenizer, self.task.generation)
