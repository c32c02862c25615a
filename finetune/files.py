"""Reading a split from a local file or a Hugging Face dataset, with one message naming the file and
line when it cannot be read.

`datasets` reads the files. When it fails, the file is scanned here with the standard library's own
parsers (json, csv) to say where and why; no library's error text is parsed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import datasets

from finetune.errors import InputError, with_article

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
#: The deepest nesting of lists and objects in a value that a JSON file's column can hold: the Arrow schema of a
#: file nested deeper fails to import ("Recursion level in ArrowSchema struct exceeded", pyarrow 2x, datasets 4).
MAX_NESTING = 62
#: The tokens of JSON text that nesting is counted from: strings (whose brackets do not count) and brackets.
JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:]')


def check_data_file(setting: str, path: str) -> None:
    """Fail in seconds, before any model loads, on a data file that is missing or of an unknown type."""
    file = Path(path)
    if file.is_dir():
        raise InputError(f"{setting}: {path!r} is a directory; expected a file ({', '.join(FORMATS)})")
    if file.suffix.lower() not in FORMATS:
        raise InputError(f"{setting}: {path!r} has an unsupported extension; expected one of {', '.join(FORMATS)}")
    if not file.is_file():
        raise InputError(f"{setting}: file {path!r} does not exist")


def read_data_file(path: str, where: str, text_columns: list[str]) -> datasets.Dataset:
    """A JSONL/JSON/CSV/Parquet file as a dataset. CSV cells of `text_columns` are read as written
    ("NA", "007" are texts); only empty cells are missing."""
    fmt = FORMATS[Path(path).suffix.lower()]
    if fmt in ("json", "csv") and not Path(path).read_bytes().strip():
        raise InputError(f"{where} is empty")
    options: dict[str, Any] = {}
    if fmt == "csv":
        options = {"keep_default_na": False, "na_values": [""], "converters": dict.fromkeys(text_columns, str)}
    try:
        with no_progress_bars():  # "Generating train split" for every split of a local file says nothing
            rows = datasets.load_dataset(fmt, data_files=path, split="train", **options)
        if fmt == "json":  # pyarrow reads bytes that are not UTF-8 into strings that fail later
            rows.data.table.validate(full=True)
    except Exception as err:  # datasets wraps parser errors in several types: find the cause ourselves
        if fmt == "csv" and len(Path(path).read_bytes().strip().splitlines()) == 1:
            raise InputError(f"{where} is empty (a header, no rows)") from err
        problem = file_problem(path, fmt) or str(err.__cause__ or err).strip() or type(err).__name__
        raise InputError(f"{where}: could not be read: {problem}") from err
    problem = json_layout_problem(path) if fmt == "json" else None
    if fmt == "csv" and any(column.startswith("__index_level_") for column in rows.column_names):
        problem = "the first row has more fields than the header (quote fields that contain the delimiter)"
    if problem:
        raise InputError(f"{where}: could not be read: {problem}")
    if len(rows) == 0:
        raise InputError(f"{where} is empty")
    return rows


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """datasets' progress bars off for the block (back on after it if they were on)."""
    were_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if were_on:
            datasets.enable_progress_bars()


def read_hub_dataset(name: str, config: Optional[str], split: str, where: str, required: bool) -> Optional[Any]:
    """A split of a Hugging Face dataset (a hub name or a local folder); None when an optional split is missing."""
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        raise InputError(f"data.dataset: {name!r} does not exist (it names a local directory)")
    try:
        builder = datasets.load_dataset_builder(name, config)
    except Exception as err:  # not found, unreachable hub (offline), scripts no longer supported, ...
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        with_config = f" with data.dataset_config {config!r}" if config else ""
        raise InputError(f"data.dataset: could not load {name!r}{with_config}: {detail}") from err
    splits = builder.info.splits or builder.config.data_files or {}  # (folders of files: known from the files)
    if splits and split not in splits:
        if not required:
            return None
        raise InputError(f"{where}: the dataset has no split {split!r}; its splits are {', '.join(splits)} "
                         "(map them with data.dataset_splits)")
    return datasets.load_dataset(name, config, split=split)


