"""The conformance kit (`finetune.testing`): every built-in task passes it, and it catches broken tasks
with a message that names the hook."""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from test_question_answering import code_rows
from torchmetrics import Metric, MetricCollection

from conftest import make_rows, reversal_rows
from finetune.chat import GenerationSettings
from finetune.task import Task
from finetune.testing import ConformanceError, check_task
from finetune.tiny import tiny_backbone
from tasks.classification import TextClassification
from tasks.question_answering import QuestionAnswering
from tasks.summarization import Summarization
from tasks.translation import Translation

# (generation tasks train every weight, so that they generate something worth comparing across processes)
BUILT_IN = {
    "classification": (TextClassification(), make_rows(24), "bert", [], 3),
    "question_answering": (QuestionAnswering(version_2_with_negative=True, max_length=64, doc_stride=16),
                           code_rows(16, seed=1), "bert", [], 3),
    "summarization": (Summarization(source_column="source", target_column="target",
                                    generation=GenerationSettings(max_new_tokens=8)),
                      reversal_rows(24), "t5", ["--model.lora=null"], 8),
    "translation": (Translation(generation=GenerationSettings(max_new_tokens=8)), reversal_rows(24),
                    "gpt2", ["--model.lora=null"], 8),  # (decoder-only)
}


# Two processes (slow) on the Llama only: what they add (metrics synced, predictions merged) is the task's, not the
# backbone family's.
@pytest.mark.parametrize("decoder, processes", [pytest.param(False, 1, id="own-family-1"),
                                                pytest.param(True, 1, id="llama-1"),
                                                pytest.param(True, 2, id="llama-2", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_built_in_task_passes_the_kit(name, decoder, processes, tmp_path):
    """Every task on its usual family and on a decoder-only Llama (with a chat template, as instruct
    models have): classification and QA heads on a decoder, generation through the template."""
    task, rows, backbone, options, epochs = BUILT_IN[name]
    backbone = "llama" if decoder else backbone
    report = check_task(task, rows, workdir=tmp_path, backbone=backbone, epochs=epochs, processes=processes,
                        extra_args=["--model.optimizer.lr=0.01", "--model.lora.target_modules=all-linear", *options])
    assert report.train_losses[-1] < report.train_losses[0]
    assert report.metrics["val/loss"] > 0
    assert report.metrics_by_processes.keys() == {1, processes}
    if processes > 1:
        assert report.metrics_by_processes[processes].keys() == report.metrics.keys()
    assert len(report.predictions) == len(rows)
    print(name, report.metrics_by_processes)


def test_tiny_backbones_tokenize_sentence_pairs_and_append_eos(tmp_path):
    from transformers import AutoTokenizer

    corpus = [r["text"] for r in make_rows(30)]
    bert = AutoTokenizer.from_pretrained(tiny_backbone(tmp_path / "bert", "bert", corpus))
    pair = bert("good table", "bad door")
    assert bert.convert_ids_to_tokens(pair["input_ids"]) == ["[CLS]", "good", "table", "[SEP]", "bad", "door", "[SEP]"]
    assert pair["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]
    assert bert("good table", return_offsets_mapping=True)["offset_mapping"][1:3] == [(0, 4), (5, 10)]
    t5 = AutoTokenizer.from_pretrained(tiny_backbone(tmp_path / "t5", "t5", corpus))
    assert t5("good")["input_ids"][-1] == t5.eos_token_id
    gpt2 = AutoTokenizer.from_pretrained(tiny_backbone(tmp_path / "gpt2", "gpt2", corpus))
    assert gpt2("good")["input_ids"][-1] != gpt2.eos_token_id


# --- broken tasks are caught, naming the hook -------------------------------------------------------
class NotADataclass(Task):
    def __init__(self, cutoff: float = 0.5):
        self.cutoff = cutoff  # options as attributes: nothing declares them, nothing stops state piling up


@dataclass
class KeepsState(Task):
    """Not frozen: hooks could stash state on it (as QA once kept its contexts). (A subclass of a frozen
    task cannot be anything but frozen: Python refuses to define it.)"""

    cutoff: float = 0.5


@dataclass(frozen=True)
class ChangesItsArgument(TextClassification):
    prefix: str = ""

    def __post_init__(self):
        object.__setattr__(self, "prefix", self.prefix + ": ")  # rebuilt from its options, it adds it again


class CountsOutsideState(Metric):
    """Keeps its count in a plain attribute, which `reset` does not clear."""

    def __init__(self):
        super().__init__()
        self.add_state("unused", torch.zeros(()), dist_reduce_fx="sum")
        self.seen = 0

    def update(self, logits):
        self.seen += len(logits)

    def compute(self):
        return torch.tensor(float(self.seen))


class MetricNotReset(TextClassification):
    def metrics(self, split, context):
        return MetricCollection({"seen": CountsOutsideState()})

    def update_metrics(self, metrics, outputs, batch, model, tokenizer):
        metrics["seen"].update(outputs.logits)


class PredictsTensors(TextClassification):
    def predict(self, model, batch, tokenizer):
        logits = self.forward(model, batch).logits
        return [{"logits": row} for row in logits]


class DetachedLoss(TextClassification):
    def loss(self, outputs, batch):
        return super().loss(outputs, batch).detach()


class UnusedHead(TextClassification):
    head_modules = ("classifier", "pooler")  # BERT's pooler does not feed the classifier... here: make it unused

    def forward(self, model, batch):
        outputs = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return type("Out", (), {"logits": model.classifier(outputs.last_hidden_state[:, 0])})()


class LossIsASum(TextClassification):
    """The loss summed over the rows, not averaged: the core's means would grow with the batch size."""

    def loss(self, outputs, batch):
        return torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="sum")


def test_declaration_errors_are_raised_when_the_task_class_is_defined():
    with pytest.raises(TypeError, match=r"postponed_annotations_task.PostponedAnnotations: its module has `from "
                                        r"__future__ import annotations`, .* remove that import from .*postponed"):
        import postponed_annotations_task  # noqa: F401
    with pytest.raises(TypeError, match=r"AnnotatedHead.head_modules: annotated as tuple, so @dataclass would make "
                                        r"it an option; write `head_modules: ClassVar\[...\] = ...`"):
        @dataclass(frozen=True)
        class AnnotatedHead(TextClassification):
            head_modules: tuple = ("classifier",)

    @dataclass(frozen=True)
    class DeclaredHead(TextClassification):
        head_modules: ClassVar[tuple[str, ...]] = ("classifier",)

    fields = [f.name for f in dataclasses.fields(DeclaredHead)]
    assert fields == [f.name for f in dataclasses.fields(TextClassification)]


@pytest.mark.parametrize("task, message", [
    (NotADataclass(), r"Task.config: NotADataclass must be a @dataclass\(frozen=True\)"),
    (KeepsState(), r"Task.config: KeepsState must be a @dataclass\(frozen=True\)"),
    (ChangesItsArgument(), r"Task.config: does not rebuild an equal task"),
    (MetricNotReset(), r"Task.metrics: metric 'seen' is .* after reset .* declare all state with `add_state`"),
    (PredictsTensors(), r"Task.predict: row .* is not JSON-serialisable"),
    (DetachedLoss(), r"Task.loss: has no gradient"),
    (UnusedHead(), r"Task.loss: its gradient reaches none of \d+ trainable weights, e.g. \['model.*pooler"),
    (LossIsASum(), r"Task.loss_weight: the batch's loss x loss_weight is .* `loss` must be the mean over the "
                       r"`loss_weight\(batch\)` items"),
])
def test_broken_tasks_fail_with_the_hook_named(task, message, tmp_path):
    with pytest.raises(ConformanceError, match=message):
        check_task(task, make_rows(12), workdir=tmp_path, processes=1, epochs=1)
