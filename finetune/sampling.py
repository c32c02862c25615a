"""Batches: examples of similar length together, the same number of batches in every process, and
a training order that a resumed run continues exactly."""

from __future__ import annotations

import bisect
import random
from typing import Callable, Iterator, Optional

from torch.utils.data import Sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of examples of similar length, this process's share of them.

    Training (`shuffle=True`): a seeded permutation per epoch is cut into chunks of 50 batches,
    each chunk sorted by length and cut into batches, and the batches shuffled: little padding,
    still random. Without `group`, plain shuffled batches. Evaluation (`shuffle=False`): sorted
    by length, longest first, so an out-of-memory error shows on the first batch.

    With `row_tokens` (a task that packs examples into rows of that many tokens) a batch is `batch_size`
    rows: the examples of a chunk (or of the split, for evaluation), longest first, go to the row they fill
    best, and a batch lists its rows' examples row after row, so that the task's collate packs them so.

    With several processes every one builds the same batch list (same seed) and takes every
    `world_size`-th batch, the same number of batches in every process. Training repeats batches
    to get there; evaluation splits batches, so each example is evaluated exactly once.
    """

    def __init__(
        self, lengths: list[int], batch_size: int, seed: int, shuffle: bool, group: bool,
        rank: int = 0, world_size: int = 1, row_tokens: Optional[int] = None,
    ) -> None:
        self.lengths = lengths
        self.row_tokens = row_tokens
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
        """Consecutive batches of `indices` (longest first when grouped): of examples, or of packed rows."""
        units = [[i] for i in indices] if self.row_tokens is None else best_fit(indices, self.lengths, self.row_tokens)
        return [sum(units[i : i + self.batch_size], []) for i in range(0, len(units), self.batch_size)]

    def _all_batches(self) -> list[list[int]]:
        if not self.shuffle:
            return self._batches(sorted(range(len(self.lengths)), key=lambda i: -self.lengths[i]))
        rng = random.Random(self.seed + self.epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if not self.group and self.row_tokens is None:  # (packing sorts: rows fill best longest first)
            return self._batches(order)
        chunk = 50 * self.batch_size  # examples: 50 batches of them, or about 50 batches of packed rows
        if self.row_tokens is not None:
            chunk = max(chunk, chunk * self.row_tokens * len(self.lengths) // max(sum(self.lengths), 1))
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


def best_fit(indices: list[int], lengths: list[int], capacity: int) -> list[list[int]]:
    """The examples `indices` (longest first) in rows of at most `capacity` tokens: each to the row whose
    free space it fills best, else to a new row (an example longer than a row gets one of its own)."""
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for index in indices:
        length = min(lengths[index], capacity)
        at = bisect.bisect_left(free, (length, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        bisect.insort(free, (space - length, row))
    return rows


class LongestFirst(Sampler[int]):
    """The prediction order: this process's share of the examples, longest first. A plain sampler (the
    DataLoader batches it), so Lightning can see that prediction keeps every example (`drop_last=False`)."""

    def __init__(self, lengths: list[int], rank: int = 0, world_size: int = 1) -> None:
        self.order = sorted(range(len(lengths)), key=lambda i: -lengths[i])[rank::world_size]

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        yield from self.order


class ResumableBatches(Sampler[list[int]]):
    """The training loader's batches: the epoch's shuffle and, after a resume, where in the epoch to
    continue. `position()` gives (epoch, batches to skip) when the epoch's first batch is drawn, since
    Lightning may create the loader's iterator before it restores a checkpoint."""

    def __init__(self, sampler: LengthGroupedBatchSampler, position: Callable[[], tuple[int, int]]) -> None:
        self.sampler = sampler
        self.position = position

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = self.position()
        self.sampler.set_epoch(epoch)
        yield from list(self.sampler)[skip:]
