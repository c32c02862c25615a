"""examples/ner: token classification as an outside plugin package. Unit tests of its alignment,
decoding and metric (against seqeval), its input errors, the conformance kit, and the package
installed with pip and driven through the `finetune` command as a user would."""

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from conftest import KIT_PROCESSES, MINILM, REPO
from finetune.errors import InputError
from finetune.task import Column
from finetune.testing import processes_env

EXAMPLE = REPO / "examples" / "ner"
sys.path.insert(0, str(EXAMPLE))
from finetune_ner import EntityScores, TokenClassification, entity_spans  # noqa: E402

LABELS = ["O", "B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER"]
TAGS = {label: i for i, label in enumerate(LABELS)}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MINILM)


def checked(task: TokenClassification, split: str, rows: list[dict], where: str) -> TokenClassification:
    """The core's order: the label set learned from train, then the rows checked."""
    dataset = datasets.Dataset.from_list(rows)
    if split == "train":
        task = task.with_options(**task.learn(dataset))
    task.check_rows(split, dataset, where)
    return task


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- word labels -> sub-word tokens, and back --------------------------------------------------------
WORDS = ["Lovelace", "visited", "New", "Reykjavik", "."]
WORD_TAGS = ["B-PER", "O", "B-LOC", "I-LOC", "O"]


def test_the_first_sub_token_of_a_word_gets_its_tag_and_the_others_are_ignored(tokenizer):
    task = TokenClassification(labels=LABELS)
    features = task.preprocess({"tokens": [WORDS], "tags": [WORD_TAGS]}, tokenizer, with_targets=True)
    tokens = tokenizer.convert_ids_to_tokens(features["input_ids"][0])
    assert tokens == ["[CLS]", "love", "##lace", "visited", "new", "reykjavik", ".", "[SEP]"]
    assert features["word_ids"][0] == [-1, 0, 0, 1, 2, 3, 4, -1]
    expected = [-100, "B-PER", -100, "O", "B-LOC", "I-LOC", "O", -100]
    assert features["labels"][0] == [TAGS.get(t, t) for t in expected]


def test_with_label_all_subtokens_every_sub_token_is_labelled_continuing_with_i(tokenizer):
    task = TokenClassification(labels=LABELS, label_all_subtokens=True)
    features = task.preprocess({"tokens": [WORDS], "tags": [WORD_TAGS]}, tokenizer, with_targets=True)
    expected = [-100, "B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O", -100]  # love ##lace: B-PER I-PER
    assert features["labels"][0] == [TAGS.get(t, t) for t in expected]


@pytest.mark.parametrize("label_all_subtokens", [False, True])
def test_word_tags_are_read_back_at_first_sub_tokens_after_collate(tokenizer, label_all_subtokens):
    task = TokenClassification(labels=LABELS, label_all_subtokens=label_all_subtokens)
    examples = {"tokens": [WORDS, ["Paris"]], "tags": [WORD_TAGS, ["B-LOC"]]}
    features = task.preprocess(examples, tokenizer, with_targets=True)
    rows = [{key: values[i] for key, values in features.items()} for i in range(2)]
    batch = task.collate(rows, tokenizer, with_targets=True)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["word_ids"].shape == (2, 8)
    assert batch["labels"][1, 3:].tolist() == [-100] * 5 and batch["word_ids"][1, 3:].tolist() == [-1] * 5
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]  # padded on the right
    assert task.word_tags(batch["labels"], batch["word_ids"]) == [WORD_TAGS, ["B-LOC"]]


def test_integer_tags_index_the_given_labels(tokenizer):
    task = TokenClassification(labels=LABELS)
    ids = [TAGS[t] for t in WORD_TAGS]
    checked(task, "train", [{"tokens": WORDS, "tags": ids}], "data.train_file (t.jsonl)")
    as_ids = task.preprocess({"tokens": [WORDS], "tags": [ids]}, tokenizer, with_targets=True)
    as_names = task.preprocess({"tokens": [WORDS], "tags": [WORD_TAGS]}, tokenizer, with_targets=True)
    assert as_ids["labels"] == as_names["labels"]


def test_the_label_set_is_learned_from_train_o_first_then_sorted_with_b_and_i_of_each_type():
    task = TokenClassification()
    rows = [{"tokens": ["Zed", "at", "Acme"], "tags": ["B-PER", "O", "B-ORG"]},
            {"tokens": ["Oslo", "Fjord"], "tags": ["B-LOC", "I-LOC"]}]
    task = checked(task, "train", rows, "data.train_file (t.jsonl)")
    assert task.labels == LABELS  # I-ORG and I-PER too, though training only shows B-
    assert task.model_kwargs()["id2label"] == dict(enumerate(LABELS))
    assert task.config()["init_args"]["labels"] == LABELS  # so checkpoints restore it
    assert task.learn(datasets.Dataset.from_list(rows)) == {}  # a given label set is kept


