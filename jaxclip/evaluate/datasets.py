"""Labelled and captioned images for evaluation, preprocessed as OpenCLIP evaluates.

Two kinds of evaluation data, each with a few constructors:

    ClassificationSet.from_tfds("cifar10", "test", data_dir, image_size=224)
    ClassificationSet.from_folder("imagenet/val", 224,
                                  class_names=prompts.class_names("imagenet"))
    ClassificationSet.from_csv("labels.csv", 224)
    RetrievalSet.from_csv("captions.csv", 224)
    RetrievalSet.from_karpathy_json("dataset_coco.json", "coco/", "test",
                                    image_size=224)

Images are OpenCLIP's evaluation crop: the shorter side resized to `image_size`
(bicubic) and the centre square taken, done in one resampling step by
`transforms.decode_crop_resize(crop='center')`. They stay uint8 [n, S, S, 3]; the
model's jitted encoder normalises them. `dataset.images` decodes on access
(`images[start:stop]` or `dataset.load(start, stop)`), so each process can embed its
own share; labels, captions and the caption-to-image index are held whole.

Bad images are found once, at construction, so that every process agrees on which
are left out and the labels stay aligned: each image is read and decoded at reduced
size (JPEGs at 1/8 scale in the DCT; every byte of data is still read). A bad image is
skipped and counted by reason (`skipped`, and a logged warning); a set with no usable
image is an error. With `check_images=False` only the files' existence is checked
and a bad image raises when it is loaded. Retrieval sets refuse missing image files
instead of skipping them: recall depends on the size of the gallery, so results on a
silently smaller one would not be comparable (a missing file usually means a wrong
`image_root`). Corrupt images there are skipped, with their captions, and counted.
"""

from __future__ import annotations

import collections
import csv
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from concurrent import futures
from typing import Any

import numpy as np

from jaxclip.data.sources import open_tfds, tfds_info
from jaxclip.data.transforms import (
    BadImage,
    caption_text,
    decode_crop_resize,
)

__all__ = ["IMAGE_EXTENSIONS", "ClassificationSet", "Images", "RetrievalSet"]

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
_CHUNK = 256  # images read per step while checking


def _default_threads() -> int:
    return min(8, os.cpu_count() or 1)


class _Files:
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


class _TfdsImages:
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
        return [_as_bytes(example[self.image_key]) for example in examples]


def _as_bytes(value: Any) -> bytes:
    return value.item() if isinstance(value, np.ndarray) else value


def _problem(data: bytes) -> str | None:
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
        reader: _Files | _TfdsImages,
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


def _check_files(
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
        return _problem(data)

    with futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(check, paths))


