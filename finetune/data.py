"""The data module: each split read once, checked against the task's declared columns, tokenized once
(cached by `datasets.map`) and batched by length.

It is task-agnostic: `connect` gives it the task (what it reads, how examples become features) and the
backbone's tokenizer; it gives back the task with what it learned from the training rows.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import datasets
import pyarrow.compute as pc
from lightning.pytorch import LightningDataModule
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader

from finetune.columns import check_columns, text_columns
from finetune.errors import InputError
from finetune.files import check_data_file, read_data_file, read_hub_dataset
from finetune.pipeline import STAGE_SPLITS, collate, make_features
from finetune.sampling import LengthGroupedBatchSampler, LongestFirst, ResumableBatches
from finetune.task import Task, task_option

FILE_OPTIONS = {"train": "train_file", "val": "val_file", "test": "test_file", "predict": "predict_file"}
HF_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test", "predict": "test"}


class DataModule(LightningDataModule):
    """Train/validation/test/predict splits for the module's task.

    Args:
        train_file, val_file, test_file, predict_file: local JSONL, JSON, CSV or Parquet files.
        dataset: a Hugging Face dataset name (or a local dataset dir), used for the splits that have no
            file; `dataset_config` picks its configuration, `dataset_splits` maps train/val/test/predict
            to its split names.
        batch_size: examples per training batch (rows, for a task that packs examples into rows); `eval_batch_size`
            for the other stages (default: twice `batch_size`, since no gradients are kept).
        group_by_length: batch examples of similar length together (less padding), shuffled.
        num_workers: data-loading processes per device.
        preprocessing_workers: processes for tokenization (`datasets.map(num_proc=...)`).
        seed: seed of the training order.

    The data module shards batches across processes itself (exactly once per example in evaluation),
    so the Trainer must not add a distributed sampler: `finetune` sets
    `trainer.use_distributed_sampler: false`; set it too when you build your own Trainer.
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
        for option, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or 1)):
            if value < 1:
                raise InputError(f"data.{option}: must be at least 1, got {value}")
        if num_workers < 0:
            raise InputError(f"data.num_workers: must be 0 or more, got {num_workers}")
        self.files = {"train": train_file, "val": val_file, "test": test_file, "predict": predict_file}
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
        #: What each split's metrics and prediction merging need (`Task.split_context`).
        self.contexts: dict[str, Any] = {}
        self.task: Optional[Task] = None  # (and the tokenizer: given by `connect`)
        self.tokenizer: Any = None
        self.resume_position: Optional[dict[str, int]] = None

    def where(self, split: str) -> str:
        """Where a split comes from, as messages name it."""
        if self.files[split] is not None:
            return f"data.{FILE_OPTIONS[split]} ({self.files[split]})"
        return f"data.dataset ({self.dataset}, split {self.dataset_splits[split]!r})"

    def has(self, split: str) -> bool:
        """Whether the config gives the split (a file, or a dataset, which may lack it)."""
        return self.files[split] is not None or self.dataset is not None

    def read(self, split: str, task: Task, required: bool = True) -> Optional[datasets.Dataset]:
        """The raw split, or None when the config gives none and it is not `required`."""
        if self.files[split] is not None:
            path = self.files[split]
            check_data_file(f"data.{FILE_OPTIONS[split]}", path)
            return task.read_file(path) or read_data_file(path, self.where(split), text_columns(task))
        if self.dataset is not None:
            rows = read_hub_dataset(self.dataset, self.dataset_config, self.dataset_splits[split], self.where(split),
                                    required)
            if rows is not None and len(rows) == 0:
                raise InputError(f"{self.where(split)} is empty")
            return rows
        if required:
            stage = {"train": "fit", "val": "validate"}.get(split, split)
            raise InputError(f"data.{FILE_OPTIONS[split]} is required for `{stage}` (or data.dataset with that split)")
        return None

    def connect(self, task: Task, tokenizer: Any, stage: str) -> Task:
        """Reads the splits of `stage` for `task` (settled from the backbone) and `tokenizer`: the core checks the
        declared columns, the training rows teach the task what it learns (`Task.learn`), then each split's rows
        are checked, its context kept (`contexts`) and its features made. Returns the task with what it learned,
        which the module must train and evaluate (`finetune.pipeline.connect` hands it over)."""
        self.tokenizer = tokenizer
        for split in STAGE_SPLITS[stage]:
            rows = self.read(split, task, required=not (stage == "fit" and split == "val"))  # validation: optional
            if rows is None:
                continue
            where = self.where(split)
            check_columns(task, rows, split, where)
            if split == "train":
                task = task.with_options(**task.learn(rows))
            task.check_rows(split, rows, where)
            self.contexts[split] = task.split_context(split, rows)
            with_targets = split != "predict"
            self.features[split] = rows.map(
                make_features, batched=True, with_indices=True, remove_columns=rows.column_names,
                fn_kwargs={"task": task, "tokenizer": tokenizer, "with_targets": with_targets},
                num_proc=self.preprocessing_workers, desc=f"Tokenizing {split}",
            )
            warn_truncated(task, tokenizer, rows, self.features[split], split, where, with_targets)
        self.task = task
        return task

    # --- Lightning hooks -----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if self.task is None:
            raise RuntimeError("DataModule: not connected to a model; call finetune.pipeline.connect(model, data, "
                               "stage) before trainer.fit/validate/test/predict (the `finetune` command does)")

    def loader(self, split: str, train: bool) -> DataLoader:
        features = self.features[split]
        lengths = features.with_format("arrow")["length"].to_pylist()  # a list: the sampler indexes it often
        batch_size = self.batch_size if train else self.eval_batch_size
        rank, world_size = self.trainer.global_rank, self.trainer.world_size
        # Evaluation order does not matter for metrics; predictions are put back in input order by index.
        # Prediction has no collectives per step, so the processes may run different numbers of batches; except
        # with sharded weights (FSDP, FSDP2), where every forward all-gathers them: as many batches in every process.
        sharded = isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy))
        if split == "predict" and not sharded:
            batching: dict[str, Any] = {"sampler": LongestFirst(lengths, rank, world_size), "batch_size": batch_size}
        else:
            sampler = LengthGroupedBatchSampler(lengths, batch_size, self.seed, shuffle=train,
                                                group=self.group_by_length or not train, rank=rank,
                                                world_size=world_size, row_tokens=self.task.packed_row_length())
            batching = {"batch_sampler": sampler}
            if train:
                batching = {"batch_sampler": ResumableBatches(sampler, self.epoch_position),
                            "position": self.training_position, "resume_at": self.resume_at}
        return (TrainingLoader if train else DataLoader)(
            features,
            **batching,
            collate_fn=functools.partial(collate, task=self.task, tokenizer=self.tokenizer,
                                         with_targets=split != "predict"),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def epoch_position(self) -> tuple[int, int]:
        """(epoch, batches of it already trained): after a resume, the checkpoint's position, once."""
        epoch, skip = self.trainer.current_epoch, 0
        resume, self.resume_position = self.resume_position, None
        if resume and resume["epoch"] == epoch:  # (a checkpoint from an epoch's end starts the next one)
            skip = resume["batches_done"]
        return epoch, skip

    def train_dataloader(self) -> DataLoader:
        return self.loader("train", train=True)

    def training_position(self) -> dict[str, int]:
        """Where training is: the epoch, and how many of its batches are trained (checkpoints are saved after a
        batch is processed, or at the epoch's end)."""
        return {"epoch": self.trainer.current_epoch,
                "batches_done": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed}

    def resume_at(self, position: dict[str, int]) -> None:
        self.resume_position = position or None

    # Checkpoints store where training is in the epoch, so that a resumed run continues with the next batch of the
    # same order. (Lightning restores a data module's state before it builds the loaders; the training loader
    # declares the same state, so that Lightning knows it resumes.)
    def state_dict(self) -> dict[str, int]:
        return self.training_position() if self.trainer is not None and self.trainer.training else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at(state)

    def val_dataloader(self) -> Any:
        return self.loader("val", train=False) if "val" in self.features else []

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self.loader("predict", train=False)


class TrainingLoader(DataLoader):
    """The training loader, resumable: its state is where training is in the epoch (the data module's)."""

    def __init__(self, *args: Any, position: Callable[[], dict[str, int]],
                 resume_at: Callable[[dict[str, int]], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.position, self.resume_at = position, resume_at

    def state_dict(self) -> dict[str, int]:
        return self.position()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at(state)


class LongerByOne:
    """A tokenizer that truncates one token later than it is asked to: what it returns longer than the
    real tokenizer did was truncated."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(kwargs.get("max_length"), int):
            kwargs["max_length"] += 1
        return self.tokenizer(*args, **kwargs)


def warn_truncated(task: Task, tokenizer: Any, rows: datasets.Dataset, features: datasets.Dataset, split: str,
                   where: str, with_targets: bool) -> None:
    """Warn once per split when the task's length limits (`Task.length_limits`) cut examples short.
    Truncated sequences all have the longest length of the split; those examples are tokenized again
    one token longer to see which were cut. Tasks that cut long inputs into windows (more features
    than examples) lose nothing and are skipped."""
    keys = [key for key in task.length_limits if key in features.column_names]
    if not keys or len(features) != len(rows):
        return
    table = features.with_format("arrow")[:]
    lengths = {key: pc.list_value_length(table.column(key)).to_pylist() for key in keys}
    longest = {key: [i for i, n in enumerate(values) if n == top] for key, values in lengths.items()
               for top in [max(values)]}
    candidates = sorted({i for indices in longest.values() for i in indices})
    again = task.preprocess(rows.select(candidates)[:], LongerByOne(tokenizer), with_targets)
    position = {row: j for j, row in enumerate(candidates)}
    cut = {key: {i for i in indices if len(again[key][position[i]]) > lengths[key][i]}
           for key, indices in longest.items()}
    count = len(set().union(*cut.values()))
    if count:
        what = ", ".join(f"{len(cut[key])} by {task.length_limits[key]}" for key in keys if cut[key])
        limits = ", ".join(f"{task_option(task.length_limits[key])}={getattr(task, task.length_limits[key])}"
                           for key in keys if cut[key])
        rank_zero_warn(f"{where}: {count} of {len(rows)} {split} examples are longer than the task's limits and were "
                       f"truncated ({what}); raise {limits} to keep more of them")
