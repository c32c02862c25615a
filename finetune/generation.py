"""The generation core shared by text-to-text tasks (summarization, translation, ...).

One task class serves both model families, chosen from the backbone's config:
- encoder-decoder (T5, BART, Marian, mBART: `AutoModelForSeq2SeqLM`): source -> encoder,
  target -> labels (padding ignored in the loss);
- decoder-only (GPT-2, Llama, Qwen, ...: `AutoModelForCausalLM`): `prompt + target + eos` in
  one sequence with the prompt and padding masked out of the loss; for generation the prompt is
  padded on the left and stripped from the output.
Subclasses choose the columns and the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, PretrainedConfig

from finetune.task import Column, Task

IGNORE = -100  # label id that cross-entropy skips


@dataclass
class GenerationSettings:
    """How text is generated for metrics and `predict` (greedy by default: fast and deterministic)."""

    max_new_tokens: int = 64
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                                  "do_sample": self.do_sample}
        if self.num_beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        if self.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return kwargs


def pad(sequences: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    longest = max(len(s) for s in sequences)
    rows = [[value] * (longest - len(s)) + s if left else s + [value] * (longest - len(s)) for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


@dataclass(frozen=True)
class GenerationTask(Task):
    """Options:
    source_column / target_column: the input text and the text to generate.
    source_prefix: put before every source (T5 expects e.g. `summarize: `).
    max_source_length / max_target_length: longer texts are truncated to this many tokens.
    label_smoothing: of the cross-entropy loss.
    generate_every_n_epochs: during `fit`, validation always reports the loss and generates and scores
        every N epochs (0: never). A standalone `validate` or `test` always generates.
    generation: decoding settings for metrics and `predict`.
    decoder_only: set from the backbone's config (a causal LM, or an encoder-decoder).
    """

    source_column: str = "source"
    target_column: str = "target"
    source_prefix: str = ""
    max_source_length: int = 512
    max_target_length: int = 128
    label_smoothing: float = 0.0
    generate_every_n_epochs: int = 1
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    decoder_only: Optional[bool] = None

    length_limits = {"input_ids": "max_source_length", "labels": "max_target_length"}

    def __post_init__(self) -> None:
        if isinstance(self.generation, dict):  # (as checkpoints store it)
            object.__setattr__(self, "generation", GenerationSettings(**self.generation))

    def backbone_options(self, config: PretrainedConfig, tokenizer: Any) -> dict[str, Any]:
        return {"decoder_only": not config.is_encoder_decoder}

    def model_class(self, config: PretrainedConfig) -> type:
        return AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM

    # --- columns: subclasses with nested data (translation pairs) override these three ---------
    def columns(self) -> list[Column]:
        return [Column("source_column"), Column("target_column", target=True)]

    def source_texts(self, examples: dict[str, list]) -> list[str]:
        return examples[self.source_column]

    def target_texts(self, examples: dict[str, list]) -> list[str]:
        return examples[self.target_column]

    # --- data ----------------------------------------------------------------------------------
    def preprocess(self, examples: dict[str, list], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        sources = [self.source_prefix + s for s in self.source_texts(examples)]
        if not self.decoder_only:
            features = dict(tokenizer(sources, max_length=self.max_source_length, truncation=True))
            if with_targets:
                features["labels"] = tokenizer(
                    text_target=self.target_texts(examples), max_length=self.max_target_length, truncation=True
                )["input_ids"]
            return features
        # Decoder-only: the prompt ends with a newline, the target with eos; `input_ids` holds the
        # prompt alone (generation, length grouping) and collate joins prompt and target for the loss.
        prompts = tokenizer([s + "\n" for s in sources], max_length=self.max_source_length, truncation=True)
        features = {"input_ids": prompts["input_ids"]}
        if with_targets:
            targets = tokenizer(self.target_texts(examples), add_special_tokens=False,
                                max_length=self.max_target_length - 1, truncation=True)["input_ids"]
            features["labels"] = [ids + [tokenizer.eos_token_id] for ids in targets]
        return features

    def collate(self, features: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        if not self.decoder_only:
            return dict(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)(features))
        prompts = [f["input_ids"] for f in features]
        batch = {
            "prompt_ids": pad(prompts, tokenizer.pad_token_id, left=True),
            "prompt_attention_mask": pad([[1] * len(p) for p in prompts], 0, left=True),
        }
        if "labels" in features[0]:
            full = [p + f["labels"] for p, f in zip(prompts, features)]
            batch["input_ids"] = pad(full, tokenizer.pad_token_id)
            batch["attention_mask"] = pad([[1] * len(s) for s in full], 0)
            batch["labels"] = pad([[IGNORE] * len(p) + f["labels"] for p, f in zip(prompts, features)], IGNORE)
        return batch

    # --- model ---------------------------------------------------------------------------------
    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> Any:
        if self.decoder_only:
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=decoder_input_ids)

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits, labels = outputs.logits, batch["labels"]
        if self.decoder_only:  # position t predicts token t+1
            logits, labels = logits[:, :-1], labels[:, 1:]
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                               label_smoothing=self.label_smoothing)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        labels = batch["labels"][:, 1:] if self.decoder_only else batch["labels"]
        return int((labels != IGNORE).sum())

    def generate(self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[str]:
        if self.decoder_only:
            inputs = {"input_ids": batch["prompt_ids"], "attention_mask": batch["prompt_attention_mask"]}
        else:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.inference_mode():
            output = model.generate(**inputs, **self.generation.generate_kwargs(), pad_token_id=tokenizer.pad_token_id)
        if self.decoder_only:  # generate returns prompt + continuation
            output = output[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in tokenizer.batch_decode(output, skip_special_tokens=True)]

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
        labels = batch["labels"].masked_fill(batch["labels"] == IGNORE, tokenizer.pad_token_id)
        references = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        metrics.update(predictions, references)

    def predict(self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[dict[str, Any]]:
        return [{"generated_text": text} for text in self.generate(model, batch, tokenizer)]
