"""Token classification (named entities): a tag per word; entities scored and predicted as spans.

A row is a list of words and one IOB2 tag per word (B-TYPE begins an entity, I-TYPE continues it,
O is outside; integers indexing `labels` work too):

    {"tokens": ["Ada", "Lovelace", "visited", "Paris"], "tags": ["B-PER", "I-PER", "O", "B-LOC"]}

The tokenizer splits words into sub-word tokens; a word's tag trains its first token (or all of
them, `label_all_subtokens`) and the tag predicted for a word is the one at its first token.
"""

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from transformers import AutoModelForTokenClassification

from finetune.errors import InputError
from finetune.task import MODEL_INPUTS, Column, Task

IGNORE = -100  # the label of tokens left out of the loss (cross_entropy's ignore_index)
NO_WORD = -1  # the word id of special tokens and padding


@dataclass(frozen=True)
class TokenClassification(Task):
    """Named-entity recognition: an IOB2 tag per word.

    Args:
        tokens_column: the column of word lists.
        tags_column: the column of tag lists, one IOB2 tag per word.
        labels: the tags in id order; learned from the training split when not given ("O", then B- and
            I- of every entity type seen, sorted).
        label_all_subtokens: train every token of a word on its tag (B- turns into I- after the first
            token); otherwise only the first token, the others are left out of the loss.
        max_length: longer sentences are truncated to this many tokens; words cut off are predicted O.
    """

    tokens_column: str = "tokens"
    tags_column: str = "tags"
    labels: Optional[list[str]] = None
    label_all_subtokens: bool = False
    max_length: int = 256

    # Unannotated, so class attributes and not options (dataclass fields).
    head_modules = ("classifier", "score")
    length_limits = {"input_ids": "max_length"}

    def __post_init__(self) -> None:
        invalid = [label for label in self.labels or [] if not is_iob2(label)]
        if invalid:
            raise InputError(f"model.task.init_args.labels: {invalid[0]!r} is not an IOB2 tag (O, B-TYPE or I-TYPE)")

    def columns(self) -> list[Column]:
        return [Column("tokens_column", "words"), Column("tags_column", "label", target=True)]

    def model_class(self, config: Any) -> type:
        return AutoModelForTokenClassification

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {label: i for i, label in enumerate(self.labels)}}

    def backbone_options(self, config: Any, tokenizer: Any) -> dict[str, Any]:
        if not tokenizer.is_fast:
            raise InputError("model.backbone: token classification needs a fast tokenizer (it maps tokens to words "
                             f"with `word_ids`); {type(tokenizer).__name__} is not one")
        return {}

    # --- data ----------------------------------------------------------------------------------
    def learn(self, train: Any) -> dict[str, Any]:
        if self.labels is not None:
            return {}
        tags = [tag for row in train[self.tags_column] if isinstance(row, list) for tag in row]
        if any(isinstance(tag, int) for tag in tags):
            return {}  # integers name no tag: `check_rows` asks for the labels, naming the file
        types = {tag[2:] for tag in tags if is_iob2(tag) and tag != "O"}
        return {"labels": ["O"] + sorted(f"{prefix}-{kind}" for kind in types for prefix in "BI")}

    def check_rows(self, split: str, rows: Any, where: str) -> None:
        if self.labels is None and split == "train":  # `learn` leaves it unset only for integer tags
            raise InputError(f"{where}: column {self.tags_column!r} holds integers; name the tags they stand for, "
                             "in id order, in model.task.init_args.labels")
        if self.labels is None:
            raise InputError("model.task.init_args.labels: no label set; give it, or a checkpoint (--ckpt_path), or "
                             "data.train_file to learn it from")
        if split == "predict":
            return
        for row, (words, tags) in enumerate(zip(rows[self.tokens_column], rows[self.tags_column]), start=1):
            at = f"{where}, row {row}: column {self.tags_column!r}"
            if not isinstance(tags, list) or len(tags) != len(words):
                raise InputError(f"{at} must hold one tag per word ({len(words)} words), got {tags!r:.80}")
            for tag in tags:
                if isinstance(tag, int) and not isinstance(tag, bool):
                    if not 0 <= tag < len(self.labels):
                        raise InputError(f"{at}: tag {tag} is not an index of the label set {self.labels} "
                                         "(integer tags index model.task.init_args.labels)")
                elif not is_iob2(tag):
                    raise InputError(f"{at}: {tag!r} is not an IOB2 tag (O, B-TYPE or I-TYPE)")
                elif tag not in self.labels:
                    raise InputError(f"{at}: tag {tag!r} is not in the label set {self.labels} "
                                     "(model.task.init_args.labels, or learned from the training split)")
        if split == "train" and self.labels == ["O"]:  # every training tag is in the set, so all are O
            raise InputError(f"{where}: column {self.tags_column!r} tags no entity (B-TYPE, I-TYPE)")

    def split_context(self, split: str, rows: Any) -> Optional[list[list[str]]]:
        # Predictions are written with the entities' text, which only the words have.
        return list(rows[self.tokens_column]) if split == "predict" else None

    def preprocess(self, examples: dict[str, list], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        # Words after the first get their space back: byte-level BPE (GPT-2, Llama 3, SmolLM) would otherwise
        # spell `Paris` as an unspaced fragment it rarely saw in pretraining; BERT's tokenizer drops the space.
        words = [[word if i == 0 else " " + word for i, word in enumerate(row)] for row in examples[self.tokens_column]]
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=self.max_length)
        features = {key: encoded[key] for key in MODEL_INPUTS if key in encoded}
        features["word_ids"] = [[NO_WORD if word is None else word for word in encoded.word_ids(i)]
                                for i in range(len(encoded["input_ids"]))]
        if with_targets:
            features["labels"] = [self.align(word_ids, tags)
                                  for word_ids, tags in zip(features["word_ids"], examples[self.tags_column])]
        return features

    def align(self, word_ids: list[int], tags: list[Union[str, int]]) -> list[int]:
        """Token labels from word tags: the first token of a word gets the word's tag; its other tokens
        get IGNORE, or with `label_all_subtokens` the tag as I- (they continue what the first began)."""
        ids = {label: i for i, label in enumerate(self.labels)}
        labels, previous = [], NO_WORD
        for word in word_ids:
            tag = tags[word] if word != NO_WORD else None
            tag = self.labels[tag] if isinstance(tag, int) else tag
            if tag is None or (word == previous and not self.label_all_subtokens):
                labels.append(IGNORE)
            elif word == previous and tag.startswith("B-"):
                labels.append(ids.get("I-" + tag[2:], ids[tag]))
            else:
                labels.append(ids[tag])
            previous = word
        return labels

    def collate(self, features: list[dict], tokenizer: Any, with_targets: bool) -> dict[str, torch.Tensor]:
        # Padding on the right keeps labels and word ids at the positions of their tokens.
        inputs = [{key: f[key] for key in MODEL_INPUTS if key in f} for f in features]
        batch = dict(tokenizer.pad(inputs, padding=True, padding_side="right", return_tensors="pt"))
        length = batch["input_ids"].shape[1]
        for key, pad in (("labels", IGNORE), ("word_ids", NO_WORD)) if with_targets else (("word_ids", NO_WORD),):
            batch[key] = torch.tensor([f[key] + [pad] * (length - len(f[key])) for f in features])
        return batch

    # --- model ---------------------------------------------------------------------------------
    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs.logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())  # the loss is a mean over the labelled tokens

    # --- evaluation ----------------------------------------------------------------------------
    def types(self) -> list[str]:
        return sorted({label[2:] for label in self.labels if label != "O"})

    def metrics(self, split: str, context: Any) -> MetricCollection:
        return MetricCollection({"entities": EntityScores(self.types())})

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict, model: Any, tokenizer: Any) -> None:
        predicted = self.word_tags(outputs.logits.argmax(-1), batch["word_ids"])
        metrics.update(predicted, self.word_tags(batch["labels"], batch["word_ids"]))

    def word_tags(self, token_labels: torch.Tensor, word_ids: torch.Tensor) -> list[list[str]]:
        """Per row, each word's tag, read at its first token (O for a word without tokens, e.g. one
        cut off by truncation or made only of characters the tokenizer drops)."""
        rows = []
        for labels, words in zip(token_labels.tolist(), word_ids.tolist()):
            first: dict[int, str] = {}
            for label, word in zip(labels, words):
                if word != NO_WORD and word not in first:
                    first[word] = self.labels[label]
            rows.append([first.get(word, "O") for word in range(max(words) + 1)])
        return rows

    # --- prediction ----------------------------------------------------------------------------
    def predict(self, model: Any, batch: dict[str, torch.Tensor], tokenizer: Any) -> list[dict[str, Any]]:
        """Per sentence, the tags of its words up to the last one with a token; `merge_predictions`,
        which has the words, adds the entities."""
        logits = self.forward(model, batch).logits
        return [{"tags": tags} for tags in self.word_tags(logits.argmax(-1), batch["word_ids"])]

    def merge_predictions(self, rows: list[dict[str, Any]], context: list[list[str]]) -> list[dict[str, Any]]:
        """Per sentence, its entities with character offsets into the words joined by single spaces
        (`" ".join(tokens)[start:end] == text`), and every word's tag."""
        merged = []
        for row in rows:
            words = context[row["index"]]
            tags = row["tags"] + ["O"] * (len(words) - len(row["tags"]))  # words truncated away (the core warns)
            starts = [sum(len(w) + 1 for w in words[:i]) for i in range(len(words))]
            entities = [{"text": " ".join(words[first:end]), "type": kind, "start": starts[first],
                         "end": starts[end - 1] + len(words[end - 1])} for kind, first, end in entity_spans(tags)]
            merged.append({"entities": entities, "tags": tags, "index": row["index"]})
        return merged


