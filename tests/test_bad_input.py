"""Bad input files: every reader stops with one InputError naming the file, the line or row and the
column, never a traceback from inside a library, and never reads garbage silently."""

import csv
import io
import json
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from transformers import AutoTokenizer

import finetune.files
from conftest import make_rows, write_jsonl
from finetune.columns import check_columns
from finetune.data import DataModule
from finetune.errors import InputError
from finetune.module import FineTuneModule
from finetune.pipeline import connect
from finetune.preflight import OutputDirsCheck, check_output_dirs
from finetune.task import Column, Task
from tasks.classification import TextClassification
from tasks.translation import Translation

GOOD = [{"text": "a good day", "label": "pos"}, {"text": "a bad day", "label": "neg"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_bert):
    return AutoTokenizer.from_pretrained(tiny_bert)


def read_rows(path, task=None, split="train") -> list[dict]:
    """What `setup` does before tokenizing: read the split and check its columns and values."""
    task = task or TextClassification()
    data = DataModule(**{f"{split}_file": str(path)})
    raw = data.read(split, task)
    check_columns(task, raw, split, data.where(split))
    return raw.to_list()


def write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def jsonl(rows, newline="\n") -> str:
    return "".join(json.dumps(row) + newline for row in rows)


# --- 1. invalid JSON Lines: the line and the JSON error --------------------------------------------

def test_invalid_json_names_file_line_and_error(tmp_path):
    path = write(tmp_path / "x.jsonl", jsonl(GOOD * 3) + '{"text": "b" "label": "neg"}\n' + jsonl(GOOD))
    with pytest.raises(InputError, match=r"^data.train_file \(.*x.jsonl\): could not be read: line 7: invalid JSON: "
                                         r"Expecting ',' delimiter \(column 14\)$"):
        read_rows(path)


def test_truncated_last_line_is_named(tmp_path):
    path = write(tmp_path / "x.jsonl", jsonl(GOOD) + '{"text": "b", "label": ')
    with pytest.raises(InputError, match=r"x.jsonl\): could not be read: line 3: invalid JSON: Expecting value"):
        read_rows(path)


def test_blank_lines_are_skipped_anywhere(tmp_path):
    path = write(tmp_path / "x.jsonl", "\n" + jsonl(GOOD[:1]) + "\n  \n" + jsonl(GOOD[1:]) + "\n\n")
    assert read_rows(path) == GOOD


def test_lines_that_are_not_objects_are_named(tmp_path):
    path = write(tmp_path / "x.jsonl", jsonl(GOOD) + '["a good day", "pos"]\n')
    with pytest.raises(InputError, match=r"x.jsonl\): could not be read: line 3 is a list \(\['a good day', 'pos'\]\), "
                                         r"not an object \{...\} \(one object per row\)"):
        read_rows(path)


@pytest.mark.parametrize("line, content", [(1, '{"text": "a", "text": "b", "label": "neg"}'),
                                           (3, '{"text": "a", "label": "neg", "meta": {"k": 1, "k": 2}}')])
def test_a_key_given_twice_names_the_line_counted_from_one(tmp_path, line, content):
    """(issue 25: Arrow's message, "Column(/text) was specified twice in row 0", counted rows from 0)"""
    lines = [json.dumps(GOOD[0]), json.dumps(GOOD[1])]
    lines.insert(line - 1, content)
    key = "text" if line == 1 else "k"
    with pytest.raises(InputError, match=rf"^data.train_file \(.*x.jsonl\): could not be read: line {line}: key "
                                         rf"'{key}' appears twice in one object; keep one \(JSON keys must be "
                                         r"unique\)$"):
        read_rows(write(tmp_path / "x.jsonl", "\n".join(lines) + "\n"))


def nested(depth: int, opener: str = "{") -> str:
    """JSON text of a value `depth` lists or objects deep."""
    if opener == "[":
        return "[" * depth + "1" + "]" * depth
    return '{"a": ' * depth + '"x \\" ]]" ' + "}" * depth  # (brackets in a string do not count)


@pytest.mark.parametrize("depth", [63, 100, 5000])
@pytest.mark.parametrize("opener", ["{", "["])
@pytest.mark.parametrize("layout", ["jsonl", "json list"])
def test_a_value_nested_too_deep_names_file_row_column_and_limit(tmp_path, depth, opener, layout):
    """(issue 25: a RecursionError traceback at 5,000 levels, an unlocated Arrow error at 100) in a column the
    task does not even read."""
    good = json.dumps(GOOD[0])
    deep = f'{{"text": "a [bad] day", "label": "neg", "meta": {nested(depth, opener)}}}'
    if layout == "jsonl":
        path, where = write(tmp_path / "x.jsonl", f"{good}\n{good}\n{deep}\n"), "line 3"
    else:
        path, where = write(tmp_path / "x.json", f"[{good},\n {deep}]"), "item 2 of the list"
    with pytest.raises(InputError, match=rf"^data.train_file \(.*{path.name}\): could not be read: {where}: column "
                                         r"'meta' nests lists or objects more than 62 levels deep, which cannot be "
                                         r"read \(the limit is 62\); flatten it or drop the column$"):
        read_rows(path)


def test_a_value_nested_as_deep_as_the_limit_reads(tmp_path):
    deep = {"text": "a bad day", "label": "neg", "meta": json.loads(nested(62))}
    assert read_rows(write(tmp_path / "x.jsonl", jsonl([GOOD[0], deep])))[1] == deep


def test_the_line_scan_runs_only_when_reading_fails(tmp_path, monkeypatch):
    def scan(*args, **kwargs):
        raise AssertionError("scanned a file that read fine")

    monkeypatch.setattr(finetune.files, "file_problem", scan)
    assert read_rows(write(tmp_path / "x.jsonl", jsonl(GOOD))) == GOOD


def test_empty_jsonl_is_named(tmp_path):
    with pytest.raises(InputError, match=r"^data.train_file \(.*x.jsonl\) is empty$"):
        read_rows(write(tmp_path / "x.jsonl", "\n \n"))


def test_text_that_is_not_utf8_is_named(tmp_path):
    content = (jsonl(GOOD) + '{"text": "caf\xe9", "label": "pos"}\n').encode("latin-1")
    with pytest.raises(InputError, match=r"x.jsonl\): could not be read: line 3: not UTF-8 text \(byte 0xe9\)"):
        read_rows(write(tmp_path / "x.jsonl", content))
    content = "text,label\na good day,pos\ncaf\xe9,pos\n".encode("latin-1")
    with pytest.raises(InputError, match=r"x.csv\): could not be read: line 3: not UTF-8 text \(byte 0xe9\)"):
        read_rows(write(tmp_path / "x.csv", content))


# --- 2. JSON that is neither a list of objects nor JSON Lines ---------------------------------------

@pytest.mark.parametrize("content, message", [
    ("5", r"line 1 is a number \(5\), not an object"),
    ('["a good day", "a bad day"]', r"the file is a JSON list of strings; expected a list of objects"),
    ("[\n  1,\n  2\n]", r"the file is a JSON list of numbers; expected a list of objects"),
    ('[{"text": "a", "label": "pos"}, 5]', r"item 2 of the list is a number \(5\), not an object"),
    ('[{"text": "a", "label": "pos"},\n {"text": "b" "label": "neg"}]', r"line 2: invalid JSON: Expecting ','"),
    (json.dumps(GOOD[0], indent=2), r"the file holds one JSON object over several lines; expected JSON Lines"),
    (json.dumps({"text": ["a", "b"], "label": ["pos", "neg"]}, indent=2), r"the file holds one JSON object over"),
])
def test_json_that_is_not_rows_is_named(tmp_path, content, message):
    with pytest.raises(InputError, match=r"^data.train_file \(.*x.json\): could not be read: " + message):
        read_rows(write(tmp_path / "x.json", content))


def test_json_list_of_objects_and_json_lines_in_a_json_file_read(tmp_path):
    assert read_rows(write(tmp_path / "list.json", json.dumps(GOOD, indent=2))) == GOOD
    assert read_rows(write(tmp_path / "lines.json", jsonl(GOOD))) == GOOD


# --- 3./4. byte-order marks and mixed line endings just work ---------------------------------------

def csv_text(rows, newline="\n") -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator=newline).writerows([["text", "label"], *([r["text"], r["label"]] for r in rows)])
    return out.getvalue()


