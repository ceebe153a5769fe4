"""Evaluation images: read, checked once, decoded on access.

`Images` is a lazily decoded uint8 [n, S, S, 3] array over a reader (`ImageFiles`,
`TfdsImages`) with OpenCLIP's evaluation crop: the shorter side resized to S
(bicubic) and the centre square taken, in one resampling step by
`transforms.decode_crop_resize(crop='center')`; `ArrayImages` has the same interface
over images already in memory. `check_image_files` and `image_problem` find the bad
images before a set is built (decoding at reduced size: JPEGs at 1/8 scale in the
DCT, every byte still read), and `tally_skipped` counts them by reason.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import numpy as np

from jaxclip.data.sources import open_tfds
from jaxclip.data.transforms import BadImage, decode_crop_resize

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayImages",
    "ImageFiles",
    "Images",
    "TfdsImages",
    "as_bytes",
    "check_image_files",
    "default_threads",
    "image_problem",
    "tally_skipped",
]

log = logging.getLogger(__name__)

# torchvision's ImageFolder extensions (compared in lower case).
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)
_CHECK_SIZE = 8  # the check decodes to this size: JPEG draft mode then reads 1/8 scale


def default_threads() -> int:
    """Threads for reading and decoding: the cores, at most 8."""
    return min(8, os.cpu_count() or 1)


class ImageFiles:
    """Reads image files by index."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def key(self, index: int) -> str:
        return self.paths[index]

    def read_many(self, indices: Sequence[int], pool: futures.Executor) -> list[bytes]:
        def read(index: int) -> bytes:
            with open(self.paths[index], "rb") as f:
                return f.read()

        return list(pool.map(read, indices))


class TfdsImages:
    """Reads the encoded image bytes of a tfds dataset's examples by index."""

    def __init__(self, name: str, split: str, data_dir: str | None, image_key: str):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key = image_key
        self._source = None

    def source(self):
        if self._source is None:
            self._source = open_tfds(
                self.name, self.split, self.data_dir, self.image_key
            )
        return self._source

    def key(self, index: int) -> str:
        return f"{self.name}/{self.split}/{index}"

    def read_many(self, indices: Sequence[int], pool: futures.Executor) -> list[bytes]:
        del pool  # array_record reads a batch of records in parallel itself
        examples = self.source().__getitems__(list(indices))
        return [as_bytes(example[self.image_key]) for example in examples]


def as_bytes(value: Any) -> bytes:
    """A tfds image feature (bytes, or a 0-d array of them) as bytes."""
    return value.item() if isinstance(value, np.ndarray) else value


def image_problem(data: bytes) -> str | None:
    """None if `data` decodes as an image, else the reason (sources.BAD_REASONS)."""
    try:
        decode_crop_resize(data, _CHECK_SIZE, "center")
    except BadImage as bad:
        return bad.reason
    except Exception:  # an 8x8 image is returned undecoded, and fails on first use
        return "corrupt_image"
    return None


class Images:
    """uint8 [n, S, S, 3] evaluation images, decoded on access.

    `len(images)`, `images[start:stop]` and `images.load(start, stop)` (a contiguous
    range, e.g. one process's share); `keys[i]` names image i (its path, or
    'name/split/index' for tfds).
    """

    def __init__(
        self,
        reader: ImageFiles | TfdsImages,
        indices: Sequence[int],
        image_size: int,
        threads: int,
    ):
        self._reader = reader
        self._indices = np.asarray(indices, np.int64)
        self.image_size = image_size
        self.threads = threads

    def __len__(self) -> int:
        return len(self._indices)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.image_size, self.image_size, 3)

    @property
    def keys(self) -> list[str]:
        return [self._reader.key(int(index)) for index in self._indices]

    def __getitem__(self, index: int | slice) -> np.ndarray:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("images[start:stop] loads a contiguous range (step 1)")
            return self.load(start, stop)
        if not -len(self) <= index < len(self):
            raise IndexError(f"image {index} of {len(self)}")
        index %= len(self)
        return self.load(index, index + 1)[0]

    def load(self, start: int, stop: int) -> np.ndarray:
        """Images start..stop-1 as uint8 [stop - start, S, S, 3]."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"load({start}, {stop}) of {len(self)} images")
        indices = [int(index) for index in self._indices[start:stop]]
        size = self.image_size
        out = np.empty((len(indices), size, size, 3), np.uint8)
        if not indices:
            return out

        def decode(item: tuple[int, bytes]) -> None:
            row, data = item
            try:
                out[row] = decode_crop_resize(data, size, "center")
            except BadImage as bad:
                raise ValueError(
                    f"image {self._reader.key(indices[row])!r} cannot be used "
                    f"({bad.reason}): it has changed since the set was checked, or "
                    "the set was built with check_images=False"
                ) from None

        with futures.ThreadPoolExecutor(self.threads) as pool:
            # PIL releases the GIL while it decodes and resamples.
            datas = self._reader.read_many(indices, pool)
            list(pool.map(decode, enumerate(datas)))
        return out

    def __repr__(self) -> str:
        return f"Images(n={len(self)}, image_size={self.image_size})"


class ArrayImages:
    """In-memory uint8 [n, S, S, 3] images with the interface of `Images`."""

    def __init__(self, images: np.ndarray):
        self._images = np.asarray(images, np.uint8)
        if self._images.ndim != 4 or self._images.shape[1] != self._images.shape[2]:
            raise ValueError(f"images must be [n, S, S, 3], got {self._images.shape}")
        self.image_size = self._images.shape[1]

    def __len__(self) -> int:
        return len(self._images)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self._images.shape  # type: ignore[return-value]

    def __getitem__(self, index: int | slice) -> np.ndarray:
        return self._images[index]

    def load(self, start: int, stop: int) -> np.ndarray:
        return self._images[start:stop]


def check_image_files(
    paths: Sequence[str], check_images: bool, threads: int
) -> list[str | None]:
    """For each file: None if it is a usable image, else the reason."""
    if not check_images:
        return [None if os.path.isfile(path) else "missing_image" for path in paths]

    def check(path: str) -> str | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return "missing_image"
        except OSError:
            return "read_error"
        return image_problem(data)

    with futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(check, paths))


def tally_skipped(
    reasons: Sequence[str | None], what: str
) -> tuple[list[int], dict[str, int]]:
    """(indices of the usable images, skipped counts by reason); warns if any."""
    kept = [index for index, reason in enumerate(reasons) if reason is None]
    skipped = dict(sorted(collections.Counter(r for r in reasons if r).items()))
    if not kept:
        raise ValueError(
            f"{what}: none of its {len(reasons)} images is usable {skipped}"
        )
    if skipped:
        log.warning(
            "%s: skipped %d of %d images (%s)",
            what,
            len(reasons) - len(kept),
            len(reasons),
            ", ".join(f"{reason}: {n}" for reason, n in skipped.items()),
        )
    return kept, skipped
