"""The generation core shared by text-to-text tasks (summarization, translation, ...).

One task class serves both model families, chosen from the backbone's config:
- encoder-decoder (T5, BART, Marian, mBART: `AutoModelForSeq2SeqLM`): source -> encoder,
  target -> labels (padding ignored in the loss);
- decoder-only (GPT-2, Llama, Qwen, ...: `AutoModelForCausalLM`): prompt, target and stop token
  in one sequence with the prompt and padding masked out of the loss; an instruct model's chat
  template renders prompt and target as the user and assistant turns. For generation the prompt
  is padded on the left and stripped from the output, which stops at the stop token.
Subclasses choose the columns and the metrics.
"""

import string
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, DataCollatorForSeq2Seq, PretrainedConfig

from finetune.columns import conversation_row
from finetune.errors import InputError
from finetune.target_tokens import IGNORE, target_tokens
from finetune.task import Column, Task


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


def end_of_turn(task: "GenerationTask", tokenizer: Any) -> str:
    """The special token that closes the assistant's turn in `task`'s chat template (`<|im_end|>` in
    ChatML, `<|eot_id|>` in Llama 3): the first special token after a reply the template renders."""
    prompt, conversation = task.render("Hi", tokenizer), task.render("Hi", tokenizer, "Hello")
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if conversation.startswith(prompt):
        after = tokenizer(conversation[len(prompt):], add_special_tokens=False)["input_ids"]
        found = next((i for i in after if i in special), None)
        if found is not None:
            return tokenizer.convert_ids_to_tokens(found)
    raise InputError(f"model.task.init_args.stop_token: the chat template of {tokenizer.name_or_path!r} does not "
                     "close the assistant's turn with a special token; name the token that ends a reply")