@pytest.mark.parametrize("name, content", [
    ("x.jsonl", jsonl(GOOD)), ("x.json", json.dumps(GOOD)), ("x.csv", csv_text(GOOD)),
])
def test_byte_order_mark_is_ignored(tmp_path, name, content):
    rows = read_rows(write(tmp_path / name, "\ufeff" + content))
    assert rows == GOOD and list(rows[0]) == ["text", "label"]


def test_mixed_line_endings_give_the_same_rows(tmp_path):
    rows = make_rows(6)
    mixed = "".join(json.dumps(r) + ("\r\n" if i % 2 else "\n") for i, r in enumerate(rows))
    assert read_rows(write(tmp_path / "x.jsonl", mixed)) == rows
    lines = csv_text(rows, "\r\n").split("\r\n")
    mixed = "".join(line + ("\r\n" if i % 2 else "\n") for i, line in enumerate(lines[:-1]))
    assert read_rows(write(tmp_path / "x.csv", mixed)) == read_rows(write(tmp_path / "clean.csv", csv_text(rows)))
    assert read_rows(write(tmp_path / "x.csv", mixed)) == rows


# --- 5. text columns must hold text that is not empty -----------------------------------------------

@pytest.mark.parametrize("bad, message", [
    ({"text": 3, "label": "pos"}, r"row 3: column 'text' must hold text, got a number: 3"),
    ({"text": None, "label": "pos"}, r"row 3: column 'text' is missing or null"),
    ({"label": "pos"}, r"row 3: column 'text' is missing or null"),
    ({"text": ["a", "b"], "label": "pos"}, r"row 3: column 'text' must hold text, got a list: \['a', 'b'\]"),
    ({"text": True, "label": "pos"}, r"row 3: column 'text' must hold text, got a boolean: True"),
    ({"text": "", "label": "pos"}, r"row 3: column 'text' is empty"),
    ({"text": " \t\n", "label": "pos"}, r"row 3: column 'text' holds only whitespace \(' \\t\\n'\)"),
])
def test_bad_text_names_file_row_column_and_value(tmp_path, bad, message):
    path = write(tmp_path / "x.jsonl", jsonl([*GOOD, bad]))
    with pytest.raises(InputError, match=r"^data.train_file \(.*x.jsonl\), " + message):
        read_rows(path)


