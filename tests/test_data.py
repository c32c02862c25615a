import json
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy

from conftest import make_rows, write_jsonl
from finetune.data import DataModule, LengthGroupedBatchSampler
from finetune.errors import InputError
from finetune.module import FineTuneModule
from finetune.pipeline import connect
from tasks.classification import TextClassification
from tasks.instruction_tuning import InstructionTuning


def prepared(backbone, task=None, stage="fit", **files) -> DataModule:
    """A data module set up for `stage` against a module, as the Trainer would do it."""
    module = FineTuneModule(backbone, task or TextClassification())
    data = DataModule(**files, batch_size=8)
    data.trainer = SimpleNamespace(global_rank=0, world_size=1, current_epoch=0,
                                   strategy=SingleDeviceStrategy())  # (one process, unsharded)
    connect(module, data, stage)
    return data


def first_batch(data: DataModule, split: str = "train") -> dict:
    loader = {"train": data.train_dataloader, "val": data.val_dataloader,
              "predict": data.predict_dataloader}[split]()
    return next(iter(loader))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_every_file_format_gives_the_same_features(tiny_bert, tmp_path, fmt):
    rows = make_rows(20)
    path = tmp_path / f"train.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    data = prepared(tiny_bert, train_file=str(path))
    reference = prepared(tiny_bert, train_file=write_jsonl(tmp_path / "ref.jsonl", rows))
    assert data.features["train"][:] == reference.features["train"][:]
    assert data.task.labels == ["neg", "neu", "pos"]


def test_string_labels_map_to_ids_in_sorted_order(tiny_bert, tmp_path):
    data = prepared(tiny_bert, train_file=write_jsonl(tmp_path / "t.jsonl", make_rows(9)))
    labels = data.features["train"]["labels"]
    assert labels[:3] == [2, 0, 1]  # pos, neg, neu -> ids in ["neg", "neu", "pos"]


def test_int_labels_are_kept_as_labels(tiny_bert, tmp_path):
    rows = [{"text": r["text"], "label": {"neg": 7, "neu": 3, "pos": 5}[r["label"]]} for r in make_rows(9)]
    data = prepared(tiny_bert, train_file=write_jsonl(tmp_path / "t.jsonl", rows))
    task = data.task
    assert task.labels == [3, 5, 7]
    assert data.features["train"]["labels"][:3] == [1, 2, 0]
    assert task.model_kwargs()["id2label"] == {0: "3", 1: "5", 2: "7"}


def test_multi_label_rows_become_multi_hot_targets(tiny_bert, tmp_path):
    rows = [{"text": "a b", "tags": ["x", "z"]}, {"text": "c", "tags": []}, {"text": "d e f", "tags": ["y"]}]
    task = TextClassification(label_column="tags", multi_label=True)
    data = prepared(tiny_bert, task, train_file=write_jsonl(tmp_path / "t.jsonl", rows))
    assert data.task.labels == ["x", "y", "z"]
    assert data.features["train"]["labels"] == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    batch = first_batch(data)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (3, 3)


def test_sentence_pairs_are_encoded_as_pairs(tiny_bert, tmp_path):
    rows = [{"premise": "a man sleeps", "hypothesis": "nobody sleeps", "label": "no"},
            {"premise": "it rains", "hypothesis": "it is wet", "label": "yes"}]
    task = TextClassification(text_column="premise", text_pair_column="hypothesis")
    data = prepared(tiny_bert, task, train_file=write_jsonl(tmp_path / "t.jsonl", rows))
    tokenizer = data.tokenizer
    first = data.features["train"][0]
    assert tokenizer.decode(first["input_ids"]) == "[CLS] a man sleeps [SEP] nobody sleeps [SEP]"
    assert set(first["token_type_ids"]) == {0, 1}


def test_batches_are_padded_to_their_longest_item(tiny_bert, tmp_path):
    data = prepared(tiny_bert, train_file=write_jsonl(tmp_path / "t.jsonl", make_rows(40)))
    for batch in data.train_dataloader():
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == lengths.max()


def test_length_grouping_covers_every_example_once_and_cuts_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (1000,), generator=gen).tolist()

    def padding(sampler):
        batches = list(sampler)
        seen = sorted(i for batch in batches for i in batch)
        assert seen == list(range(len(lengths)))
        total = sum(max(lengths[i] for i in b) * len(b) for b in batches)
        return 1 - sum(lengths) / total

    grouped = padding(LengthGroupedBatchSampler(lengths, 16, seed=0, shuffle=True, group=True))
    plain = padding(LengthGroupedBatchSampler(lengths, 16, seed=0, shuffle=True, group=False))
    assert grouped < 0.05 < 0.3 < plain