def _tally(
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


def _limit(count: int, num_examples: int | None) -> int:
    if num_examples is None:
        return count
    if num_examples < 1:
        raise ValueError(f"num_examples={num_examples}; expected None or >= 1")
    return min(count, num_examples)


class _ImageSet:
    """What both kinds of set share: `len()` and `load(start, stop)` of `images`."""

    images: Images | ArrayImages

    def __len__(self) -> int:
        return len(self.images)

    def load(self, start: int, stop: int) -> np.ndarray:
        """Images start..stop-1 as uint8 [stop - start, S, S, 3]."""
        return self.images.load(start, stop)


class ClassificationSet(_ImageSet):
    """Labelled images: `images` (uint8 [n, S, S, 3] on access), `labels` int32 [n],
    `class_names`, and `skipped` (bad images left out, by reason)."""

    def __init__(
        self,
        images: Images | ArrayImages,
        labels: np.ndarray,
        class_names: Sequence[str],
        skipped: Mapping[str, int],
        source: str,
    ):
        self.images = images
        self.labels = np.asarray(labels, np.int32)
        self.class_names = list(class_names)
        self.skipped = dict(skipped)
        self.source = source
        if len(self.labels) != len(images):
            raise ValueError(f"{len(self.labels)} labels for {len(images)} images")
        outside = self.labels[(self.labels < 0) | (self.labels >= len(class_names))]
        if outside.size:  # e.g. the -1 of an unlabelled tfds test split
            raise ValueError(
                f"{source}: label {int(outside[0])} is not a class index "
                f"(0..{len(class_names) - 1})"
            )

    def __repr__(self) -> str:
        return (
            f"ClassificationSet({self.source!r}, n={len(self)}, "
            f"classes={len(self.class_names)}, image_size={self.images.image_size}, "
            f"skipped={self.skipped})"
        )

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
        source: str,
    ) -> ClassificationSet:
        """Images already in memory (uint8 [n, S, S, 3]), e.g. the built-in sets."""
        return cls(ArrayImages(images), labels, class_names, {}, source)

    @classmethod
    def _build(
        cls,
        reader: _Files | _TfdsImages,
        reasons: Sequence[str | None],
        labels: Sequence[int],
        class_names: Sequence[str],
        source: str,
        image_size: int,
        threads: int,
    ) -> ClassificationSet:
        kept, skipped = _tally(reasons, source)
        images = Images(reader, kept, image_size, threads)
        return cls(images, np.asarray(labels)[kept], class_names, skipped, source)

    @classmethod
    def from_tfds(
        cls,
        name: str,
        split: str = "test",
        data_dir: str | None = None,
        image_key: str = "image",
        label_key: str = "label",
        *,
        image_size: int,
        class_names: Sequence[str] | None = None,
        num_examples: int | None = None,
        check_images: bool = True,
        threads: int | None = None,
    ) -> ClassificationSet:
        """A tfds dataset (array_record, read without TensorFlow); class names from
        its ClassLabel feature unless given (e.g. `prompts.class_names('cifar100')`,
        whose names have spaces where tfds has underscores)."""
        import tensorflow_datasets as tfds  # optional dependency, imported on use

        info = tfds_info(name, split, data_dir)
        features = info.features
        for key in (image_key, label_key):
            if key not in features:
                raise ValueError(
                    f"tfds dataset {name!r} has no feature {key!r}; it has "
                    f"{sorted(features.keys())}"
                )
        label_feature = features[label_key]
        if not isinstance(label_feature, tfds.features.ClassLabel):
            raise ValueError(
                f"tfds feature {name}/{label_key} is {type(label_feature).__name__}, "
                "not a ClassLabel"
            )
        names = _checked_names(class_names, label_feature.names, f"{name}/{label_key}")
        reader = _TfdsImages(name, split, data_dir or None, image_key)
        count = _limit(info.splits[split].num_examples, num_examples)
        threads = threads or _default_threads()
        labels: list[int] = []
        reasons: list[str | None] = []
        # One pass over the records: the labels, and (if asked) each image's check.
        with futures.ThreadPoolExecutor(threads) as pool:
            for start in range(0, count, _CHUNK):
                chunk = list(range(start, min(start + _CHUNK, count)))
                examples = reader.source().__getitems__(chunk)
                labels += [int(example[label_key]) for example in examples]
                if check_images:
                    datas = [_as_bytes(example[image_key]) for example in examples]
                    reasons += pool.map(_problem, datas)
                else:
                    reasons += [None] * len(chunk)
        return cls._build(
            reader, reasons, labels, names, f"tfds:{name}/{split}", image_size, threads
        )

    @classmethod
    def from_folder(
        cls,
        root: str,
        image_size: int,
        *,
        class_names: Sequence[str] | Mapping[str, str] | None = None,
        num_examples: int | None = None,
        check_images: bool = True,
        threads: int | None = None,
    ) -> ClassificationSet:
        """ImageNet's layout, `root/<class>/<image>`: one folder per class, sorted.

        Images are the files with an image extension (IMAGE_EXTENSIONS), found
        recursively in sorted order, like torchvision's ImageFolder; hidden folders
        (a leading '.') are not classes. Class names are the folder names, or
        `class_names`: one per folder in sorted order (e.g. 1,000 WordNet-id
        folders with `prompts.class_names('imagenet')`), or a folder -> name map.
        `num_examples` keeps the first n files in that order.
        """
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        folders = sorted(
            entry.name
            for entry in os.scandir(root)
            if entry.is_dir() and not entry.name.startswith(".")
        )
        if not folders:
            raise ValueError(f"image folder {root!r} has no class folders")
        if isinstance(class_names, Mapping):
            missing = [folder for folder in folders if folder not in class_names]
            if missing:
                raise ValueError(
                    f"class_names has no name for {len(missing)} of the "
                    f"{len(folders)} folders in {root!r}, e.g. {missing[:5]}"
                )
            names = [class_names[folder] for folder in folders]
        else:
            names = _checked_names(class_names, folders, f"the folders of {root!r}")
        paths, labels, other_files = [], [], 0
        for label, folder in enumerate(folders):
            for directory, subdirectories, files in os.walk(
                os.path.join(root, folder), followlinks=True
            ):
                subdirectories.sort()
                for file in sorted(files):
                    if file.lower().endswith(IMAGE_EXTENSIONS):
                        paths.append(os.path.join(directory, file))
                        labels.append(label)
                    else:
                        other_files += 1
        if other_files:
            log.info("%s: %d files without an image extension", root, other_files)
        if not paths:
            raise ValueError(f"image folder {root!r} holds no image files")
        count = _limit(len(paths), num_examples)
        threads = threads or _default_threads()
        return cls._build(
            _Files(paths[:count]),
            _check_files(paths[:count], check_images, threads),
            labels[:count],
            names,
            f"folder:{root}",
            image_size,
            threads,
        )

    @classmethod
    def from_csv(
        cls,
        path: str,
        image_size: int,
        path_column: str = "filepath",
        label_column: str = "label",
        *,
        class_names: Sequence[str] | None = None,
        separator: str = "",
        num_examples: int | None = None,
        check_images: bool = True,
        threads: int | None = None,
    ) -> ClassificationSet:
        """A CSV/TSV of image paths (relative to the file's folder) and labels.

        Labels are class indices (then `class_names` names them; by default '0',
        '1', ...) or class names (then the classes are `class_names` in its order,
        or by default the sorted unique names).
        """
        rows = _read_csv(path, (path_column, label_column), separator)
        rows = rows[: _limit(len(rows), num_examples)]
        if not rows:
            raise ValueError(f"CSV file {path!r} has no rows")
        root = os.path.dirname(os.path.abspath(path))
        paths = [_join(root, image) for image, _ in rows]
        values = [label.strip() for _, label in rows]
        if all(re.fullmatch(r"-?\d+", value) for value in values):
            labels = [int(value) for value in values]
            if min(labels) < 0:
                raise ValueError(f"CSV file {path!r}: negative label {min(labels)}")
            if class_names is None:
                names = [str(index) for index in range(max(labels) + 1)]
            else:
                names = list(class_names)
                if max(labels) >= len(names):
                    raise ValueError(
                        f"CSV file {path!r} has label {max(labels)}, but class_names "
                        f"has {len(names)} names"
                    )
        else:
            names = sorted(set(values)) if class_names is None else list(class_names)
            index = {name: number for number, name in enumerate(names)}
            unknown = sorted(set(values) - set(index))
            if unknown:
                raise ValueError(
                    f"CSV file {path!r} has labels not in class_names: {unknown[:5]}"
                )
            labels = [index[value] for value in values]
        threads = threads or _default_threads()
        return cls._build(
            _Files(paths),
            _check_files(paths, check_images, threads),
            labels,
            names,
            f"csv:{path}",
            image_size,
            threads,
        )