def test_a_text_column_of_numbers_is_named(tmp_path):
    path = write(tmp_path / "x.jsonl", jsonl([{"text": 1, "label": "pos"}, {"text": 2, "label": "neg"}]))
    with pytest.raises(InputError, match=r"x.jsonl\), row 1: column 'text' must hold text, got a number: 1"):
        read_rows(path)


def test_the_pair_column_and_the_predict_split_are_checked(tmp_path):
    task = TextClassification(text_column="premise", text_pair_column="hypothesis")
    rows = [{"premise": "it rains", "hypothesis": "it is wet", "label": "yes"},
            {"premise": "it rains", "hypothesis": 42, "label": "no"}]
    with pytest.raises(InputError, match=r"x.jsonl\), row 2: column 'hypothesis' must hold text, got a number: 42"):
        read_rows(write(tmp_path / "x.jsonl", jsonl(rows)), task)
    with pytest.raises(InputError, match=r"^data.predict_file \(.*p.jsonl\), row 2: column 'text' is empty"):
        read_rows(write(tmp_path / "p.jsonl", jsonl([{"text": "a"}, {"text": ""}])), split="predict")


def test_bad_text_stops_setup_before_tokenizing(tiny_bert, tmp_path):
    module = FineTuneModule(tiny_bert, TextClassification())
    data = DataModule(train_file=str(write(tmp_path / "x.jsonl", jsonl([*GOOD, {"text": 7, "label": "pos"}]))))
    with pytest.raises(InputError, match=r"x.jsonl\), row 3: column 'text' must hold text, got a number: 7"):
        connect(module, data, "fit")


