"""The grain dataset: random-access sources -> this process's batches.

    each source -> this process's share -> [shuffle each epoch -> repeat]
      -> decode + crop (`random_map`, grain worker threads / processes)
      -> [mix] -> skip bad samples, counted by reason -> batch + tokenize -> prefetch

Every step is a function of (seed, process index, position), so grain's iterator
state is a few integers and a resumed pipeline yields exactly the samples an
uninterrupted one would. A finite source is split between processes (whole shards
where there are enough, otherwise every `process_count`-th sample) and shuffled; an
endless one (the built-in shapes) is read in global order: each process takes its
rows of every global batch, with crops drawn from the global position, so one endless
source alone gives the same global batches on any number of processes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import flags
from grain.experimental import ThreadPrefetchIterDataset, index_shuffle
from grain.multiprocessing import SharedMemoryArray

from jaxclip.data.sources import BAD_REASONS
from jaxclip.data.tokenizer import TokenizerSpec
from jaxclip.data.transforms import ImageTextTransform

__all__ = ["build_dataset", "skipped_by_reason"]


def skipped_by_reason(counts: np.ndarray) -> dict[str, int]:
    """Counts indexed like BAD_REASONS -> {reason: count} for the non-zero ones."""
    return {reason: int(n) for reason, n in zip(BAD_REASONS, counts) if n}


class SkipAndBatch(grain.IterDataset):
    """Drops bad samples (counting them by reason), batches and tokenizes the rest.

    It holds nothing between batches, so its state is its parent's: the index of the
    next sample to read. Each batch carries the counts of the samples skipped while
    filling it, which is how the counts reach the main process from worker processes.
    After `max_bad_in_a_row` consecutive bad samples the data is taken to be unusable
    (a RuntimeError with the counts) rather than skipped forever.
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        batch_size: int,
        tokenizer: TokenizerSpec,
        context_length: int,
        max_bad_in_a_row: int,
    ):
        super().__init__(parent)
        self._options = (batch_size, tokenizer, context_length, max_bad_in_a_row)
        self._shared_memory = False

    def enable_shared_memory_output(self) -> None:
        """Called by grain in worker processes: images go out in shared memory
        instead of being pickled through a pipe."""
        self._shared_memory = True

    def __iter__(self) -> _SkipAndBatchIterator:
        return _SkipAndBatchIterator(
            self._parent.__iter__(), *self._options, self._shared_memory
        )

    def __str__(self) -> str:
        return f"SkipAndBatch(batch_size={self._options[0]})"


class _SkipAndBatchIterator(grain.DatasetIterator):
    def __init__(
        self,
        parent: grain.DatasetIterator,
        batch_size: int,
        tokenizer: TokenizerSpec,
        context_length: int,
        max_bad_in_a_row: int,
        shared_memory: bool,
    ):
        super().__init__(parent)
        self._batch_size = batch_size
        self._tokenizer = tokenizer
        self._context_length = context_length
        self._max_bad_in_a_row = max_bad_in_a_row
        self._shared_memory = shared_memory

    def __next__(self) -> dict[str, Any]:
        images, captions, keys = [], [], []
        skipped = np.zeros(len(BAD_REASONS), np.int64)
        bad_in_a_row = 0
        while len(images) < self._batch_size:
            sample = next(self._parent)
            if "error" in sample:
                skipped[BAD_REASONS.index(sample["error"])] += 1
                bad_in_a_row += 1
                if bad_in_a_row >= self._max_bad_in_a_row:
                    raise RuntimeError(
                        f"no usable sample in the last {bad_in_a_row} records of the "
                        f"data; skipped so far in this batch: "
                        f"{skipped_by_reason(skipped)}"
                    )
                continue
            bad_in_a_row = 0
            images.append(sample["image"])
            captions.append(sample["caption"])
            keys.append(sample["key"])
        out = None
        if self._shared_memory:
            out = SharedMemoryArray((len(images), *images[0].shape), images[0].dtype)
        return {
            "images": np.stack(images, out=out),  # uint8 [local batch, H, W, 3]
            "tokens": self._tokenizer(captions, self._context_length),  # int32 [b, L]
            "keys": np.array(keys),
            "skipped": skipped,  # int64 [len(BAD_REASONS)]
        }

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)


class ShuffleEachEpoch(grain.MapDataset):
    """A new permutation of the parent every epoch, fixed by the seed.

    Like grain's `shuffle`, but fast at every size: grain's `index_shuffle` costs
    milliseconds per index on small datasets and microseconds on large ones, so below
    `_NUMPY_SHUFFLE_LIMIT` samples the permutation is drawn with NumPy once per epoch
    (at most 4 MB) and above it grain's is used.
    """

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = seed
        self._length = len(parent)
        self._permutations: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"ShuffleEachEpoch(seed={self._seed})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_permutations"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            permutation = self._permutations.get(epoch)
            if permutation is None:
                rng = np.random.default_rng([self._seed, epoch])
                permutation = rng.permutation(self._length).astype(np.int32)
                # Keep this epoch and the previous one: prefetching straddles both.
                self._permutations = {
                    e: p for e, p in self._permutations.items() if e == epoch - 1
                }
                self._permutations[epoch] = permutation
            return permutation

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, position = divmod(index, self._length)
        if self._length <= _NUMPY_SHUFFLE_LIMIT:
            shuffled = int(self._permutation(epoch)[position])
        else:
            shuffled = index_shuffle(
                position,
                max_index=self._length - 1,
                seed=(self._seed + epoch) % 2**32,
                rounds=4,
            )
        return self._parent[shuffled]


