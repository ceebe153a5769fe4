"""Host input pipelines: per-process batches with a state that resumes exactly.

Two pipelines behind one interface (`next()`, `get_state()`, `set_state()`,
`metrics()`, `close()`):

- `ShapesIterator`: the built-in demo data, drawn a whole batch at a time.
- `DataIterator`: grain pipelines over real data (webdataset tar shards, CSV/TSV,
  tfds, scikit-learn's digits) and weighted mixtures of them:

      source (random access) -> this process's share -> shuffle -> repeat
        -> [mix] -> decode + crop (grain worker threads / processes)
        -> skip bad samples, counted by reason -> batch + tokenize -> prefetch

  Every step is a function of (seed, process index, position), so the iterator's
  state is a few integers, saved with the checkpoint: a resumed run yields exactly
  the samples an uninterrupted one would have. Each process reads only its share
  (whole shards where there are enough, otherwise every `process_count`-th sample).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from grain.experimental import ThreadPrefetchIterDataset, index_shuffle
from grain.multiprocessing import SharedMemoryArray

from jaxclip.data import shapes
from jaxclip.data.digits import DigitsSource
from jaxclip.data.sources import (
    BAD_REASONS,
    CsvSource,
    ShapesSource,
    TarShardSource,
    TfdsSource,
)
from jaxclip.data.tokenizer import TokenizerSpec, tokenize
from jaxclip.data.transforms import ImageTextTransform


class ShapesIterator:
    """Batches of the built-in shapes data, a pure function of (seed, batch index).

    Every process draws the same global batch and keeps its own rows, so the samples a
    step sees do not depend on the number of processes. The state is the index of the
    next batch, so a restored iterator continues exactly where the saved one stopped.
    """

    def __init__(
        self,
        seed: int,
        global_batch_size: int,
        image_size: int,
        context_length: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if global_batch_size % process_count:
            raise ValueError(
                f"train.batch_size={global_batch_size} is not divisible by the "
                f"{process_count} processes"
            )
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.image_size = image_size
        self.context_length = context_length
        self.local_batch_size = global_batch_size // process_count
        self.local_rows = slice(
            process_index * self.local_batch_size,
            (process_index + 1) * self.local_batch_size,
        )
        self.index = 0

    def __iter__(self) -> ShapesIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        drawn = shapes.draw_batch(
            self.seed, self.index, self.global_batch_size, self.image_size
        )
        self.index += 1
        captions = drawn["captions"][self.local_rows]
        return {
            "images": drawn["images"][self.local_rows],
            "tokens": tokenize(captions, self.context_length),
        }

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position in the stream."""
        return {"source": "shapes", "seed": self.seed, "index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a position returned by `get_state`."""
        if state.get("source") != "shapes" or state.get("seed") != self.seed:
            raise ValueError(
                f"data state {state} was saved by a different input pipeline "
                f"(expected source 'shapes' with seed {self.seed})"
            )
        self.index = int(state["index"])

    def metrics(self) -> dict[str, int]:
        """Data metrics for the logs; drawn data has no bad samples."""
        return {}

    def close(self) -> None:
        """Nothing to release."""


# --- grain pipeline over real data.


class _SkipAndBatch(grain.IterDataset):
    """Drops bad samples (counting them by reason), batches and tokenizes the rest.

    It holds nothing between batches, so its state is its parent's: the index of the
    next sample to read. Each batch carries the counts of the samples skipped while
    filling it, which is how the counts reach the main process from worker processes.
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
        self._batch_size = batch_size
        self._tokenizer = tokenizer
        self._context_length = context_length
        self._max_bad_in_a_row = max_bad_in_a_row
        self._shared_memory = False

    def enable_shared_memory_output(self) -> None:
        """Called by grain in worker processes: images go out in shared memory
        instead of being pickled through a pipe."""
        self._shared_memory = True

    def __iter__(self) -> _SkipAndBatchIterator:
        return _SkipAndBatchIterator(
            self._parent.__iter__(),
            self._batch_size,
            self._tokenizer,
            self._context_length,
            self._max_bad_in_a_row,
            self._shared_memory,
        )

    def __str__(self) -> str:
        return f"SkipAndBatch(batch_size={self._batch_size})"


class _SkipAndBatchIterator(grain.DatasetIterator):
    def __init__(
        self,
        parent,
        batch_size,
        tokenizer,
        context_length,
        max_bad_in_a_row,
        shared_memory,
    ):
        super().__init__(parent)
        self._batch_size = batch_size
        self._tokenizer = tokenizer
        self._context_length = context_length
        # An all-bad stream would otherwise spin forever: give up, with the counts.
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
                    counts = _counts_dict(skipped)
                    raise RuntimeError(
                        f"no usable sample in the last {bad_in_a_row} records of the "
                        f"data; skipped so far in this batch: {counts}"
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


class _ShuffleEachEpoch(grain.MapDataset):
    """A new permutation of the parent every epoch, fixed by the seed.

    Like grain's `shuffle`, but fast at every size: grain's `index_shuffle` costs
    milliseconds per index on small datasets (4.5 ms at 11 samples, 0.2 ms at 1,000,
    5 us from a million up), so below `_NUMPY_SHUFFLE_LIMIT` samples the permutation
    is drawn with NumPy once per epoch (at most 4 MB) and above it grain's is used.
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


def _counts_dict(counts: np.ndarray) -> dict[str, int]:
    return {reason: int(n) for reason, n in zip(BAD_REASONS, counts) if n}


def _seed(*parts: int) -> int:
    """A 32-bit seed derived from integers (grain wants seeds below 2**32)."""
    return int(
        np.random.SeedSequence([int(part) for part in parts]).generate_state(1)[0]
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
) -> grain.IterDataset:
    """The grain pipeline yielding this process's batches (`batch_size` rows each).

    `sources` are random-access sources (see `sources.py`); a source that already
    holds only this process's share says so with `split_by_shard`. After
    `max_bad_in_a_row` consecutive bad samples the data is taken to be unusable (a
    RuntimeError with the counts) rather than skipped forever.
    """
    per_source = []
    for number, source in enumerate(sources):
        dataset = grain.MapDataset.source(source)
        if process_count > 1 and not getattr(source, "split_by_shard", False):
            dataset = dataset[process_index::process_count]
        if len(dataset) == 0:
            raise ValueError(
                f"data source {number} ({type(source).__name__}) has no samples for "
                f"process {process_index} of {process_count}"
            )
        if not getattr(source, "infinite", False):
            if shuffle:
                dataset = _ShuffleEachEpoch(dataset, _seed(seed, process_index, number))
            dataset = dataset.repeat(None)
        per_source.append(dataset)
    mixed = len(per_source) > 1
    dataset = grain.MapDataset.mix(per_source, weights) if mixed else per_source[0]
    # The crop's randomness comes from (seed, process, position in the stream).
    dataset = dataset.random_map(transform, seed=_seed(seed, process_index, 1 << 20))
    read_options = grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=max(16, 4 * threads)
    )
    dataset = dataset.to_iter_dataset(read_options)
    dataset = _SkipAndBatch(
        dataset, batch_size, tokenizer, context_length, max_bad_in_a_row
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


def _gather_json(payload: Any) -> list[Any]:
    """`payload` of every process, in process order (a collective: all must call)."""
    if jax.process_count() == 1:
        return [payload]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(payload).encode("utf-8"), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([len(data)], np.int64))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: len(data)] = data
    rows = multihost_utils.process_allgather(padded)  # [processes, longest]
    return [
        json.loads(bytes(row[: int(n)]).decode("utf-8"))
        for row, n in zip(rows, np.ravel(lengths))
    ]