@dataclass(frozen=True)
class IdsAndRecords(Task):
    """A task whose input columns are not all text: an id (numbers are fine) and nested records."""

    text_column: str = "text"
    id_column: str = "id"
    record_column: str = "record"
    answers_column: str = "answers"

    def columns(self):
        return [Column("text_column"), Column("id_column", "id"), Column("record_column", "record"),
                Column("answers_column", "record", target=True)]


def test_only_text_columns_are_checked(tmp_path):
    rows = [{"id": i, "text": "a question", "record": {"en": "hello", "de": "hallo"},
             "answers": {"text": ["x"], "answer_start": [i]}} for i in range(3)]
    assert read_rows(write(tmp_path / "x.jsonl", jsonl(rows)), IdsAndRecords()) == rows
    nested = Translation(source_lang="en", target_lang="de")
    rows = [{"translation": {"en": "hello", "de": "hallo"}}, {"translation": {"en": "bye", "de": "tschüss"}}]
    assert read_rows(write(tmp_path / "t.jsonl", jsonl(rows)), nested) == rows


# --- 6. CSV that does not parse -----------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    ("text,label\na good day,pos\nhello, world,pos\n", r"line 3: 3 fields where the header has 2 \(quote fields"),
    ("text,label\nhello, world,pos\nbye, world,neg\n", r"the first row has more fields than the header \(quote"),
    ('text,label\na,pos\nb,neg\n"c,pos\nd,neg\n', r'line 4: a quoted field is never closed \(unbalanced "\)'),
])
def test_unparsable_csv_names_file_and_line(tmp_path, content, message):
    with pytest.raises(InputError, match=r"^data.train_file \(.*x.csv\): could not be read: " + message):
        read_rows(write(tmp_path / "x.csv", content))


def test_csv_cells_are_text_as_written(tmp_path):
    rows = [{"text": text, "label": "pos"} for text in ["NA", "null", "007", "12", "1e5", "True", "nan", "None"]]
    assert read_rows(write(tmp_path / "x.csv", csv_text(rows))) == rows
    numbers = [{"text": "12", "label": "pos"}, {"text": "13", "label": "neg"}]  # a column of numbers is still text
    assert read_rows(write(tmp_path / "n.csv", csv_text(numbers))) == numbers
    with pytest.raises(InputError, match=r"x.csv\), row 2: column 'text' is missing or null"):
        read_rows(write(tmp_path / "x.csv", "text,label\na,pos\n,neg\n"))


def test_corrupt_parquet_names_the_file(tmp_path):
    with pytest.raises(InputError, match=r"^data.train_file \(.*x.parquet\): could not be read: Parquet magic bytes"):
        read_rows(write(tmp_path / "x.parquet", "not parquet"))
    pd.DataFrame([{"text": 5, "label": "pos"}]).to_parquet(tmp_path / "y.parquet")
    with pytest.raises(InputError, match=r"y.parquet\), row 1: column 'text' must hold text, got a number: 5"):
        read_rows(tmp_path / "y.parquet")


# --- 7. columns whose values change type --------------------------------------------------------------