_NUMPY_SHUFFLE_LIMIT = 1 << 20


class GlobalBatchRows(grain.MapDataset):
    """This process's rows of each global batch of an endless parent.

    Local sample i is row `process_index * local_batch + i % local_batch` of global
    batch `i // local_batch`, i.e. parent index `(i // b) * B + p * b + i % b`.
    """

    def __init__(
        self,
        parent: grain.MapDataset,
        local_batch: int,
        process_index: int,
        process_count: int,
    ):
        super().__init__(parent)
        self._local_batch = local_batch
        self._global_batch = local_batch * process_count
        self._offset = process_index * local_batch
        self._length = len(parent) // process_count

    def __len__(self) -> int:
        return self._length

    def __str__(self) -> str:
        return f"GlobalBatchRows(offset={self._offset}, batch={self._global_batch})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        batch, row = divmod(index, self._local_batch)
        return self._parent[batch * self._global_batch + self._offset + row]


def _seed(*parts: int) -> int:
    """A 32-bit seed derived from integers (grain wants seeds below 2**32)."""
    return int(
        np.random.SeedSequence([int(part) for part in parts]).generate_state(1)[0]
    )


def _source_stream(
    source: Any,
    number: int,
    *,
    seed: int,
    transform: ImageTextTransform,
    local_batch: int,
    process_index: int,
    process_count: int,
    shuffle: bool,
) -> grain.MapDataset:
    """Source `number`'s endless stream of transformed samples for this process."""
    dataset = grain.MapDataset.source(source)
    if getattr(source, "infinite", False):
        # Global order: crops from the global position, then this process's rows.
        dataset = dataset.random_map(transform, seed=_seed(seed, number, 1 << 21))
        return GlobalBatchRows(dataset, local_batch, process_index, process_count)
    if process_count > 1 and not getattr(source, "split_by_shard", False):
        dataset = dataset[process_index::process_count]
    if len(dataset) == 0:
        raise ValueError(
            f"data source {number} ({type(source).__name__}) has no samples for "
            f"process {process_index} of {process_count}"
        )
    if shuffle:
        dataset = ShuffleEachEpoch(dataset, _seed(seed, process_index, number))
    dataset = dataset.repeat(None)
    # The crop's randomness comes from (seed, process, position in the stream).
    return dataset.random_map(
        transform, seed=_seed(seed, process_index, number, 1 << 20)
    )


def build_dataset(
    sources: Sequence[Any],
    weights: Sequence[float] | None,
    *,
    seed: int,
    batch_size: int,
    transform: ImageTextTransform,
    tokenizer: TokenizerSpec,
    context_length: int,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
    threads: int = 4,
    workers: int = 0,
    prefetch: int = 2,
    max_bad_in_a_row: int = 100_000,
    start: int = 0,
) -> grain.IterDataset:
    """The grain pipeline yielding this process's batches (`batch_size` rows each).

    `sources` are random-access sources (see `sources.py`); a source that already
    holds only this process's share says so with `split_by_shard`, an endless one with
    `infinite`. `start` skips that many of this process's samples (a pipeline in
    global order restarts at a batch this way).
    """
    streams = [
        _source_stream(
            source,
            number,
            seed=seed,
            transform=transform,
            local_batch=batch_size,
            process_index=process_index,
            process_count=process_count,
            shuffle=shuffle,
        )
        for number, source in enumerate(sources)
    ]
    dataset = grain.MapDataset.mix(streams, weights) if len(streams) > 1 else streams[0]
    if start:
        dataset = dataset[start:]
    return _batched(
        dataset,
        batch_size,
        tokenizer,
        context_length,
        threads=threads,
        workers=workers,
        prefetch=prefetch,
        max_bad_in_a_row=max_bad_in_a_row,
    )


def _batched(
    dataset: grain.MapDataset,
    batch_size: int,
    tokenizer: TokenizerSpec,
    context_length: int,
    *,
    threads: int,
    workers: int,
    prefetch: int,
    max_bad_in_a_row: int,
) -> grain.IterDataset:
    """Samples read by `threads` (in `workers` processes if > 0) -> batches,
    `prefetch` of them assembled ahead."""
    read_options = grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=max(16, 4 * threads)
    )
    dataset = SkipAndBatch(
        dataset.to_iter_dataset(read_options),
        batch_size,
        tokenizer,
        context_length,
        max_bad_in_a_row,
    )
    if workers > 0:
        # grain's worker start-up reads an absl flag; outside an absl app (a notebook,
        # pytest) the flags are unparsed, so take their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=max(1, prefetch)
            )
        )
    if prefetch > 0:  # batches are assembled while the device trains
        dataset = ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=prefetch)
    return dataset