def pad(sequences: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    longest = max(len(s) for s in sequences)
    rows = [[value] * (longest - len(s)) + s if left else s + [value] * (longest - len(s)) for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


@dataclass(frozen=True)
class GenerationTask(Task):
    """Options:
    source_column / target_column: the input text and the text to generate.
    prompt: the model's input made from a row: `{source}` is the source text, `{column}` any other column
        of the row (e.g. `summarize: {source}` for T5, `Translate to German: {source}`; write `{{` for a brace).
    chat_template: decoder-only backbones: the prompt is the user turn of the tokenizer's chat template and
        the target the assistant turn (None: when the tokenizer has a template, as instruct models do);
        false: `prompt + newline`, then the target and eos (a base model's format).
    system_prompt: with a chat template, the system turn (None: the template's default, if it has one).
    stop_token: the token that ends a reply, inside the loss and where generation stops (None: from the
        backbone: the chat template's end-of-turn token, else eos).
    max_source_length / max_target_length: longer texts are truncated to this many tokens.
    label_smoothing: of the cross-entropy loss.
    generate_every_n_epochs: during `fit`, validation always reports the loss and generates and scores
        every N epochs (0: never). A standalone `validate` or `test` always generates.
    generation: decoding settings for metrics and `predict`.
    decoder_only: set from the backbone's config (a causal LM, or an encoder-decoder).
    """

    source_column: str = "source"
    target_column: str = "target"
    prompt: str = "{source}"
    chat_template: Optional[bool] = None
    system_prompt: Optional[str] = None
    stop_token: Optional[str] = None
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
        for option in ("max_source_length", "max_target_length"):
            if getattr(self, option) < 2:
                raise InputError(f"model.task.init_args.{option}: must be at least 2, got {getattr(self, option)}")

    def backbone_options(self, config: PretrainedConfig, tokenizer: Any) -> dict[str, Any]:
        decoder_only = not config.is_encoder_decoder
        has_template = bool(getattr(tokenizer, "chat_template", None))
        chat = decoder_only and has_template if self.chat_template is None else self.chat_template
        if chat and not decoder_only:
            raise InputError("model.task.init_args.chat_template: an encoder-decoder backbone reads the prompt as "
                             "it is; chat templates are for decoder-only (causal) models")
        if chat and not has_template:
            raise InputError(f"model.task.init_args.chat_template: the tokenizer of {tokenizer.name_or_path!r} has no "
                             "chat template (a base model); set chat_template: false")
        options: dict[str, Any] = {"decoder_only": decoder_only, "chat_template": chat}
        if decoder_only:
            stop = self.stop_token or (end_of_turn(self.with_options(chat_template=chat), tokenizer) if chat
                                       else tokenizer.eos_token)
            if stop is None or tokenizer.convert_tokens_to_ids(stop) in (None, tokenizer.unk_token_id):
                raise InputError(f"model.task.init_args.stop_token: {stop!r} is not a token of "
                                 f"{tokenizer.name_or_path!r}; name the token that ends a reply (e.g. its eos token)")
            options["stop_token"] = stop
        return options

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
    def prompts(self, examples: dict[str, list], sources: list[str]) -> list[str]:
        """The `prompt` template filled in for each row."""
        try:
            return [self.prompt.format_map({**{k: v[i] for k, v in examples.items()}, "source": source})
                    for i, source in enumerate(sources)]
        except KeyError as err:
            raise InputError(f"model.task.init_args.prompt: {self.prompt!r} names {{{err.args[0]}}}, which is "
                             "neither {source} nor a column of the data") from err
        except (ValueError, IndexError) as err:
            raise InputError(f"model.task.init_args.prompt: {self.prompt!r} is not a template ({err}); write {{{{ "
                             "and }} for literal braces") from err

    def render(self, prompt: str, tokenizer: Any, reply: Optional[str] = None) -> str:
        """A decoder's input text: the prompt (with the assistant's turn opened), or prompt and reply."""
        if not self.chat_template:
            return prompt + "\n" + ("" if reply is None else reply)
        messages = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        messages.append({"role": "user", "content": prompt})
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=reply is None)

    def preprocess(self, examples: dict[str, list], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        if not self.decoder_only:
            prompts = self.prompts(examples, self.source_texts(examples))
            features = dict(tokenizer(prompts, max_length=self.max_source_length, truncation=True))
            if with_targets:
                features["labels"] = tokenizer(
                    text_target=self.target_texts(examples), max_length=self.max_target_length, truncation=True
                )["input_ids"]
            return features
        # Decoder-only: `input_ids` holds the prompt alone (generation, length grouping) and `labels` the
        # reply's tokens and the stop token; collate joins them for the loss. The source is truncated
        # (not the prompt, whose end opens the reply).
        sources = self.source_texts(examples)
        cut = tokenizer(sources, add_special_tokens=False, max_length=self.max_source_length, truncation=True)
        sources = [tokenizer.decode(ids) if len(ids) >= self.max_source_length else text
                   for ids, text in zip(cut["input_ids"], sources)]
        prompts = self.prompts(examples, sources)
        # (a chat template writes the special tokens it wants, e.g. bos; a plain prompt gets the tokenizer's)
        prompt_ids = tokenizer([self.render(p, tokenizer) for p in prompts],
                               add_special_tokens=not self.chat_template)["input_ids"]
        features = {"input_ids": prompt_ids}
        if with_targets:
            replies = self.target_texts(examples)
            reply_ids = tokenizer(replies, add_special_tokens=False, max_length=self.max_target_length - 1,
                                  truncation=True)["input_ids"]
            stop = tokenizer.convert_tokens_to_ids(self.stop_token)
            features["labels"] = [ids + [stop] for ids in reply_ids]
            if self.chat_template:
                self.check_template(prompts, replies, prompt_ids, features["labels"], tokenizer)
        return features

    def check_template(self, prompts: list[str], replies: list[str], prompt_ids: list[list[int]],
                       labels: list[list[int]], tokenizer: Any, rows: int = 4) -> None:
        """The chat template must render a row as exactly the prompt's tokens, then the reply's and the stop
        token (what the loss is computed on): checked on the first rows of every batch, before training."""
        for prompt, reply, ids, target in list(zip(prompts, replies, prompt_ids, labels))[:rows]:
            if len(target) >= self.max_target_length:
                continue  # (a truncated reply is not what the template renders)
            rendered = tokenizer(self.render(prompt, tokenizer, reply), add_special_tokens=False)["input_ids"]
            expected = ids + target
            if rendered[:len(expected)] != expected:
                at = next((i for i, (a, b) in enumerate(zip(rendered, expected)) if a != b), len(rendered))
                raise InputError(
                    f"model.task.init_args.chat_template: the chat template of {tokenizer.name_or_path!r} renders the "
                    f"row with prompt {prompt[:60]!r} and reply {reply[:60]!r} as tokens that are not the prompt's, "
                    f"then the reply's and the stop token {self.stop_token!r} (they differ at token {at}: "
                    f"{tokenizer.decode(rendered[at:at + 8])!r} where {tokenizer.decode(expected[at:at + 8])!r} "
                    "was expected), so the loss would not be on the reply. Set stop_token to the token that ends "
                    "the template's assistant turn, or chat_template: false"
                )

    def collate(self, features: list[dict], tokenizer: Any, with_targets: bool) -> dict[str, torch.Tensor]:
        if not self.decoder_only:
            return dict(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)(features))
        prompts = [f["input_ids"] for f in features]
        batch = {
            "prompt_ids": pad(prompts, tokenizer.pad_token_id, left=True),
            "prompt_attention_mask": pad([[1] * len(p) for p in prompts], 0, left=True),
        }
        if with_targets:
            full = [p + f["labels"] for p, f in zip(prompts, features)]
            batch["input_ids"] = pad(full, tokenizer.pad_token_id)
            batch["attention_mask"] = pad([[1] * len(s) for s in full], 0)
            batch["labels"] = pad([[IGNORE] * len(p) + f["labels"] for p, f in zip(prompts, features)], IGNORE)
        return batch

    # --- model ---------------------------------------------------------------------------------
    def forward(self, model: Any, batch: dict[str, torch.Tensor]) -> Any:
        if self.decoder_only:  # the scores of the target tokens only (finetune/target_tokens.py)
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
            return target_tokens(model, inputs, batch["labels"], vocab_mean=self.label_smoothing > 0)
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=decoder_input_ids)

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.decoder_only:  # cross-entropy, with torch's label smoothing: towards the uniform distribution
            nll = -outputs.logps
            if self.label_smoothing:
                nll = (1 - self.label_smoothing) * nll - self.label_smoothing * outputs.vocab_mean_logps
            return nll.sum() / max(len(nll), 1)
        return F.cross_entropy(outputs.logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE,
                               label_smoothing=self.label_smoothing)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        labels = batch["labels"][:, 1:] if self.decoder_only else batch["labels"]
        return int((labels != IGNORE).sum())

    def generate(self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[str]:
        if self.decoder_only:
            inputs = {"input_ids": batch["prompt_ids"], "attention_mask": batch["prompt_attention_mask"]}
        else:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        stops = {} if not self.decoder_only else {"eos_token_id": sorted(
            {tokenizer.convert_tokens_to_ids(self.stop_token), tokenizer.eos_token_id} - {None})}
        with torch.inference_mode():
            output = model.generate(**inputs, **self.generation.generate_kwargs(), **stops,
                                    pad_token_id=tokenizer.pad_token_id)
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

    def chat_row(self, messages: list[dict[str, str]]) -> Optional[dict[str, Any]]:
        # (the last user message is the source; a prompt naming other columns has nothing to fill them with)
        names = {name for _, name, _, _ in string.Formatter().parse(self.prompt) if name}
        return conversation_row(self, messages) if names <= {"source"} else None