def test_label_column_mixing_types_names_file_row_and_column(tmp_path):
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 2}, {"text": "c", "label": "pos"}]
    with pytest.raises(InputError, match=r"^data.train_file \(.*x.jsonl\), row 3: column 'label' holds a string "
                                         r"\('pos'\) but row 1 holds a number \(1\); all values of a column must"):
        read_rows(write(tmp_path / "x.jsonl", jsonl(rows)))


def test_arrow_type_inference_errors_are_explained(tmp_path, monkeypatch):
    """Older `datasets` (and pyarrow) fail on a column of mixed types instead of reading it as JSON: the
    file's own scan (not the library's message) finds the line."""
    def load_dataset(*args, **kwargs):
        try:
            raise pa.ArrowInvalid("JSON parse error: Column(/label) changed from number to string in row 2")
        except pa.ArrowInvalid as err:
            raise datasets.exceptions.DatasetGenerationError("An error occurred while generating the dataset") from err

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 2.5}, {"text": "c", "label": "pos"}]
    with pytest.raises(InputError, match=r"x.jsonl\): could not be read: line 3: column 'label' holds a string "
                                         r"\('pos'\) but line 1 holds a number \(1\)"):
        read_rows(write(tmp_path / "x.jsonl", jsonl(rows)))


# --- 8. Hugging Face datasets by name -----------------------------------------------------------------

def test_unknown_dataset_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = DataModule(dataset="no-such-org/no-such-dataset")
    with pytest.raises(InputError, match=r"^data.dataset: could not load 'no-such-org/no-such-dataset': "):
        data.read("train", TextClassification())
    missing = str(tmp_path / "no-such-dir")
    with pytest.raises(InputError, match=r"^data.dataset: '.*no-such-dir' does not exist"):
        DataModule(dataset=missing).read("train", TextClassification())


# --- 9. text longer than the task's maximum length ----------------------------------------------------