def predicted(task: TokenClassification, tokenizer, sentences: list[list[str]], wanted: list[list[str]]) -> list:
    """Predictions for `sentences` by a model whose logits pick the `wanted` tag of each word's tokens,
    through the hooks in the core's order."""
    rows = [{"tokens": words} for words in sentences]
    checked(task, "predict", rows, "data.predict_file (p.jsonl)")
    context = task.split_context("predict", datasets.Dataset.from_list(rows))
    features = task.preprocess({"tokens": sentences}, tokenizer, with_targets=False)
    batch = task.collate([{k: v[i] for k, v in features.items()} for i in range(len(sentences))], tokenizer,
                         with_targets=False)
    token_tags = [[TAGS[tags[w]] if w >= 0 else 0 for w in word_ids]
                  for tags, word_ids in zip(wanted, batch["word_ids"].tolist())]
    logits = torch.nn.functional.one_hot(torch.tensor(token_tags), len(LABELS)).float()
    predictions = task.predict(lambda **inputs: type("Out", (), {"logits": logits}), batch, tokenizer)
    assert all(p.keys() == {"tags"} for p in predictions)  # the entities need the words: merge_predictions
    return task.merge_predictions([{**p, "index": i} for i, p in enumerate(predictions)], context)


def test_predicted_entities_carry_character_spans_of_the_joined_words(tokenizer):
    task = TokenClassification(labels=LABELS)
    words = ["Ada", "Lovelace", "left", "Lake", "Victoria", "."]
    wanted = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]
    (row,) = predicted(task, tokenizer, [words], [wanted])
    assert row["tags"] == wanted and row["index"] == 0
    assert row["entities"] == [{"text": "Ada Lovelace", "type": "PER", "start": 0, "end": 12},
                               {"text": "Lake Victoria", "type": "LOC", "start": 18, "end": 31}]
    text = " ".join(words)
    assert [text[e["start"]:e["end"]] for e in row["entities"]] == ["Ada Lovelace", "Lake Victoria"]


def test_words_truncated_away_are_predicted_o_and_sentences_keep_their_index(tokenizer):
    task = TokenClassification(labels=LABELS, max_length=4)  # [CLS] ada lovelace [SEP]
    sentences = [["Paris"], ["Ada", "Lovelace", "left", "Lake", "Victoria"]]
    wanted = [["B-LOC"], ["B-PER", "I-PER", "B-LOC", "B-LOC", "B-LOC"]]
    rows = predicted(task, tokenizer, sentences, wanted)
    assert [row["index"] for row in rows] == [0, 1]
    assert rows[1]["tags"] == ["B-PER", "I-PER", "O", "O", "O"]
    assert [e["text"] for row in rows for e in row["entities"]] == ["Paris", "Ada Lovelace"]


# --- entities and scores: strict IOB2, as seqeval's mode="strict" ---------------------------------------
@pytest.mark.parametrize("tags, spans", [
    ([], []),
    (["O", "O"], []),
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
    (["B-LOC", "I-LOC", "I-LOC"], [("LOC", 0, 3)]),  # an entity at the end
    (["I-PER", "I-PER"], []),  # I- without a B-: no entity (conlleval would find PER 0-2)
    (["O", "I-PER", "B-PER"], [("PER", 2, 3)]),
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 1)]),  # a type change ends the entity; the I-LOCs begin none
    (["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),  # B- after B- of the same type: two
    (["B-PER", "I-PER", "O", "I-PER"], [("PER", 0, 2)]),
])
def test_entity_spans_in_strict_iob2(tags, spans):
    assert entity_spans(tags) == spans
    seqeval = pytest.importorskip("seqeval.scheme")
    found = seqeval.Tokens(tags, seqeval.IOB2).entities
    assert [(e.tag, e.start, e.end) for e in found] == spans


