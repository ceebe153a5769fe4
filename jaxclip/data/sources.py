"""Random-access sources of raw image-text records: tar shards, CSV/TSV, tfds, shapes.

Also the readers the evaluation sets share: `read_csv_columns` (the one CSV parser),
`tfds_info` and `open_tfds`, and `expand_paths` for the config's file checks.

Each source has `len()` and `source[i]`, so grain can shuffle it globally and a
resumed run can continue at any index. A record is a dict:

    {"key": str, "image": bytes | uint8 [H, W, 3] | None, "caption": bytes | str | None,
     "error": None | a reason from BAD_REASONS}

Records are raw: images are decoded, and captions checked, by the transform that
follows (`transforms.ImageTextTransform`), so that work runs in the pipeline's
workers. A file named in the config that does not exist is an error here, at start,
and the message names it; a bad sample inside a file is a record with a reason.
"""

from __future__ import annotations

import collections
import csv
import glob
import os
import re
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import numpy as np

from jaxclip.data import shapes
from jaxclip.data.tar_index import BAD_REASONS, NO_PROBLEM, ShardIndex, index_tar

__all__ = [
    "BAD_REASONS",
    "CsvSource",
    "ShapesSource",
    "TarShardSource",
    "TfdsSource",
    "expand_paths",
    "open_tfds",
    "read_csv_columns",
    "tfds_info",
]

_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """'a/{00..02}.tar' -> a/00.tar, a/01.tar, a/02.tar; '{x,y}' lists alternatives."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [
            str(n).zfill(width) for n in range(int(first), int(last) + step, step)
        ]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [
        expanded
        for choice in choices
        for expanded in expand_braces(head + choice + tail)
    ]


def expand_paths(spec: str | Sequence[str], suffix: str = ".tar") -> list[str]:
    """Files named by a list, a brace pattern, a glob or a directory (its `*suffix`).

    Raises FileNotFoundError naming what is missing: any listed file that does not
    exist is an error at start, never a silent gap in the data.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for item in items:
        for path in expand_braces(str(item)):
            if os.path.isdir(path):
                found = sorted(glob.glob(os.path.join(glob.escape(path), f"*{suffix}")))
                if not found:
                    raise FileNotFoundError(
                        f"directory {path!r} has no *{suffix} files"
                    )
                paths += found
            elif glob.has_magic(path):
                found = sorted(glob.glob(path))
                if not found:
                    raise FileNotFoundError(f"no file matches {path!r}")
                paths += found
            else:
                paths.append(path)
    if not paths:
        raise FileNotFoundError(f"no files in data path {spec!r}")
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        shown = ", ".join(repr(path) for path in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} data files do not exist: {shown}{more}"
        )
    return paths