def test_truncation_is_warned_once_per_split(tiny_bert, tokenizer, tmp_path):
    task = TextClassification(max_length=8)
    exact = "one two three four five six"  # [CLS] + 6 tokens + [SEP]: exactly 8, not truncated
    assert len(tokenizer(exact)["input_ids"]) == 8
    rows = [{"text": exact, "label": "pos"}, {"text": "short", "label": "neg"}]
    data = DataModule(train_file=write_jsonl(tmp_path / "t.jsonl", rows),
                      val_file=write_jsonl(tmp_path / "v.jsonl", rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.connect(task, tokenizer, "fit")
    long = [*rows, {"text": "one two three four five six seven", "label": "pos"},
            {"text": "word " * 500, "label": "neg"}]
    data = DataModule(train_file=write_jsonl(tmp_path / "t2.jsonl", long),
                      val_file=write_jsonl(tmp_path / "v.jsonl", rows))
    with pytest.warns(UserWarning) as record:
        data.connect(task, tokenizer, "fit")
    messages = [str(w.message) for w in record if "truncated" in str(w.message)]
    assert messages == [f"data.train_file ({tmp_path / 't2.jsonl'}): 2 of 4 train examples are longer than the task's "
                        "limits and were truncated (2 by max_length); raise model.task.init_args.max_length=8 to "
                        "keep more of them"]
    assert [len(ids) for ids in data.features["train"]["input_ids"]] == [8, 3, 8, 8]


# --- 10. output directories that cannot be written ----------------------------------------------------

@pytest.fixture
def under_a_file(tmp_path) -> str:
    (tmp_path / "file.txt").write_text("x")
    return str(tmp_path / "file.txt" / "sub")


def trainer(**kwargs) -> Trainer:
    return Trainer(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False, **kwargs)


def test_unwritable_output_dirs_fail_at_fit_setup(tmp_path, under_a_file):
    check = OutputDirsCheck()
    with pytest.raises(InputError, match=r"^trainer.default_root_dir: cannot write to '.*file.txt/sub': "
                                         r"'.*file.txt' is a file, not a directory$"):
        check.setup(trainer(default_root_dir=under_a_file), None, "fit")
    with pytest.raises(InputError, match=r"^trainer.logger \(CSVLogger\) save_dir: cannot write to '.*file.txt': "
                                         r"it is a file, not a directory$"):
        check.setup(trainer(default_root_dir=tmp_path, logger=CSVLogger(str(tmp_path / "file.txt"))), None, "fit")
    with pytest.raises(InputError, match=r"^trainer.callbacks \(ModelCheckpoint\) dirpath: cannot write to "):
        check.setup(trainer(default_root_dir=tmp_path, callbacks=[ModelCheckpoint(dirpath=under_a_file)]), None, "fit")
    check.setup(trainer(default_root_dir=under_a_file), None, "predict")  # only fit writes there
    fine = trainer(default_root_dir=tmp_path / "new" / "dir", callbacks=[ModelCheckpoint(tmp_path / "ckpt")])
    check.setup(fine, None, "fit")
    assert not (tmp_path / "new").exists()  # (checked, not created: training creates what it writes to)


def test_unwritable_checkpoint_dir_stops_fit_before_training(tiny_bert, tmp_path, under_a_file):
    module = FineTuneModule(tiny_bert, TextClassification())
    data = DataModule(train_file=write_jsonl(tmp_path / "t.jsonl", make_rows(12)), batch_size=4)
    run = trainer(default_root_dir=tmp_path, max_epochs=1, use_distributed_sampler=False,
                  callbacks=[ModelCheckpoint(dirpath=under_a_file), OutputDirsCheck()])
    connect(module, data, "fit")
    with pytest.raises(InputError, match=r"trainer.callbacks \(ModelCheckpoint\) dirpath: cannot write to"):
        run.fit(module, data)
    assert run.global_step == 0


def test_unwritable_logger_dir_is_caught_before_fit(under_a_file):
    """Lightning makes its loggers' directories before callbacks' `setup`: `check_output_dirs` runs before `fit`."""
    with pytest.raises(InputError, match=r"^trainer.default_root_dir: cannot write to '.*sub': '.*file.txt' is a file, "
                                         r"not a directory$"):
        check_output_dirs(trainer(default_root_dir=under_a_file))


# --- 11. property-based: valid rows read exactly, anything else is an InputError naming the file -------

TEXT = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=30),  # any unicode (not lone surrogates)
    st.text(st.sampled_from('ab "\',\\\n\r\t\ufeff\u2028\x85{}[]:#'), max_size=12),  # the characters that break parsers
    st.sampled_from(["NA", "null", "None", "nan", "007", "12", "1e5", "True", "-", ""]),
)
LABEL = st.sampled_from(["pos", "neg"])


def valid_text(text) -> bool:
    return isinstance(text, str) and bool(text.strip())


def not_a_row(line: str) -> bool:
    try:
        return not isinstance(json.loads(line), dict)
    except ValueError:
        return True


JSONL_LINE = st.one_of(
    st.builds(lambda t, label: {"text": t, "label": label}, TEXT, LABEL),  # valid when the text is not blank
    st.builds(lambda t, label: {"text": t, "label": label},
              st.one_of(st.integers(), st.none(), st.booleans(), st.lists(st.text(max_size=3), max_size=2)), LABEL),
    st.builds(lambda label: {"label": label}, LABEL),  # missing key
    st.sampled_from(["", "   ", "\t"]),  # blank line: skipped
    st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\r\n"), min_size=1, max_size=20)
    .filter(lambda s: s.strip() and not_a_row(s)),  # junk
)

