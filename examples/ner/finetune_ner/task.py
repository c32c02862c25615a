"""Token classification (named entities): a tag per word; entities scored and predicted as spans.

A row is a list of words and one IOB2 tag per word (B-TYPE begins an entity, I-TYPE continues it,
O is outside; integers indexing `labels` work too):

    {"tokens": ["Ada", "Lovelace", "visited", "Paris"], "tags": ["B-PER", "I-PER", "O", "B-LOC"]}

The tokenizer splits words into sub-word tokens; a word's tag trains its first token (or all of
them, `label_all_subtokens`) and the tag predicted for a word is the one at its first token.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from transformers import AutoModelForTokenClassification

from finetune.errors import InputError
from finetune.task import MODEL_INPUTS, Task

IGNORE = -100  # the label of tokens left out of the loss (cross_entropy's ignore_index)
NO_WORD = -1  # the word id of special tokens and padding


class TokenClassification(Task):
    """Args:
    tokens_column / tags_column: a list of words, and a list of as many IOB2 tags.
    labels: the tags in id order; learned from the training split when not given ("O", then B- and
        I- of every entity type seen, sorted).
    label_all_subtokens: train every token of a word on its tag (B- turns into I- after the first
        token); otherwise only the first token, the others are left out of the loss.
    max_length: longer sentences are truncated to this many tokens; words cut off are predicted O.
    """

    name = "ner"
    auto_model = AutoModelForTokenClassification
    head_modules = ("classifier", "score")
    is_split_into_words = True  # the core then checks that `tokens_column` holds lists of words

    def __init__(
        self,
        tokens_column: str = "tokens",
        tags_column: str = "tags",
        labels: Optional[list[str]] = None,
        label_all_subtokens: bool = False,
        max_length: int = 256,
    ) -> None:
        invalid = [label for label in labels or [] if not is_iob2(label)]
        if invalid:
            raise InputError(f"model.task.init_args.labels: {invalid[0]!r} is not an IOB2 tag (O, B-TYPE or I-TYPE)")
        self.tokens_column = tokens_column
        self.tags_column = tags_column
        self.labels = labels
        self.label_all_subtokens = label_all_subtokens
        self.max_length = max_length
        self.words: list[list[str]] = []  # the predict split's words: entities are written with their text

    def input_columns(self) -> dict[str, str]:
        return {"tokens_column": self.tokens_column}

    def target_columns(self) -> dict[str, str]:
        return {"tags_column": self.tags_column}

    def configure_backbone(self, config: Any, tokenizer: Any) -> None:
        if not tokenizer.is_fast:
            raise InputError("model.backbone: token classification needs a fast tokenizer (it maps tokens to words "
                             f"with `word_ids`); {type(tokenizer).__name__} is not one")

    # --- data ----------------------------------------------------------------------------------
    def prepare(self, split: str, dataset: Any, source: str) -> None:
        if self.labels is None and split != "train":
            raise InputError("model.task.init_args.labels: no label set; give it, or a checkpoint (--ckpt_path), or "
                             "data.train_file to learn it from")
        if split == "predict":
            self.words = list(dataset[self.tokens_column])
            return
        if self.labels is None:
            tags = [tag for row in dataset[self.tags_column] if isinstance(row, list) for tag in row]
            if any(isinstance(tag, int) for tag in tags):
                raise InputError(f"{source}: column {self.tags_column!r} holds integers; name the tags they stand "
                                 "for, in id order, in model.task.init_args.labels")
            types = {tag[2:] for tag in tags if is_iob2(tag) and tag != "O"}
            self.labels = ["O"] + sorted(f"{prefix}-{kind}" for kind in types for prefix in "BI")
        for row, (words, tags) in enumerate(zip(dataset[self.tokens_column], dataset[self.tags_column]), start=1):
            where = f"{source}, row {row}: column {self.tags_column!r}"
            if not isinstance(tags, list) or len(tags) != len(words):
                raise InputError(f"{where} must hold one tag per word ({len(words)} words), got {tags!r:.80}")
            for tag in tags:
                if isinstance(tag, int) and not isinstance(tag, bool):
                    if not 0 <= tag < len(self.labels):
                        raise InputError(f"{where}: tag {tag} is not an index of the label set {self.labels} "
                                         "(integer tags index model.task.init_args.labels)")
                elif not is_iob2(tag):
                    raise InputError(f"{where}: {tag!r} is not an IOB2 tag (O, B-TYPE or I-TYPE)")
                elif tag not in self.labels:
                    raise InputError(f"{where}: tag {tag!r} is not in the label set {self.labels} "
                                     "(model.task.init_args.labels, or learned from the training split)")
        if self.labels == ["O"]:
            raise InputError(f"{source}: column {self.tags_column!r} tags no entity (B-TYPE, I-TYPE)")

    def preprocess(self, examples: dict[str, list], tokenizer: Any, with_targets: bool) -> dict[str, list]:
        encoded = tokenizer(examples[self.tokens_column], is_split_into_words=True, truncation=True,
                            max_length=self.max_length)
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

    def collate(self, features: list[dict], tokenizer: Any) -> dict[str, torch.Tensor]:
        # Padding on the right keeps labels and word ids at the positions of their tokens.
        inputs = [{key: f[key] for key in MODEL_INPUTS if key in f} for f in features]
        batch = dict(tokenizer.pad(inputs, padding=True, padding_side="right", return_tensors="pt"))
        length = batch["input_ids"].shape[1]
        for key, pad in (("labels", IGNORE), ("word_ids", NO_WORD)):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] + [pad] * (length - len(f[key])) for f in features])
        batch["index"] = torch.tensor([f["index"] for f in features])
        return batch

    # --- model ---------------------------------------------------------------------------------
    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {label: i for i, label in enumerate(self.labels)}}

    def loss(self, outputs: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(outputs.logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"] != IGNORE).sum())  # the loss is a mean over the labelled tokens

    # --- evaluation ----------------------------------------------------------------------------
    def types(self) -> list[str]:
        return sorted({label[2:] for label in self.labels if label != "O"})

    def metrics(self, split: str) -> MetricCollection:
        return MetricCollection({"entities": EntityScores(self.types())})

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: dict, model: Any) -> None:
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
    def predict(self, model: Any, batch: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        """Per sentence, its entities with character offsets into the words joined by single spaces
        (`" ".join(tokens)[start:end] == text`), and every word's tag."""
        logits = self.forward(model, batch).logits
        rows = []
        for tags, index in zip(self.word_tags(logits.argmax(-1), batch["word_ids"]), batch["index"].tolist()):
            words = self.words[index]
            tags += ["O"] * (len(words) - len(tags))  # words truncated away (the core warns about them)
            starts = [sum(len(w) + 1 for w in words[:i]) for i in range(len(words))]
            entities = [{"text": " ".join(words[first:end]), "type": kind, "start": starts[first],
                         "end": starts[end - 1] + len(words[end - 1])} for kind, first, end in entity_spans(tags)]
            rows.append({"entities": entities, "tags": tags})
        return rows


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