def value_kind(value: Any) -> Optional[str]:
    """A value's JSON type, with its article (None for null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), with_article(type(value).__name__))


def mixed_type_problem(column: str, values: Iterable[tuple[str, Any]]) -> Optional[str]:
    """The first value of a column whose type differs from the column's first value; `values` are
    (where, value) pairs, where names the row or line."""
    first: Optional[tuple[str, Any]] = None
    for where, value in values:
        if value is None:
            continue
        if first is None:
            first = (where, value)
        elif value_kind(value) != value_kind(first[1]):
            return (f"{where}: column {column!r} holds {value_kind(value)} ({value!r:.60}) but {first[0]} holds "
                    f"{value_kind(first[1])} ({first[1]!r:.60}); all values of a column must have one type")
    return None


def file_problem(path: str, fmt: str) -> Optional[str]:
    """Why a JSON or CSV file does not parse, with its line; None when these parsers find nothing."""
    if fmt not in ("json", "csv"):
        return None
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as bad:
        line = data[: bad.start].count(b"\n") + 1
        return f"line {line}: not UTF-8 text (byte {data[bad.start]:#04x}); save the file as UTF-8"
    return json_problem(text) if fmt == "json" else csv_problem(text)


def json_problem(text: str) -> Optional[str]:
    """The first problem of a JSON Lines file or JSON list of rows: invalid JSON (with its line and
    column), a row that is not an object, a column whose values change type. Blank lines are skipped,
    as `datasets` does."""
    text = text.removeprefix("\ufeff")
    rows: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):  # one JSON list of rows
        deep = nesting_problem(text, row_depth=2)
        if deep:
            return deep
        try:
            document = json.loads(text, object_pairs_hook=json_object)
        except json.JSONDecodeError as err:
            return f"line {err.lineno}: invalid JSON: {err.msg} (column {err.colno})"
        rows = [(f"item {i} of the list", row) for i, row in enumerate(document, start=1)]
    else:
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            deep = nesting_problem(line, row_depth=1, line=number)
            if deep:
                return deep
            try:
                rows.append((f"line {number}", json.loads(line, object_pairs_hook=json_object)))
            except json.JSONDecodeError as err:
                if not rows and _is_one_document(text):
                    return ("the file holds one JSON object over several lines; expected JSON Lines (one object per "
                            "line) or a list of objects [{...}, ...]")
                return f"line {number}: invalid JSON: {err.msg} (column {err.colno})"
    for where, row in rows:
        if not isinstance(row, dict):
            return f"{where} is {value_kind(row) or 'null'} ({row!r:.60}), not an object {{...}} (one object per row)"
        twice = key_given_twice(row)
        if twice is not None:
            return f"{where}: key {twice!r} appears twice in one object; keep one (JSON keys must be unique)"
    for column in dict.fromkeys(key for _, row in rows for key in row):
        problem = mixed_type_problem(column, ((where, row.get(column)) for where, row in rows))
        if problem:
            return problem
    return None


class KeyGivenTwice(dict):
    """A JSON object that gives `key` more than once (`json` keeps the last value; `datasets` refuses the file)."""

    key: str


def json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json`'s object_pairs_hook: the object as a dict, a KeyGivenTwice when a key is given more than once."""
    row = dict(pairs)
    if len(row) == len(pairs):
        return row
    marked = KeyGivenTwice(row)
    marked.key = next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
    return marked


def key_given_twice(value: Any) -> Optional[str]:
    """The first key given twice in an object in `value` (at any depth), or None."""
    if isinstance(value, KeyGivenTwice):
        return value.key
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((key for child in children if (key := key_given_twice(child)) is not None), None)


def _is_one_document(text: str) -> bool:
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def nesting_problem(text: str, row_depth: int, line: Optional[int] = None) -> Optional[str]:
    """The first value of JSON `text` nested deeper than MAX_NESTING (which `datasets` cannot read, and Python's
    parser may not either), with its row and column. The rows of `text` are the objects at `row_depth`: 1 for a
    line of JSON Lines (`line`: its number), 2 for a JSON list of rows. Counted from the text's brackets, before
    it is parsed; a text with few brackets is not scanned."""
    if text.count("[") + text.count("{") <= MAX_NESTING + row_depth:
        return None
    depth, row, column, key = 0, 0, "", ""
    for token in JSON_TOKENS.finditer(text):
        kind = token.group()[0]
        if kind in "[{":
            depth += 1
            row += depth == row_depth
            if depth - row_depth > MAX_NESTING:
                where = f"line {line}" if line is not None else f"item {row} of the list"
                what = f"column {column!r}" if column else "the row"
                return (f"{where}: {what} nests lists or objects more than {MAX_NESTING} levels deep, which cannot be "
                        f"read (the limit is {MAX_NESTING}); flatten it or drop the column")
        elif kind in "]}":
            depth -= 1
        elif kind == ":" and depth == row_depth:
            column = key
        elif kind == '"' and depth == row_depth:
            key = token.group()[1:-1]  # (as written: a key's escapes are not decoded)
    return None


def csv_problem(text: str) -> Optional[str]:
    """A row with more fields than the header, or a quoted field never closed, with its line."""
    reader = csv.reader(io.StringIO(text), strict=True)
    try:
        header = next(reader, [])
        for row in reader:
            if len(row) > len(header):
                return (f"line {reader.line_num}: {len(row)} fields where the header has {len(header)} (quote fields "
                        "that contain the delimiter)")
    except csv.Error:
        start = text.count("\n", 0, _unclosed_quote(text)) + 1
        return f"line {start}: a quoted field is never closed (unbalanced \")"
    return None


def _unclosed_quote(text: str) -> int:
    """Offset of the quote that opens the field left open at the end of the file."""
    opened, inside = 0, False
    for i, char in enumerate(text):
        if char == '"':
            if not inside:
                opened = i
            inside = not inside
    return opened


def json_layout_problem(path: str) -> Optional[str]:
    """A JSON file `datasets` reads without complaint but not as rows: a list of strings or numbers
    (read as a 'text' column), or one object over several lines (read as one row). Reads the first
    line or two only."""
    with open(path, "rb") as f:
        lines = (line for line in f if line.strip())
        first = next(lines, b"").removeprefix(b"\xef\xbb\xbf").strip()
        if first.startswith(b"["):
            rest = first[1:].lstrip() or next(lines, b"").lstrip()
            if rest[:1] not in (b"{", b"]", b""):
                kind = {b'"': "strings", b"[": "lists", b"t": "booleans", b"f": "booleans", b"n": "nulls"}.get(
                    rest[:1], "numbers")
                return f"the file is a JSON list of {kind}; expected a list of objects [{{...}}, ...], one per row"
            return None
    if first.startswith(b"{"):
        try:
            json.loads(first)
        except ValueError:
            return ("the file holds one JSON object over several lines; expected JSON Lines (one object per line) "
                    "or a list of objects [{...}, ...]")
    return None