BOUNDED = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(content: bytes, name: str):
    """The rows read, or the InputError (whose message must name the file); any other exception fails."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(content)
        try:
            return read_rows(path)
        except InputError as err:
            assert str(path) in str(err), str(err)
            return err


@BOUNDED
@given(lines=st.lists(JSONL_LINE, max_size=8), bom=st.booleans(), ascii_only=st.booleans(),
       endings=st.lists(st.sampled_from(["\n", "\r\n"]), min_size=8, max_size=8))
def test_jsonl_reads_exactly_or_names_the_file(lines, bom, ascii_only, endings):
    text = "".join((line if isinstance(line, str) else json.dumps(line, ensure_ascii=ascii_only)) + end
                   for line, end in zip(lines, endings))
    result = outcome((("\ufeff" if bom else "") + text).encode("utf-8"), "data.jsonl")
    rows = [line for line in lines if not isinstance(line, str) or line.strip()]
    if rows and all(isinstance(row, dict) and valid_text(row.get("text")) for row in rows):
        assert result == rows
    else:
        assert isinstance(result, InputError)


CSV_ROW = st.one_of(
    st.builds(lambda t, label: [t, label], TEXT, LABEL),  # valid when the text is not blank
    st.lists(st.text("abc", min_size=1, max_size=3), min_size=3, max_size=4),  # too many fields
)


@BOUNDED
@given(rows=st.lists(CSV_ROW, min_size=1, max_size=8), bom=st.booleans(), quote_all=st.booleans(),
       newline=st.sampled_from(["\n", "\r\n"]))
def test_csv_reads_exactly_or_names_the_file(rows, bom, quote_all, newline):
    out = io.StringIO()
    # (csv.writer leaves a bare \r unquoted when lines end in \n: that is a line break to CSV readers)
    quoting = csv.QUOTE_ALL if quote_all or any("\r" in field for row in rows for field in row) else csv.QUOTE_MINIMAL
    csv.writer(out, lineterminator=newline, quoting=quoting).writerows([["text", "label"], *rows])
    result = outcome((("\ufeff" if bom else "") + out.getvalue()).encode("utf-8"), "data.csv")
    if all(len(row) == 2 and valid_text(row[0]) for row in rows):
        assert result == [{"text": text, "label": label} for text, label in rows]
    else:
        assert isinstance(result, InputError)


def test_unknown_config_option_names_the_key_and_lists_the_valid_ones(tmp_path, capsys):
    from finetune.cli import main

    config = Path(__file__).parents[1] / "configs" / "classification.yaml"
    for override, expected in (
        ("--model.task.init_args.text_colum=x", "model.task: unknown option 'text_colum'. Did you mean "
                                                "'text_column'? Valid: text_column, text_pair_column, label_column"),
        ("--model.lora.rank=4", "model.lora: unknown option 'rank'. Valid: r, alpha, dropout, target_modules"),
    ):
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(config), override])
        assert expected in capsys.readouterr().err


@pytest.mark.parametrize("override, explanation", [
    (["--model.lora.rr", "4"], "model.lora: unknown option 'rr'. Did you mean 'r'? Valid: r, alpha, dropout, "),
    (["--model.task.init_args.max_lenght", "64"],
     "model.task: unknown option 'max_lenght'. Did you mean 'max_length'?"),
    (["--model.lora.r", "eight"], "model.lora: option 'r' expects int, got 'eight'"),
    (["--model.task.class_path", "tasks.nope.Nope"],
     "model.task: cannot use class_path 'tasks.nope.Nope': module 'tasks' has no attribute 'nope'"),
    (["--trainer.max_epochs", "x"], "trainer.max_epochs: expects int or None, got 'x'"),
])
def test_a_bad_option_under_a_union_is_explained_in_the_last_line(capsys, override, explanation):
    """Not ~70 lines of usage and jsonargparse's dump of the union's types ending in `NestedArg(key=..., val=...)`."""
    from finetune.cli import main

    config = Path(__file__).parents[1] / "configs" / "classification.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), *override])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: {explanation}"), lines
    assert len(lines) <= 3 and lines[0].startswith("usage: finetune") and lines[0].endswith(" ...")
    assert not any("NestedArg" in line or "Subtypes" in line for line in lines)