def is_iob2(tag: Any) -> bool:
    return tag == "O" or (isinstance(tag, str) and tag[:2] in ("B-", "I-") and len(tag) > 2)


def entity_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """The entities of a tag sequence as (type, first word, end word exclusive), in strict IOB2 as
    seqeval's `mode="strict", scheme=IOB2`: an entity is a B-X and the I-X right after it; an I-
    that continues no entity of its type is ignored (conlleval would start an entity there)."""
    spans, start, kind = [], None, None
    for i, tag in enumerate([*tags, "O"]):
        if start is not None and tag != f"I-{kind}":
            spans.append((kind, start, i))
            start = None
        if tag.startswith("B-"):
            start, kind = i, tag[2:]
    return spans


class EntityScores(Metric):
    """Entity-level precision, recall and F1 (micro over all entities) and F1 per type (`f1/PER`): a predicted
    entity counts when its type and its exact span match a gold one. The states are counts per type,
    summed across batches and processes, so the scores are exact however the data is split."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, types: list[str]) -> None:
        super().__init__()
        self.types = types
        for name in ("correct", "predicted", "gold"):
            self.add_state(name, default=torch.zeros(len(types), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted: list[list[str]], gold: list[list[str]]) -> None:
        """Tag sequences, one per sentence (torchmetrics' order: predictions first; seqeval's is the reverse)."""
        counts = torch.zeros(3, len(self.types), dtype=torch.long)
        for predicted_tags, gold_tags in zip(predicted, gold):
            found, expected = set(entity_spans(predicted_tags)), set(entity_spans(gold_tags))
            for row, spans in enumerate((found & expected, found, expected)):
                for kind, _, _ in spans:
                    counts[row, self.types.index(kind)] += 1
        self.correct += counts[0].to(self.device)
        self.predicted += counts[1].to(self.device)
        self.gold += counts[2].to(self.device)

    def compute(self) -> dict[str, torch.Tensor]:
        correct, predicted, gold = self.correct.double(), self.predicted.double(), self.gold.double()
        # 0 where nothing was predicted (or expected), as seqeval; F1 = 2PR/(P+R) = 2·correct/(predicted+gold)
        f1 = 2 * correct / (predicted + gold).clamp(min=1)
        return {"precision": correct.sum() / predicted.sum().clamp(min=1),
                "recall": correct.sum() / gold.sum().clamp(min=1),
                "f1": 2 * correct.sum() / (predicted.sum() + gold.sum()).clamp(min=1),
                **{f"f1/{kind}": f1[i] for i, kind in enumerate(self.types)}}