def _checked_names(
    given: Sequence[str] | None, default: Sequence[str], what: str
) -> list[str]:
    if given is None:
        return list(default)
    if isinstance(given, str):
        raise TypeError("class_names is a list of names (see prompts.class_names)")
    if len(given) != len(default):
        raise ValueError(
            f"class_names has {len(given)} names but {what} has {len(default)} classes"
        )
    return list(given)


def _join(root: str, path: str) -> str:
    """`path` relative to `root` (absolute paths kept), normalised; '' stays ''."""
    return os.path.normpath(os.path.join(root, path)) if path.strip() else ""


def _read_csv(
    path: str, columns: Sequence[str], separator: str
) -> list[tuple[str, ...]]:
    """The named columns of every non-empty row (a short row gives '' cells)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CSV file {path!r} does not exist")
    separator = separator or ("\t" if path.lower().endswith(".tsv") else ",")
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
            tuple(row[i] if i < len(row) else "" for i in at) for row in reader if row
        ]


class RetrievalSet(_ImageSet):
    """Captioned images: `images` (uint8 [n, S, S, 3] on access), `captions`,
    `text_to_image` int32 [num_captions] (the image each caption describes),
    `skipped` (images left out, by reason) and `skipped_captions` (by reason;
    'image_skipped' for the captions of a skipped image)."""

    def __init__(
        self,
        images: Images,
        captions: Sequence[str],
        text_to_image: np.ndarray,
        skipped: Mapping[str, int],
        skipped_captions: Mapping[str, int],
        source: str,
    ):
        self.images = images
        self.captions = list(captions)
        self.text_to_image = np.asarray(text_to_image, np.int32)
        self.skipped = dict(skipped)
        self.skipped_captions = dict(skipped_captions)
        self.source = source

    def __repr__(self) -> str:
        return (
            f"RetrievalSet({self.source!r}, images={len(self)}, "
            f"captions={len(self.captions)}, image_size={self.images.image_size}, "
            f"skipped={self.skipped}, skipped_captions={self.skipped_captions})"
        )

    @classmethod
    def _build(
        cls,
        paths: Sequence[str],
        captions: Sequence[Sequence[Any]],
        source: str,
        image_size: int,
        num_examples: int | None,
        check_images: bool,
        threads: int | None,
    ) -> RetrievalSet:
        """`paths[i]` is image i, `captions[i]` its raw captions."""
        count = _limit(len(paths), num_examples)
        paths, captions = list(paths[:count]), list(captions[:count])
        missing = [path or "(empty path)" for path in paths if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(
                f"{source}: {len(missing)} of {len(paths)} image files do not exist, "
                f"e.g. {missing[:5]} (retrieval scores depend on the gallery size, so "
                "images are not left out silently; check the image root)"
            )
        threads = threads or _default_threads()
        reasons = _check_files(paths, check_images, threads)
        caption_problems: collections.Counter = collections.Counter()
        texts: list[list[str]] = []
        for number, raw_captions in enumerate(captions):
            good = []
            for raw in raw_captions:
                text, problem = caption_text(raw)
                if problem is not None:
                    caption_problems[problem] += 1
                elif reasons[number] is not None:
                    caption_problems["image_skipped"] += 1
                else:
                    good.append(text)
            if reasons[number] is None and not good:
                reasons[number] = "missing_caption"  # nothing to retrieve it by
            texts.append(good)
        kept, skipped = _tally(reasons, source)
        if caption_problems:
            log.warning(
                "%s: left out %d captions (%s)",
                source,
                sum(caption_problems.values()),
                ", ".join(f"{k}: {n}" for k, n in sorted(caption_problems.items())),
            )
        all_captions, text_to_image = [], []
        for image, number in enumerate(kept):
            all_captions += texts[number]
            text_to_image += [image] * len(texts[number])
        return cls(
            Images(_Files(paths), kept, image_size, threads),
            all_captions,
            np.asarray(text_to_image, np.int32),
            skipped,
            dict(sorted(caption_problems.items())),
            source,
        )

    @classmethod
    def from_csv(
        cls,
        path: str,
        image_size: int,
        image_column: str = "filepath",
        caption_column: str = "title",
        *,
        separator: str = "",
        num_examples: int | None = None,
        check_images: bool = True,
        threads: int | None = None,
    ) -> RetrievalSet:
        """A CSV/TSV of (image path, caption) rows; rows naming the same image are one
        image with several captions, in order of first appearance. Paths are
        relative to the file's folder. `num_examples` keeps the first n images."""
        rows = _read_csv(path, (image_column, caption_column), separator)
        root = os.path.dirname(os.path.abspath(path))
        grouped: dict[str, list[str]] = {}
        for image, caption in rows:
            grouped.setdefault(_join(root, image), []).append(caption)
        if not grouped:
            raise ValueError(f"CSV file {path!r} has no rows")
        return cls._build(
            list(grouped),
            list(grouped.values()),
            f"csv:{path}",
            image_size,
            num_examples,
            check_images,
            threads,
        )

    @classmethod
    def from_karpathy_json(
        cls,
        path: str,
        image_root: str,
        split: str = "test",
        *,
        image_size: int,
        num_examples: int | None = None,
        check_images: bool = True,
        threads: int | None = None,
    ) -> RetrievalSet:
        """A Karpathy split file (dataset_coco.json, dataset_flickr30k.json): the
        images of `split` ('test', 'val', 'train', 'restval'), each with its raw
        sentences. An image's file is image_root/[filepath/]filename (COCO has a
        'filepath' such as 'val2014'; Flickr30k has none)."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise ValueError(f"{path!r} has no 'images' list (a Karpathy split file)")
        paths, captions, splits = [], [], collections.Counter()
        for number, entry in enumerate(data["images"]):
            try:
                splits[entry["split"]] += 1
                if entry["split"] != split:
                    continue
                relative = os.path.join(entry.get("filepath", ""), entry["filename"])
                sentences = [sentence["raw"] for sentence in entry["sentences"]]
            except (KeyError, TypeError) as error:
                raise ValueError(
                    f"{path!r}: images[{number}] lacks {error} (each image needs "
                    "'filename', 'split' and 'sentences' with 'raw')"
                ) from None
            paths.append(_join(image_root, relative))
            captions.append(sentences)
        if not paths:
            raise ValueError(
                f"{path!r} has no images in split {split!r}; its splits are "
                f"{dict(sorted(splits.items()))}"
            )
        return cls._build(
            paths,
            captions,
            f"karpathy:{path}[{split}]",
            image_size,
            num_examples,
            check_images,
            threads,
        )