@pytest.mark.parametrize("shuffle", [True, False])
def test_packed_batches_are_rows_filled_best_with_every_example_once(shuffle):
    """With a task that packs rows of 256 tokens, a batch is 8 rows: the examples the task's own collate (packing
    in the sampler's order) puts into at most 8 rows, nearly full."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 257, (800,), generator=gen).tolist()
    task = InstructionTuning(packing=True, max_length=256)
    sampler = LengthGroupedBatchSampler(lengths, 8, seed=0, shuffle=shuffle, group=True,
                                        row_tokens=task.packed_row_length())
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(800))
    rows_per_batch, filled = [], 0
    for batch in batches:
        packed = task.pack([{"input_ids": [1] * lengths[i], "labels": [1] * lengths[i]} for i in batch], pad_id=0)
        rows_per_batch.append(len(packed["input_ids"]))
        filled += int((packed["input_ids"] != 0).sum())
    assert max(rows_per_batch) == 8 and sum(rows_per_batch) > 8 * (len(batches) - 2)
    # (one example per row: 46% of it empty; the emptiest rows are the last of each chunk of ~50 batches)
    assert 1 - filled / (256 * sum(rows_per_batch)) < 0.025
    assert len(batches) == len(sampler) < 800 / 8


def test_training_order_is_shuffled_differently_each_epoch_and_reproducibly():
    sampler = LengthGroupedBatchSampler(list(range(100)), 10, seed=3, shuffle=True, group=True)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == epoch0 != epoch1


# --- bad input: each stops early with one message naming the key/file and what was expected ---

class ClassificationData(DataModule):
    """A data module that reads for a TextClassification task, without a model."""

    def read(self, split: str) -> Any:
        return super().read(split, TextClassification())


def reader(**files) -> DataModule:
    return ClassificationData(**files)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(InputError, match=r"data.val_file: file '.*nope.jsonl' does not exist"):
        reader(val_file=str(tmp_path / "nope.jsonl")).read("val")


def test_unsupported_extension_or_a_directory_is_named(tmp_path):
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(ValueError, match=r"data.train_file: '.*t.txt' has an unsupported extension; expected one of"):
        reader(train_file=str(tmp_path / "t.txt")).read("train")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(InputError, match=r"data.train_file: '.*dir.jsonl' is a directory; expected a file"):
        reader(train_file=str(tmp_path / "dir.jsonl")).read("train")


def test_a_stage_reads_only_its_own_files(tmp_path):
    """`test` with a config whose train_file does not exist here (issue: it used to demand it)."""
    test = write_jsonl(tmp_path / "test.jsonl", make_rows(3))
    data = reader(train_file=str(tmp_path / "train.jsonl"), test_file=test)
    assert len(data.read("test")) == 3


def test_unknown_column_names_the_key_and_suggests(tiny_bert, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"txt": "a", "label": "x"}, {"txt": "b", "label": "y"}])
    with pytest.raises(ValueError, match=r"data.train_file \(.*t.jsonl\) has no column 'text' "
                                         r"\(model.task.init_args.text_column\); its columns are: txt, label. "
                                         r"Did you mean 'txt'\?"):
        prepared(tiny_bert, train_file=path)


def test_label_outside_the_label_set_names_file_and_row(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", make_rows(6))
    val = write_jsonl(tmp_path / "v.jsonl", make_rows(3) + [{"text": "meh", "label": "mixed"}])
    with pytest.raises(ValueError, match=r"data.val_file \(.*v.jsonl\), row 4: label 'mixed' in column 'label' "
                                         r"is not in the label set \['neg', 'neu', 'pos'\]"):
        prepared(tiny_bert, train_file=train, val_file=val)


def test_declared_label_set_is_enforced_on_training_data(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", make_rows(6))
    with pytest.raises(ValueError, match=r"row 3: label 'neu'"):
        prepared(tiny_bert, TextClassification(labels=["neg", "pos"]), train_file=train)


def test_empty_split_is_named(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", make_rows(6))
    (tmp_path / "v.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match=r"data.val_file \(.*v.csv\) is empty"):
        prepared(tiny_bert, train_file=train, val_file=str(tmp_path / "v.csv"))


def test_invalid_json_names_the_file(tiny_bert, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(ValueError, match=r"data.train_file \(.*t.jsonl\): could not be read"):
        prepared(tiny_bert, train_file=str(path))


def test_required_split_missing_for_stage(tiny_bert):
    with pytest.raises(ValueError, match=r"data.predict_file is required for `predict`"):
        prepared(tiny_bert, stage="predict")


def test_unknown_backbone_path_is_named(tmp_path):
    with pytest.raises(InputError, match=r"model.backbone: directory '.*no-such-model' does not exist"):
        FineTuneModule(str(tmp_path / "no-such-model"), "classification")
    with pytest.raises(InputError, match=r"model.backbone: 'no-such-org/no-such-model' is neither a local directory "
                                         r"nor a model reachable on the Hugging Face Hub"):
        FineTuneModule("no-such-org/no-such-model", "classification")
    with pytest.raises(ValueError, match=r"model.backbone: the directory '.*' exists but is not a Hugging Face model"):
        FineTuneModule(str(tmp_path), "classification")


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("n, batch_size, world_size", [(31, 4, 2), (30, 8, 3), (5, 4, 2), (64, 8, 2)])
def test_processes_get_equal_batch_counts_and_evaluation_sees_each_example_once(n, batch_size, world_size, shuffle):
    lengths = [(7 * i) % 13 + 1 for i in range(n)]
    shares = [list(LengthGroupedBatchSampler(lengths, batch_size, seed=0, shuffle=shuffle, group=True,
                                             rank=rank, world_size=world_size)) for rank in range(world_size)]
    assert len({len(share) for share in shares}) == 1
    assert all(len(share) == len(LengthGroupedBatchSampler(lengths, batch_size, 0, shuffle, True, rank, world_size))
               for rank, share in enumerate(shares))
    seen = [i for share in shares for batch in share for i in batch]
    if shuffle:  # training: every example, some repeated to even out the processes
        assert set(seen) == set(range(n))
    else:
        assert sorted(seen) == list(range(n))