def random_tags(rng: random.Random, n: int) -> list[str]:
    """Messy sequences: valid entities, stray I- tags, type changes."""
    return [rng.choice(["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]) for _ in range(n)]


def perturbed(rng: random.Random, tags: list[str]) -> list[str]:
    return [rng.choice(LABELS) if rng.random() < 0.25 else tag for tag in tags]


@pytest.mark.parametrize("seed", range(5))
def test_entity_scores_equal_seqeval_strict_iob2(seed):
    seqeval_metrics = pytest.importorskip("seqeval.metrics")
    from seqeval.scheme import IOB2

    rng = random.Random(seed)
    gold = [random_tags(rng, rng.randint(0, 25)) for _ in range(60)]
    predicted = [perturbed(rng, tags) for tags in gold]
    metric = EntityScores(["LOC", "ORG", "PER"])
    for start in range(0, len(gold), 7):  # in batches: the counts add up
        metric.update(predicted[start:start + 7], gold[start:start + 7])
    scores = metric.compute()
    reference = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    assert scores["precision"].item() == pytest.approx(seqeval_metrics.precision_score(gold, predicted, **reference))
    assert scores["recall"].item() == pytest.approx(seqeval_metrics.recall_score(gold, predicted, **reference))
    assert scores["f1"].item() == pytest.approx(seqeval_metrics.f1_score(gold, predicted, **reference))
    report = seqeval_metrics.classification_report(gold, predicted, output_dict=True, **reference)
    for kind in ("LOC", "ORG", "PER"):
        assert scores[f"f1/{kind}"].item() == pytest.approx(report[kind]["f1-score"]), kind
        assert int(metric.gold[["LOC", "ORG", "PER"].index(kind)]) == report[kind]["support"]
    print(f"seed {seed}: ours {scores['precision'].item():.6f} {scores['recall'].item():.6f} "
          f"{scores['f1'].item():.6f}; seqeval micro avg {report['micro avg']}")


def test_nothing_predicted_or_expected_scores_zero_not_nan():
    metric = EntityScores(["PER"])
    metric.update([["O", "O"]], [["O", "O"]])
    assert {k: v.tolist() for k, v in metric.compute().items()} == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "f1/PER": 0.0}


# --- bad input: one InputError naming the source and the 1-based row ----------------------------------
@pytest.mark.parametrize("split, rows, labels, message", [
    ("train", [{"tokens": ["a", "b"], "tags": ["O", "B-PER"]}, {"tokens": ["a", "b"], "tags": ["O"]}], None,
     r"data.train_file \(x.jsonl\), row 2: column 'tags' must hold one tag per word \(2 words\)"),
    ("train", [{"tokens": ["a", "b"], "tags": ["O", "PER"]}], None,
     r"row 1: column 'tags': 'PER' is not an IOB2 tag \(O, B-TYPE or I-TYPE\)"),
    ("train", [{"tokens": ["a"], "tags": ["E-PER"]}], LABELS, r"row 1: column 'tags': 'E-PER' is not an IOB2 tag"),
    ("val", [{"tokens": ["a"], "tags": ["B-PER"]}, {"tokens": ["b"], "tags": ["B-MISC"]}], LABELS,
     r"row 2: column 'tags': tag 'B-MISC' is not in the label set"),
    ("val", [{"tokens": ["a"], "tags": [7]}], LABELS, r"row 1: column 'tags': tag 7 is not an index of the label set"),
    ("train", [{"tokens": ["a"], "tags": [0]}], None,
     r"data.train_file \(x.jsonl\): column 'tags' holds integers; name the tags .*labels"),
    ("train", [{"tokens": ["a"], "tags": ["O"]}], None, r"column 'tags' tags no entity"),
    ("val", [{"tokens": ["a"], "tags": ["O"]}], None, r"model.task.init_args.labels: no label set"),
    ("predict", [{"tokens": ["a"]}], None, r"model.task.init_args.labels: no label set"),
])
def test_bad_rows_are_input_errors_naming_source_and_row(split, rows, labels, message):
    task = TokenClassification(labels=labels)
    source = f"data.{split}_file (x.jsonl)"
    with pytest.raises(InputError, match=message):
        checked(task, split, rows, source)


def test_invalid_labels_and_a_slow_tokenizer_are_input_errors():
    with pytest.raises(InputError, match=r"model.task.init_args.labels: 'PER' is not an IOB2 tag"):
        TokenClassification(labels=["O", "PER"])
    slow = type("SlowTokenizer", (), {"is_fast": False})()
    with pytest.raises(InputError, match=r"model.backbone: token classification needs a fast tokenizer"):
        TokenClassification().backbone_options(None, slow)
    assert TokenClassification().backbone_options(None, type("Fast", (), {"is_fast": True})()) == {}


def test_the_core_checks_the_tokens_as_words_and_reads_the_tags_only_with_targets():
    assert TokenClassification().columns() == [Column("tokens_column", "words"),
                                               Column("tags_column", "label", target=True)]


# --- the conformance kit ---------------------------------------------------------------------------------
@pytest.mark.parametrize("processes", KIT_PROCESSES)
@pytest.mark.parametrize("backbone", ["bert", "llama"])  # an encoder, and a token-classification head on a decoder
def test_ner_passes_the_conformance_kit(backbone, processes, tmp_path, monkeypatch):
    from finetune.testing import check_task

    monkeypatch.syspath_prepend(str(EXAMPLE))  # (the kit's subprocesses import the task from sys.path)
    rows = read_jsonl(EXAMPLE / "data" / "train.jsonl")[:24]
    # (every weight trained: LoRA alone learns slowly on the kit's random tiny BERT, whose embeddings stay frozen)
    report = check_task(TokenClassification(), rows, workdir=tmp_path, backbone=backbone, processes=processes, epochs=8,
                        extra_args=["--model.optimizer.lr=0.003", "--model.lora=null"])
    print(report.train_losses, report.metrics_by_processes)
    assert report.train_losses[-1] < report.train_losses[0]
    assert {"val/loss", "val/precision", "val/recall", "val/f1", "val/f1/PER"} <= report.metrics.keys()
    assert report.metrics["val/f1"] > 0  # (so that 1 and 2 processes agree on numbers that say something)
    assert report.metrics_by_processes.keys() == {1, processes}
    assert [len(p["tags"]) for p in report.predictions] == [len(r["tokens"]) for r in rows]


# --- installed with pip, run through the `finetune` command ----------------------------------------------
def finetune(*args: str, cwd: Path, site: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = processes_env(str(site))
    result = subprocess.run([sys.executable, "-m", "finetune", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 or not check, result.stderr[-3000:]
    return result


def epoch_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.match(r"epoch \d+ val/", line)]


def metric(line: str, name: str) -> float:
    return float(re.search(rf"val/{name}=([\d.]+)", line).group(1))


@pytest.mark.slow
def test_installed_plugin_through_the_cli(tmp_path):
    # The user's view: a copy of examples/ner (building writes into the source tree), installed offline.
    shutil.copytree(EXAMPLE, tmp_path / "examples" / "ner",
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "runs"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(tmp_path / "examples" / "ner")], check=True)
    assert (site / "finetune_ner" / "task.py").is_file()

    listing = finetune("tasks", cwd=tmp_path, site=site).stdout
    print(listing)
    (ner,) = [line.split() for line in listing.splitlines() if line.startswith("ner ")]
    assert ner == ["ner", "finetune_ner.TokenClassification", "finetune-ner", "0.1.0"]

    config = ["--config", "examples/ner/config.yaml", "--trainer.enable_progress_bar=false"]
    fit = epoch_lines(finetune("fit", *config, cwd=tmp_path, site=site).stdout)
    print("\n".join(["finetune fit:", *fit]))
    assert len(fit) == 6 and metric(fit[-1], "f1") > 0.7
    assert metric(fit[-1], "loss") < metric(fit[0], "loss")

    last = "runs/ner/checkpoints/last.ckpt"
    (validate,) = epoch_lines(finetune("validate", *config, f"--ckpt_path={last}", cwd=tmp_path, site=site).stdout)
    print("finetune validate:", validate)
    for name in ("loss", "precision", "recall", "f1", "f1/LOC", "f1/ORG", "f1/PER"):
        assert metric(validate, name) == pytest.approx(metric(fit[-1], name), abs=1e-4), name

    finetune("predict", *config, f"--ckpt_path={last}", cwd=tmp_path, site=site)
    inputs = read_jsonl(tmp_path / "examples" / "ner" / "data" / "predict.jsonl")
    predictions = read_jsonl(tmp_path / "runs" / "ner" / "predictions.jsonl")
    print("finetune predict:", *map(json.dumps, predictions[:2]), sep="\n")
    assert len(predictions) == len(inputs)
    for row, prediction in zip(inputs, predictions):
        text = " ".join(row["tokens"])
        assert len(prediction["tags"]) == len(row["tokens"])
        for entity in prediction["entities"]:
            assert text[entity["start"]:entity["end"]] == entity["text"]
            assert entity["type"] in {"PER", "ORG", "LOC"}
    assert sum(len(p["entities"]) for p in predictions) >= len(inputs)  # 2 entities per sentence but one

    # the registered name works too (`task: ner`), and bad data stops with one line naming the file and row
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": ["Ada"], "tags": ["B-PER"]}\n{"tokens": ["Ada", "Lovelace"], "tags": ["B-PER"]}\n')
    result = finetune("fit", f"--model.backbone={MINILM}", "--model.task=ner", f"--data.train_file={bad}",
                      "--trainer.logger=false", cwd=tmp_path, site=site, check=False)
    print(result.stderr.strip().splitlines()[-1])
    assert result.returncode != 0
    assert f"data.train_file ({bad}), row 2: column 'tags' must hold one tag per word (2 words)" in result.stderr