class DataIterator:
    """This process's batches from a grain pipeline, with a checkpointable state.

    `next()` gives {'images': uint8 [b, H, W, 3], 'tokens': int32 [b, L]} (plus
    'keys' with `with_keys=True`). `get_state()` is this process's position, cheap
    enough to take after every batch; `checkpoint_state` gathers every process's
    into the one JSON item the checkpoint stores, and `set_state` takes either.
    """

    def __init__(
        self,
        dataset: grain.IterDataset,
        source_name: str,
        fingerprint: dict[str, Any],
        process_index: int = 0,
        process_count: int = 1,
        with_keys: bool = False,
        gather: Callable[[Any], list[Any]] = _gather_json,
    ):
        self.source_name = source_name
        self.fingerprint = fingerprint
        self.process_index, self.process_count = process_index, process_count
        self.with_keys = with_keys
        self._gather = gather
        self._iterator = dataset.__iter__()
        self._skipped = np.zeros(len(BAD_REASONS), np.int64)
        self._batches = 0

    def __iter__(self) -> DataIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self._skipped += batch["skipped"]
        self._batches += 1
        result = {"images": batch["images"], "tokens": batch["tokens"]}
        if self.with_keys:
            result["keys"] = batch["keys"]
        return result

    def skipped(self) -> dict[str, int]:
        """Samples this process skipped so far, by reason (non-zero reasons only)."""
        return _counts_dict(self._skipped)

    def metrics(self) -> dict[str, int]:
        """Skipped samples over all processes, for the logs: `data/skipped` (total)
        and `data/skipped/<reason>` (a collective in multi-process runs)."""
        totals = np.sum(self._gather(self._skipped.tolist()), axis=0)
        result = {"data/skipped": int(np.sum(totals))}
        result.update(
            {f"data/skipped/{reason}": n for reason, n in _counts_dict(totals).items()}
        )
        return result

    def get_state(self) -> dict[str, Any]:
        """This process's position (JSON; no communication between processes)."""
        return {
            "source": self.source_name,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "position": {
                "fingerprint": self.fingerprint,
                "grain": self._iterator.get_state(),
                "skipped": self._skipped.tolist(),
                "batches": self._batches,
            },
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue exactly where the state was taken; refuse a state that cannot.

        `state` is a checkpoint's (`checkpoint_state`: every process's position) or
        this process's own (`get_state`).
        """
        if state.get("source") != self.source_name:
            raise ValueError(
                f"the checkpoint's data state is for data.source="
                f"{state.get('source')!r}, not {self.source_name!r}"
            )
        local = "position" in state  # one process's, as get_state gives it
        count = state["process_count"] if local else len(state["processes"])
        if count != self.process_count:
            raise ValueError(
                f"the checkpoint's data state was saved by {count} processes; "
                f"this run has {self.process_count}, so it cannot resume the data "
                "exactly (start a new workdir to change the process count)"
            )
        if local and state["process_index"] != self.process_index:
            raise ValueError(
                f"the data state is process {state['process_index']}'s; this is "
                f"process {self.process_index}"
            )
        own = state["position"] if local else state["processes"][self.process_index]
        changed = {
            field: (own["fingerprint"].get(field), value)
            for field, value in self.fingerprint.items()
            if own["fingerprint"].get(field) != _jsonable(value)
        }
        if changed:
            details = ", ".join(
                f"{field}: saved {old!r}, now {new!r}"
                for field, (old, new) in changed.items()
            )
            raise ValueError(
                "the data pipeline differs from the one in the checkpoint, so the "
                f"resumed data would not match ({details})"
            )
        self._iterator.set_state(own["grain"])
        self._skipped = np.array(own["skipped"], np.int64)
        self._batches = int(own["batches"])

    def close(self) -> None:
        """Stop background workers."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def checkpoint_state(
    state: dict[str, Any], gather: Callable[[Any], list[Any]] = _gather_json
) -> dict[str, Any]:
    """The data state to checkpoint: every process's position, from each one's
    `get_state()` (a collective in multi-process runs: all processes call it, as they
    all call the checkpoint save). The shapes pipeline's state is the same
    everywhere and passes through."""
    if "position" not in state:
        return state
    return {"source": state["source"], "processes": gather(state["position"])}


