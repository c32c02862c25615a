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
            try:
                return datasets.load_dataset(FORMATS[Path(path).suffix.lower()], data_files=path, split="train")
            except Exception as err:  # datasets wraps parser errors in several types
                if "corresponds to no data" in str(err):
                    raise InputError(f"{self.source(split)} is empty") from err
                cause = err.__cause__ or err
                raise InputError(f"{self.source(split)}: could not be read: {cause}") from err
        if self.dataset is None:
            return None
        try:
            return datasets.load_dataset(self.dataset, self.dataset_config, split=self.dataset_splits[split])
        except ValueError as err:
            if split != "train" and "Unknown split" in str(err):
                return None
            raise InputError(f"{self.source(split)}: {err}") from err

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

    def _loader(self, split: str, train: bool) -> DataLoader:
        features = self.features[split]
        task, tokenizer = self.trainer.lightning_module.task, self.trainer.lightning_module.tokenizer
        lengths = features["length"]
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