def read_csv_columns(
    path: str, columns: Sequence[str], separator: str = ""
) -> list[tuple[str | None, ...]]:
    """The named columns of every non-empty row of a CSV/TSV file, in file order; a
    cell that a short row lacks is None. The separator is a tab for `.tsv` files and
    a comma otherwise, unless given. FileNotFoundError or ValueError (an empty file,
    a missing column) name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV file {path!r} does not exist")
    separator = separator or ("\t" if path.lower().endswith(".tsv") else ",")
    # surrogateescape keeps bytes that are not UTF-8, so one bad caption is a
    # counted bad sample instead of an error for the whole file.
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=separator)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"CSV file {path!r} is empty")
        missing = [name for name in columns if name not in header]
        if missing:
            raise ValueError(
                f"CSV file {path!r} has no column {missing[0]!r}; its columns are "
                f"{header} (separator {separator!r})"
            )
        at = [header.index(name) for name in columns]
        return [
            tuple(row[i] if i < len(row) else None for i in at) for row in reader if row
        ]


def _error(key: str, reason: str) -> dict[str, Any]:
    return {"key": key, "image": None, "caption": None, "error": reason}


class TarShardSource:
    """Samples of webdataset tar shards ({key}.jpg|jpeg|png|webp + {key}.txt).

    With `process_count` processes and at least as many shards, each process indexes
    and reads only its own shards (every `process_count`-th, from `process_index`);
    with fewer shards than processes, all shards are indexed and the samples are
    split instead (every process still gets a disjoint share). `split_by_shard`
    tells the pipeline which of the two happened.
    """

    def __init__(
        self,
        paths: str | Sequence[str],
        process_index: int = 0,
        process_count: int = 1,
        index_threads: int = 8,
    ):
        all_paths = expand_paths(paths, ".tar")
        self.num_shards = len(all_paths)
        self.split_by_shard = len(all_paths) >= process_count > 1
        own = (
            all_paths[process_index::process_count]
            if self.split_by_shard
            else all_paths
        )
        # Reading headers is mostly waiting on the file system; threads overlap it.
        with futures.ThreadPoolExecutor(max(1, min(index_threads, len(own)))) as pool:
            self.shards: list[ShardIndex] = list(pool.map(index_tar, own))
        self._ends = np.cumsum([len(shard) for shard in self.shards])
        self._files: dict[str, int] = {}
        self._files_pid = os.getpid()

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}  # descriptors do not cross processes
        return state

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard_id = int(np.searchsorted(self._ends, index, side="right"))
        shard = self.shards[shard_id]
        row = index - (int(self._ends[shard_id - 1]) if shard_id else 0)
        key = shard.keys[row].decode("utf-8", "replace")
        if shard.problem[row] != NO_PROBLEM:
            return _error(key, BAD_REASONS[shard.problem[row]])
        image_at, image_size = int(shard.image_offset[row]), int(shard.image_size[row])
        text_at, text_size = (
            int(shard.caption_offset[row]),
            int(shard.caption_size[row]),
        )
        # One read covers both members: img2dataset writes them next to each other.
        start = min(image_at, text_at)
        end = max(image_at + image_size, text_at + text_size)
        try:
            data = os.pread(self._descriptor(shard.path), end - start, start)
        except OSError:
            return _error(key, "read_error")
        if len(data) < end - start:
            return _error(key, "truncated_tar")  # the shard shrank since indexing
        return {
            "key": key,
            "image": data[image_at - start : image_at - start + image_size],
            "caption": data[text_at - start : text_at - start + text_size],
            "error": None,
        }

    def _descriptor(self, path: str) -> int:
        if self._files_pid != os.getpid():  # forked: the parent's descriptors
            self._files, self._files_pid = {}, os.getpid()
        descriptor = self._files.get(path)
        if descriptor is None:
            if len(self._files) >= 64:  # keep a bounded number of shards open
                for old in list(self._files)[:32]:
                    os.close(self._files.pop(old))
            descriptor = self._files[path] = os.open(path, os.O_RDONLY)
        return descriptor


class CsvSource:
    """Rows of a CSV/TSV file with an image-path column and a caption column.

    Image paths are relative to the file's directory (absolute paths are kept). The
    separator is a tab for `.tsv` files and a comma otherwise, unless given.
    """

    def __init__(
        self,
        path: str,
        image_column: str = "filepath",
        caption_column: str = "title",
        separator: str = "",
    ):
        paths = expand_paths(path, ".csv")
        if len(paths) != 1:
            raise ValueError(
                f"a CSV source reads one file; {path!r} names {len(paths)} (use "
                "data.source='mix' to read several)"
            )
        (path,) = paths
        self.path = path
        self.root = os.path.dirname(os.path.abspath(path))
        rows = read_csv_columns(path, (image_column, caption_column), separator)
        self.images: list[str] = [image or "" for image, _ in rows]
        self.captions: list[str | None] = [caption for _, caption in rows]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        relative = self.images[index]
        key = f"{os.path.basename(self.path)}:{index}"
        if not relative:
            return _error(key, "missing_image")
        try:
            with open(os.path.join(self.root, relative), "rb") as f:
                image = f.read()
        except FileNotFoundError:
            return _error(key, "missing_image")
        except OSError:
            return _error(key, "read_error")
        caption = self.captions[index]
        return {"key": key, "image": image, "caption": caption, "error": None}


def tfds_info(name: str, split: str, data_dir: str | None) -> Any:
    """The prepared tfds dataset's `DatasetInfo`; a clear error if it or `split` is
    missing (FileNotFoundError, ValueError). tfds itself is imported here, on use."""
    import tensorflow_datasets as tfds  # optional dependency

    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as error:  # tfds raises several types for "not found"
        first_line = str(error).strip().split("\n")[0]  # then every known name
        raise FileNotFoundError(
            f"tfds dataset {name!r} not found in data_dir {data_dir!r} ({first_line})"
        ) from None
    info = builder.info
    if split not in info.splits:
        raise ValueError(
            f"tfds dataset {name!r} has no split {split!r}; it has {sorted(info.splits)}"
        )
    return info


def open_tfds(name: str, split: str, data_dir: str | None, image_key: str) -> Any:
    """Random access to a prepared tfds split, with `image_key` left as encoded bytes
    (decoding and cropping happen in one step later)."""
    import tensorflow_datasets as tfds  # optional dependency

    return tfds.data_source(
        name,
        split=split,
        data_dir=data_dir,
        decoders={image_key: tfds.decode.SkipDecoding()},
    )


class TfdsSource:
    """A tfds dataset stored as array_record, read through `tfds.data_source`.

    Images are read as their encoded bytes (tfds' decoding is skipped), so they are
    decoded at reduced size by the pipeline's transform like any other source.
    """

    def __init__(
        self,
        name: str,
        data_dir: str = "",
        split: str = "train",
        image_key: str = "image",
        caption_key: str = "caption",
    ):
        self.name, self.split = name, split
        self.data_dir = data_dir or None
        self.image_key, self.caption_key = image_key, caption_key
        info = tfds_info(name, split, data_dir)
        features = set(info.features.keys())
        for key in (image_key, caption_key):
            if key not in features:
                raise ValueError(
                    f"tfds dataset {name!r} has no feature {key!r}; it has "
                    f"{sorted(features)}"
                )
        self._has_key = "key" in features
        self._length = info.splits[split].num_examples
        self._source = None

    def __len__(self) -> int:
        return self._length

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_source"] = None  # reopened in each worker process
        return state

    def _open(self):
        self._source = open_tfds(self.name, self.split, self.data_dir, self.image_key)
        return self._source

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = self._source or self._open()
        example = source[index]
        default_key = f"{self.name}/{self.split}/{index}"
        key = _as_text(example["key"]) if self._has_key else default_key
        return {
            "key": key,
            "image": example[self.image_key],
            "caption": example[self.caption_key],
            "error": None,
        }


def _as_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class ShapesSource:
    """The built-in coloured shapes: an endless stream drawn a block at a time.

    Sample i is row `i % block_size` of `shapes.draw_batch(seed, i // block_size,
    block_size)`: NumPy draws a block of shapes far faster per sample than one at a
    time, so the last few blocks are kept for the pipeline's threads to share.
    """

    infinite = True

    def __init__(self, seed: int, image_size: int, block_size: int = 1):
        if block_size < 1:
            raise ValueError(f"block_size={block_size}; expected >= 1")
        self.seed, self.image_size, self.block_size = seed, image_size, block_size
        self.__setstate__(self.__dict__)

    def __getstate__(self) -> dict[str, Any]:
        return {
            name: getattr(self, name) for name in ("seed", "image_size", "block_size")
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._blocks: collections.OrderedDict[int, futures.Future] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> dict[str, Any]:
        block, row = divmod(index, self.block_size)
        drawn = self._block(block)
        return {
            "key": f"shapes:{self.seed}:{index}",
            "image": drawn["images"][row],
            "caption": drawn["captions"][row],
            "error": None,
        }

    def _block(self, block: int) -> dict[str, Any]:
        """Block `block`, drawn once: the first thread to ask draws, others wait."""
        with self._lock:
            drawn = self._blocks.get(block)
            first = drawn is None
            if first:
                drawn = self._blocks[block] = futures.Future()
                while len(self._blocks) > _SHAPES_BLOCKS_KEPT:
                    self._blocks.popitem(last=False)
        if first:
            try:
                result = shapes.draw_batch(
                    self.seed, block, self.block_size, self.image_size
                )
            except BaseException as error:
                drawn.set_exception(error)
                raise
            drawn.set_result(result)
        return drawn.result()


# Blocks in flight at once: prefetching reads about two batches ahead.
_SHAPES_BLOCKS_KEPT = 4