def describe_skipped(metrics: dict[str, Any]) -> str:
    """'data: 3 samples skipped so far (corrupt_image 2, missing_caption 1)'."""
    prefix = "data/skipped/"
    reasons = ", ".join(
        f"{name[len(prefix) :]} {count}"
        for name, count in metrics.items()
        if name.startswith(prefix)
    )
    return f"data: {metrics.get('data/skipped', 0)} samples skipped so far ({reasons})"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


# --- From the config.

REAL_SOURCES = ("webdataset", "csv", "tfds")


def open_source(
    kind: str,
    path: str,
    config: ml_collections.ConfigDict,
    image_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Any:
    """The random-access source `kind` over `path`, with the config's options."""
    data = config.data
    if kind == "webdataset":
        return TarShardSource(path, process_index, process_count)
    if kind == "csv":
        return CsvSource(
            path, data.csv_image_column, data.csv_caption_column, data.csv_separator
        )
    if kind == "tfds":
        return TfdsSource(
            path,
            data.tfds_data_dir,
            data.tfds_split,
            data.tfds_image_key,
            data.tfds_caption_key,
        )
    if kind == "shapes":
        return ShapesSource(config.seed, image_size)
    if kind == "digits":  # scikit-learn's bundled scans; data.path is not used
        return DigitsSource("train", image_size)
    raise ValueError(f"unknown data source {kind!r}")


def mix_entries(config: ml_collections.ConfigDict) -> list[tuple[str, str, float]]:
    """(source, path, weight) for each source the config reads."""
    if config.data.source == "mix":
        return [(str(k), str(p), float(w)) for k, p, w in config.data.mix]
    return [(config.data.source, config.data.path, 1.0)]


def make_train_iterator(
    config: ml_collections.ConfigDict,
    image_size: int,
    context_length: int,
    with_keys: bool = False,
) -> ShapesIterator | DataIterator:
    """The training input pipeline named by `data.source`."""
    process_index, process_count = jax.process_index(), jax.process_count()
    if config.data.source == "shapes":
        return ShapesIterator(
            seed=config.seed,
            global_batch_size=config.train.batch_size,
            image_size=image_size,
            context_length=context_length,
            process_index=process_index,
            process_count=process_count,
        )
    entries = mix_entries(config)
    sources = [
        open_source(kind, path, config, image_size, process_index, process_count)
        for kind, path, _ in entries
    ]
    weights = [weight for _, _, weight in entries]
    local_batch = config.train.batch_size // process_count
    dataset = build_dataset(
        sources,
        weights,
        seed=config.seed,
        batch_size=local_batch,
        transform=ImageTextTransform(
            image_size,
            config.data.crop,
            tuple(config.data.crop_scale),
            config.data.max_image_pixels,
        ),
        tokenizer=TokenizerSpec(config.data.tokenizer, config.data.tokenizer_model),
        context_length=context_length,
        process_index=process_index,
        process_count=process_count,
        shuffle=config.data.shuffle,
        threads=config.data.threads,
        workers=config.data.workers,
        prefetch=config.data.prefetch,
    )
    # What the sample order depends on; a resume with other values is refused.
    fingerprint = {
        "sources": [kind for kind, _, _ in entries],
        "lengths": [min(len(source), 2**62) for source in sources],
        "weights": weights,
        "seed": config.seed,
        "batch_size": config.train.batch_size,
        "shuffle": config.data.shuffle,
        "workers": config.data.workers,
    }
    return DataIterator(
        dataset,
        config.data.source,
        _jsonable(fingerprint),
        process_index,
        process_count,
        with_keys,
    )
