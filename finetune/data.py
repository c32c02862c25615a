"""Reading splits from files (or a Hugging Face dataset), tokenizing once, and batching.

The data module is task-agnostic: it asks the module's task which columns it needs and how to
turn examples into features, and the module's tokenizer how to tokenize (one source of truth for
the backbone).
"""

from __future__ import annotations

import difflib
import functools
import random
from pathlib import Path
from typing import Any, Iterator, Optional

import datasets
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler

from finetune.errors import InputError
from finetune.task import Task

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLITS = {"train": "train_file", "val": "val_file", "test": "test_file", "predict": "predict_file"}
HF_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test", "predict": "test"}
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class DataModule(LightningDataModule):
    """Train/validation/test/predict splits for the module's task.

    Args:
        train_file, val_file, test_file, predict_file: local JSONL, JSON, CSV or Parquet files.
        dataset: a Hugging Face dataset name (or a local dataset script/dir), used for the splits
            that have no file; `dataset_config` picks its configuration, `dataset_splits` maps
            train/val/test/predict to its split names.
        batch_size: examples per training batch; `eval_batch_size` for the other stages
            (default: twice `batch_size`, since no gradients are kept).
        group_by_length: batch examples of similar length together (less padding), shuffled.
        num_workers: data-loading processes per device.

    The data module shards batches across processes itself (exactly once per example in
    evaluation), so the Trainer must not add a distributed sampler: `finetune` sets
    `trainer.use_distributed_sampler: false`; set it too when you build your own Trainer.
        preprocessing_workers: processes for tokenization (`datasets.map(num_proc=...)`).
        seed: seed of the training order.
    """

    def __init__(
        self,
        train_file: Optional[str] = None,
        val_file: Optional[str] = None,
        test_file: Optional[str] = None,
        predict_file: Optional[str] = None,
        dataset: Optional[str] = None,
        dataset_config: Optional[str] = None,
        dataset_splits: Optional[dict[str, str]] = None,
        batch_size: int = 16,
        eval_batch_size: Optional[int] = None,
        group_by_length: bool = True,
        num_workers: int = 0,
        preprocessing_workers: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.files = {"train": train_file, "val": val_file, "test": test_file, "predict": predict_file}
        for split, path in self.files.items():
            if path is None:
                continue
            if Path(path).suffix.lower() not in FORMATS:
                raise InputError(
                    f"data.{SPLITS[split]}: {path!r} has an unsupported extension; expected one of {', '.join(FORMATS)}"
                )
            if not Path(path).is_file():
                raise InputError(f"data.{SPLITS[split]}: file {path!r} does not exist")
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.dataset_splits = {**HF_SPLIT_NAMES, **(dataset_splits or {})}
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.group_by_length = group_by_length
        self.num_workers = num_workers
        self.preprocessing_workers = preprocessing_workers
        self.seed = seed
        self.features: dict[str, datasets.Dataset] = {}
        self.resume_state: Optional[dict[str, int]] = None

    # --- reading -------------------------------------------------------------------------------
    def source(self, split: str) -> str:
        if self.files[split] is not None:
            return f"data.{SPLITS[split]} ({self.files[split]})"
        return f"data.dataset ({self.dataset}, split {self.dataset_splits[split]!r})"

    def read(self, split: str) -> Optional[datasets.Dataset]:
        """The raw split, or None when the config gives none."""
        path = self.files[split]
        if path is not None:
            own = self.trainer.lightning_module.task.read_file(path)
            if own is not None:
                return own
            fmt = FORMATS[Path(path).suffix.lower()]
            options: dict[str, Any] = {}
            if fmt == "csv":  # texts as written ("NA", "null", "007" are texts); only empty cells are missing
                options = {"keep_default_na": False, "na_values": [""],
                           "converters": dict.fromkeys(_text_columns(self.trainer.lightning_module.task), str)}
            try:
                raw = datasets.load_dataset(fmt, data_files=path, split="train", **options)
                if fmt == "json":  # pyarrow reads bytes that are not UTF-8 into strings that fail later
                    raw.data.table.validate(full=True)
            except Exception as err:  # datasets wraps parser errors in several types
                if "corresponds to no data" in str(err):
                    raise InputError(f"{self.source(split)} is empty") from err
                problem = _read_problem(path, fmt, err)
                if problem == "empty":
                    raise InputError(f"{self.source(split)} is empty") from err
                raise InputError(f"{self.source(split)}: could not be read: {problem}") from err
            problem = _json_layout_problem(path) if fmt == "json" else None
            if fmt == "csv" and any(column.startswith("__index_level_") for column in raw.column_names):
                problem = "the first row has more fields than the header (quote fields that contain the delimiter)"
            if problem:
                raise InputError(f"{self.source(split)}: could not be read: {problem}")
            return raw
        if self.dataset is None:
            return None
        try:
            return datasets.load_dataset(self.dataset, self.dataset_config, split=self.dataset_splits[split])
        except ValueError as err:
            if split != "train" and "Unknown split" in str(err):
                return None
            raise InputError(f"{self.source(split)}: {err}") from err
        except Exception as err:  # not found, unreachable hub (offline), scripts no longer supported, ...
            raise InputError(_dataset_problem(self.dataset, self.dataset_config, err)) from err

    def check_columns(self, task: Task, raw: datasets.Dataset, split: str) -> None:
        required = dict(task.input_columns())
        if split != "predict":
            required.update(task.target_columns())
        for key, column in required.items():
            if column not in raw.column_names:
                close = difflib.get_close_matches(column, raw.column_names, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise InputError(
                    f"{self.source(split)} has no column {column!r} (model.task.init_args.{key}); "
                    f"its columns are: {', '.join(raw.column_names)}.{hint}"
                )
        problem = _text_problem(task, raw) or _mixed_types_problem(raw, list(required.values()))
        if problem:
            raise InputError(f"{self.source(split)}, {problem}")

    # --- Lightning hooks -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        module = self.trainer.lightning_module
        task, tokenizer = module.task, module.tokenizer
        for split in STAGE_SPLITS[stage]:
            raw = self.read(split)
            if raw is None:
                if split in ("val",) and stage == "fit":
                    continue  # training without validation is allowed
                raise InputError(f"data.{SPLITS[split]} is required for `{stage}` (or data.dataset with that split)")
            if len(raw) == 0:
                raise InputError(f"{self.source(split)} is empty")
            self.check_columns(task, raw, split)
            task.prepare(split, raw, self.source(split))
            with_targets = split != "predict"
            self.features[split] = raw.map(
                _preprocess,
                batched=True,
                with_indices=True,
                remove_columns=raw.column_names,
                fn_kwargs={"task": task, "tokenizer": tokenizer, "with_targets": with_targets},
                num_proc=self.preprocessing_workers,
                desc=f"Tokenizing {split}",
            )
            _warn_truncated(task, tokenizer, raw, self.features[split], split, self.source(split), with_targets)

    def _loader(self, split: str, train: bool) -> DataLoader:
        features = self.features[split]
        task, tokenizer = self.trainer.lightning_module.task, self.trainer.lightning_module.tokenizer
        lengths = features.with_format("arrow")["length"].to_pylist()  # a list: the sampler indexes it often
        batch_size = self.batch_size if train else self.eval_batch_size
        # Evaluation order does not matter for metrics; predictions are put back in input order by index.
        group = self.group_by_length or not train
        sampler = LengthGroupedBatchSampler(lengths, batch_size, self.seed, shuffle=train, group=group,
                                            rank=self.trainer.global_rank, world_size=self.trainer.world_size)
        return DataLoader(
            features.remove_columns("length"),
            batch_sampler=TrainingBatches(sampler, self) if train else sampler,
            collate_fn=functools.partial(task.collate, tokenizer=tokenizer),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    # Checkpoints store where training is in the epoch, so a resumed run continues with the
    # next batch of the same order (Lightning calls these when saving and restoring).
    def state_dict(self) -> dict[str, int]:
        if self.trainer is None or not self.trainer.training:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches_done": progress.processed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_state = state or None

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> Any:
        return self._loader("val", train=False) if "val" in self.features else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", train=False)


def _preprocess(
    examples: dict[str, list], indices: list[int], task: Task, tokenizer: Any, with_targets: bool
) -> dict[str, list]:
    features = task.preprocess(examples, tokenizer, with_targets)
    # Each feature carries the index of its example: windows of one example share it.
    mapping = features.pop("overflow_to_sample_mapping", range(len(indices)))
    features["index"] = [indices[i] for i in mapping]
    features["length"] = [len(ids) for ids in features["input_ids"]]
    return features


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of examples of similar length, this process's share of them.

    Training (`shuffle=True`): a seeded permutation per epoch is cut into chunks of 50 batches,
    each chunk sorted by length and cut into batches, and the batches shuffled: little padding,
    still random. Without `group`, plain shuffled batches. Evaluation (`shuffle=False`): sorted
    by length, longest first, so an out-of-memory error shows on the first batch.

    With several processes every one builds the same batch list (same seed) and takes every
    `world_size`-th batch, the same number of batches in every process. Training repeats batches
    to get there; evaluation splits batches, so each example is evaluated exactly once.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, seed: int, shuffle: bool, group: bool,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning before each epoch
        self.epoch = epoch


    def __len__(self) -> int:
        return len(self._own_batches())

    def _batches(self, indices: list[int]) -> list[list[int]]:
        return [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]

    def _all_batches(self) -> list[list[int]]:
        if not self.shuffle:
            return self._batches(sorted(range(len(self.lengths)), key=lambda i: -self.lengths[i]))
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if not self.group:
            return self._batches(order)
        chunk = 50 * self.batch_size
        batches = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: -self.lengths[i])
            batches.extend(self._batches(part))
        rng.shuffle(batches)
        return batches

    def _own_batches(self) -> list[list[int]]:
        batches = self._all_batches()
        if self.shuffle:  # training: repeat batches so that every process has as many
            batches += batches[: -len(batches) % self.world_size]
        else:  # evaluation: split batches instead, so every example is seen once and every process
            # still runs as many steps (a collective in one process's step would otherwise hang)
            while len(batches) % self.world_size and max(map(len, batches)) > 1:
                largest = max(range(len(batches)), key=lambda i: len(batches[i]))
                batch = batches.pop(largest)
                batches[largest:largest] = [batch[: len(batch) // 2], batch[len(batch) // 2 :]]
        return batches[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._own_batches()


class TrainingBatches(Sampler[list[int]]):
    """The training loader's batches: the epoch's shuffle and, after a resume, where in the epoch
    to continue. Both are read when the epoch's first batch is drawn, since Lightning may create the
    loader's iterator before it restores a checkpoint."""

    def __init__(self, sampler: LengthGroupedBatchSampler, datamodule: "DataModule") -> None:
        self.sampler = sampler
        self.datamodule = datamodule

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = self.datamodule.trainer.current_epoch, 0
        resume, self.datamodule.resume_state = self.datamodule.resume_state, None
        if resume and resume["epoch"] == epoch:  # (a checkpoint from an epoch's end starts the next one)
            skip = resume["batches_done"]
        self.sampler.set_epoch(epoch)
        yield from list(self.sampler)[skip:]


# --- checks of the raw data: one message naming the file, the line or row and the column ------------

def _text_columns(task: Task) -> list[str]:
    """The task's input columns that hold text: all of them but ids (e.g. question answering's
    `id_column`, which may hold numbers). Columns of nested records are told apart by their values."""
    return [column for key, column in task.input_columns().items() if not key.endswith("id_column")]


def _kind(value: Any) -> Optional[str]:
    """A value's JSON type, with its article (None for null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "a list", dict: "an object"}.get(type(value), f"a {type(value).__name__}")


def _column_values(raw: datasets.Dataset, column: str) -> list:
    if isinstance(raw.features[column], (datasets.Value, datasets.Sequence, getattr(datasets, "List", ()))):
        return raw.select_columns([column]).with_format("arrow")[:].column(column).to_pylist()  # fast
    return list(raw[column])  # features that decode (e.g. mixed-type columns read as JSON)


def _text_problem(task: Task, raw: datasets.Dataset) -> Optional[str]:
    """The first row whose text is missing, empty, only whitespace or not a string (for a task that reads
    pre-split words: not a list of words)."""
    for column in _text_columns(task):
        if column not in raw.column_names or isinstance(raw.features[column], dict):
            continue  # nested records (e.g. translation pairs {lang: text}): the task reads and checks them
        values = _column_values(raw, column)
        if all(isinstance(value, dict) for value in values):
            continue
        for row, value in enumerate(values, start=1):
            if task.is_split_into_words and isinstance(value, list):
                bad = next((i for i, word in enumerate(value) if not isinstance(word, str) or not word.strip()), None)
                if value and bad is None:
                    continue
                what = "is an empty list of words" if not value else f"word {bad} is not a word: {value[bad]!r:.40}"
            elif isinstance(value, str) and not task.is_split_into_words:
                if value and not value.isspace():
                    continue
                what = "is empty" if not value else f"holds only whitespace ({value!r:.40})"
            elif value is None:
                what = "is missing or null"
            else:
                expected = "a list of words" if task.is_split_into_words else "text"
                what = f"must hold {expected}, got {_kind(value)}: {value!r:.60}"
            return f"row {row}: column {column!r} {what}"
    return None


def _mixed_types_problem(raw: datasets.Dataset, columns: list[str]) -> Optional[str]:
    """The first row of a column whose values are of different types (read from JSON as a mixed
    column; a label column of numbers and strings, say)."""
    for column in columns:
        if column not in raw.column_names or type(raw.features[column]).__name__ != "Json":
            continue
        first = None
        for row, value in enumerate(raw[column], start=1):
            if value is None:
                continue
            if first is None:
                first = (row, value)
            elif _kind(value) != _kind(first[1]):
                return (f"row {row}: column {column!r} holds {_kind(value)} ({value!r:.60}) but row {first[0]} holds "
                        f"{_kind(first[1])} ({first[1]!r:.60}); all values of a column must have one type")
    return None


def _dataset_problem(name: str, config: Optional[str], err: Exception) -> str:
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        return f"data.dataset: {name!r} does not exist (it names a local directory)"
    with_config = f" with data.dataset_config {config!r}" if config else ""
    return f"data.dataset: could not load {name!r}{with_config}: {detail}"


def _read_problem(path: str, fmt: str, err: Exception) -> str:
    """Why `datasets` could not read a file, in words and with the line where there is one ("empty":
    no rows). Only runs after reading failed, so it may read the whole file again."""
    import re

    causes: list[BaseException] = []
    cause: Optional[BaseException] = err
    while cause is not None and cause not in causes:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    message = " ".join(str(c) for c in causes)
    if fmt in ("json", "csv"):
        data = Path(path).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as bad:
            line = data[: bad.start].count(b"\n") + 1
            return f"line {line}: not UTF-8 text (byte {data[bad.start]:#04x}); save the file as UTF-8"
        if fmt == "json":
            problem = _json_problem(text, mixed_types="changed from" in message)
            if problem:
                return problem
            column = re.search(r"Column\(/?([^)]*)\) changed from (\w+) to (\w+)", message)
            if column:  # (older `datasets`: pyarrow could not infer one type for the column)
                return (f"column {column.group(1)!r} holds values of different types ({column.group(2)} and "
                        f"{column.group(3)}); all values of a column must have one type")
        elif not text.strip():
            return "empty"
        else:
            fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", message)
            if fields:
                expected, line, saw = fields.groups()
                return (f"line {line}: {saw} fields where the header has {expected} (quote fields that contain the "
                        f"delimiter)")
            quote = re.search(r"EOF inside string starting at row (\d+)", message)
            if quote:
                return f"line {int(quote.group(1)) + 1}: a quoted field is never closed (unbalanced \")"
    last = err.__cause__ or err
    return f"{str(last).strip() or type(last).__name__}"


def _json_problem(text: str, mixed_types: bool = False) -> Optional[str]:
    """The first problem of a JSON Lines file or JSON list of rows: invalid JSON (with its line and
    column), a row that is not an object, and with `mixed_types` a column whose values change type.
    Blank lines are skipped, as `datasets` does. "empty" when there is nothing but whitespace."""
    import json

    text = text.removeprefix("\ufeff")
    if not text.strip():
        return "empty"
    rows: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):  # one JSON list of rows
        try:
            document = json.loads(text)
        except json.JSONDecodeError as err:
            return f"line {err.lineno}: invalid JSON: {err.msg} (column {err.colno})"
        rows = [(f"item {i} of the list", row) for i, row in enumerate(document, start=1)]
    else:
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as err:
                if not rows:  # maybe one JSON document spread over several lines
                    try:
                        document = json.loads(text)
                    except json.JSONDecodeError:
                        pass
                    else:
                        return (f"the file holds one JSON {_kind(document)[2:].lstrip()} over several lines; "
                                "expected JSON Lines (one object per line) or a list of objects [{...}, ...]")
                return f"line {number}: invalid JSON: {err.msg} (column {err.colno})"
    first: dict[str, tuple[str, Any]] = {}
    for where, row in rows:
        if not isinstance(row, dict):
            return f"{where} is {_kind(row) or 'null'} ({row!r:.60}), not an object {{...}} (one object per row)"
        for key, value in row.items() if mixed_types else ():
            if value is None:
                continue
            seen = first.setdefault(key, (where, value))
            if _kind(value) != _kind(seen[1]):
                return (f"{where}: column {key!r} holds {_kind(value)} ({value!r:.60}) but {seen[0]} holds "
                        f"{_kind(seen[1])} ({seen[1]!r:.60}); all values of a column must have one type")
    return None


def _json_layout_problem(path: str) -> Optional[str]:
    """A JSON file `datasets` reads without complaint but not as rows: a list of strings or numbers
    (read as a 'text' column), or one object over several lines (read as one row). Reads the first
    line or two only."""
    import json

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


class _LongerByOne:
    """A tokenizer that truncates one token later than it is asked to: what it returns longer than the
    real tokenizer did was truncated."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(kwargs.get("max_length"), int):
            kwargs["max_length"] += 1
        return self._tokenizer(*args, **kwargs)


def _warn_truncated(
    task: Task, tokenizer: Any, raw: datasets.Dataset, features: datasets.Dataset, split: str, source: str,
    with_targets: bool,
) -> None:
    """Warn once per split when the task's maximum length cut examples short. Truncated sequences
    all have the longest length of the split; those examples are tokenized again one token longer
    to see which were cut. Tasks that cut long inputs into windows (more features than examples)
    lose nothing and are skipped."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from lightning.pytorch.utilities.rank_zero import rank_zero_warn

    if len(features) != len(raw) or len(raw) == 0:
        return
    table = features.with_format("arrow")[:]
    lengths = {key: pc.list_value_length(table.column(key)).to_pylist() for key in ("input_ids", "labels")
               if key in table.column_names and pa.types.is_list(table.column(key).type)
               and pa.types.is_integer(table.column(key).type.value_type)}  # token ids (not multi-hot labels)
    longest = {key: [i for i, n in enumerate(values) if n == top] for key, values in lengths.items()
               for top in [max(values)] if top}
    rows = sorted({i for indices in longest.values() for i in indices})
    if not rows:
        return
    try:  # a check only: it never stops a run
        again = task.preprocess(raw.select(rows)[:], _LongerByOne(tokenizer), with_targets)
        if any(len(again[key]) != len(rows) for key in longest):
            return
        position = {row: j for j, row in enumerate(rows)}
        cut = {key: {i for i in indices if len(again[key][position[i]]) > lengths[key][i]}
               for key, indices in longest.items()}
    except Exception:
        return
    count = len(set().union(*cut.values()))
    if count:
        what = ", ".join(f"{len(cut[key])} {'inputs' if key == 'input_ids' else 'targets'}" for key in cut if cut[key])
        settings = ", ".join(f"model.task.init_args.{k}={v}" for k, v in vars(task).items()
                             if k.startswith("max_") and k.endswith("length"))
        rank_zero_warn(f"{source}: {count} of {len(raw)} {split} examples are longer than the task's maximum length "
                       f"and were truncated ({what}); raise {settings or 'the maximum length'} to keep more of them")
