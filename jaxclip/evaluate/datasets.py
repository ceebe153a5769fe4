"""Labelled and captioned images for evaluation, preprocessed as OpenCLIP evaluates.

Two kinds of evaluation data, each with one constructor per format:

    ClassificationSet.from_tfds("cifar10", "test", data_dir, image_size=224)
    ClassificationSet.from_folder("imagenet/val", 224,
                                  class_names=prompts.class_names("imagenet"))
    ClassificationSet.from_csv("labels.csv", 224)
    RetrievalSet.from_csv("captions.csv", 224)
    RetrievalSet.from_karpathy_json("dataset_coco.json", "coco/", "test",
                                    image_size=224)

Each format's reader lists the images with their labels or captions; one builder per
kind then checks the images and makes the set. CSV files are read by
`data.sources.read_csv_columns`, the reader of the training data. Images stay uint8
[n, S, S, 3] and are decoded on access (`images.py`): `dataset.images[start:stop]`
or `dataset.load(start, stop)`, so each process can embed its own share; labels,
captions and the caption-to-image index are held whole. The model's jitted encoder
normalises the images.

Bad images are found once, at construction, so that every process agrees on which
are left out and the labels stay aligned. A bad image is skipped and counted by
reason (`skipped`, and a logged warning); a set with no usable image is an error.
With `check_images=False` only the files' existence is checked and a bad image
raises when it is loaded. Retrieval sets refuse missing image files instead of
skipping them: recall depends on the size of the gallery, so results on a silently
smaller one would not be comparable (a missing file usually means a wrong
`image_root`). Corrupt images there are skipped, with their captions, and counted.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from concurrent import futures
from typing import Any

import numpy as np

from jaxclip.data.sources import read_csv_columns, tfds_info
from jaxclip.data.transforms import caption_text
from jaxclip.evaluate.images import (
    IMAGE_EXTENSIONS,
    ArrayImages,
    ImageFiles,
    Images,
    TfdsImages,
    as_bytes,
    check_image_files,
    default_threads,
    image_problem,
    tally_skipped,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayImages",
    "ClassificationSet",
    "Images",
    "RetrievalSet",
]

log = logging.getLogger(__name__)

_CHUNK = 256  # tfds records read per step while checking


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
        reader: ImageFiles | TfdsImages,
        reasons: Sequence[str | None],
        labels: Sequence[int],
        class_names: Sequence[str],
        source: str,
        image_size: int,
        threads: int,
    ) -> ClassificationSet:
        """The set of `reader`'s images whose check found no problem (`reasons`)."""
        kept, skipped = tally_skipped(reasons, source)
        images = Images(reader, kept, image_size, threads)
        return cls(images, np.asarray(labels)[kept], class_names, skipped, source)

    @classmethod
    def _from_files(
        cls,
        paths: Sequence[str],
        labels: Sequence[int],
        class_names: Sequence[str],
        source: str,
        image_size: int,
        check_images: bool,
        threads: int | None,
    ) -> ClassificationSet:
        threads = threads or default_threads()
        reasons = check_image_files(paths, check_images, threads)
        return cls._build(
            ImageFiles(paths), reasons, labels, class_names, source, image_size, threads
        )

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
        info, label_names = _tfds_class_labels(
            name, split, data_dir, image_key, label_key
        )
        names = _checked_names(class_names, label_names, f"{name}/{label_key}")
        reader = TfdsImages(name, split, data_dir or None, image_key)
        count = _limit(info.splits[split].num_examples, num_examples)
        threads = threads or default_threads()
        labels, reasons = _read_tfds_labels(
            reader, count, label_key, check_images, threads
        )
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
        folders = _class_folders(root)
        names = _folder_class_names(root, folders, class_names)
        paths, labels = _folder_images(root, folders)
        count = _limit(len(paths), num_examples)
        return cls._from_files(
            paths[:count],
            labels[:count],
            names,
            f"folder:{root}",
            image_size,
            check_images,
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
        rows = _csv_rows(path, (path_column, label_column), separator)
        rows = rows[: _limit(len(rows), num_examples)]
        if not rows:
            raise ValueError(f"CSV file {path!r} has no rows")
        root = os.path.dirname(os.path.abspath(path))
        paths = [_join(root, image) for image, _ in rows]
        labels, names = _csv_labels(path, [label for _, label in rows], class_names)
        return cls._from_files(
            paths, labels, names, f"csv:{path}", image_size, check_images, threads
        )


def _tfds_class_labels(
    name: str, split: str, data_dir: str | None, image_key: str, label_key: str
) -> tuple[Any, list[str]]:
    """(the dataset's info, the names of its ClassLabel `label_key`)."""
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
    return info, list(label_feature.names)


def _read_tfds_labels(
    reader: TfdsImages, count: int, label_key: str, check_images: bool, threads: int
) -> tuple[list[int], list[str | None]]:
    """(labels, each image's problem or None) of the first `count` records, in one
    pass over them (the images are checked only with `check_images`)."""
    labels: list[int] = []
    reasons: list[str | None] = []
    with futures.ThreadPoolExecutor(threads) as pool:
        for start in range(0, count, _CHUNK):
            chunk = list(range(start, min(start + _CHUNK, count)))
            examples = reader.source().__getitems__(chunk)
            labels += [int(example[label_key]) for example in examples]
            if check_images:
                datas = [as_bytes(example[reader.image_key]) for example in examples]
                reasons += pool.map(image_problem, datas)
            else:
                reasons += [None] * len(chunk)
    return labels, reasons


def _class_folders(root: str) -> list[str]:
    """The class folders of `root`, sorted; hidden ones are not classes."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    folders = sorted(
        entry.name
        for entry in os.scandir(root)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not folders:
        raise ValueError(f"image folder {root!r} has no class folders")
    return folders


def _folder_class_names(
    root: str,
    folders: Sequence[str],
    class_names: Sequence[str] | Mapping[str, str] | None,
) -> list[str]:
    if not isinstance(class_names, Mapping):
        return _checked_names(class_names, folders, f"the folders of {root!r}")
    missing = [folder for folder in folders if folder not in class_names]
    if missing:
        raise ValueError(
            f"class_names has no name for {len(missing)} of the "
            f"{len(folders)} folders in {root!r}, e.g. {missing[:5]}"
        )
    return [class_names[folder] for folder in folders]


def _folder_images(root: str, folders: Sequence[str]) -> tuple[list[str], list[int]]:
    """(image paths, their labels): each folder's image files, found recursively
    in sorted order."""
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
    return paths, labels


def _csv_rows(
    path: str, columns: Sequence[str], separator: str
) -> list[tuple[str, ...]]:
    """The named columns of every row, a cell that a short row lacks as ''."""
    rows = read_csv_columns(path, columns, separator)
    return [tuple(cell or "" for cell in row) for row in rows]


def _csv_labels(
    path: str, cells: Sequence[str], class_names: Sequence[str] | None
) -> tuple[list[int], list[str]]:
    """(labels, class names) from a CSV's label cells: class indices or names."""
    values = [cell.strip() for cell in cells]
    if not all(re.fullmatch(r"-?\d+", value) for value in values):
        names = sorted(set(values)) if class_names is None else list(class_names)
        index = {name: number for number, name in enumerate(names)}
        unknown = sorted(set(values) - set(index))
        if unknown:
            raise ValueError(
                f"CSV file {path!r} has labels not in class_names: {unknown[:5]}"
            )
        return [index[value] for value in values], names
    labels = [int(value) for value in values]
    if min(labels) < 0:
        raise ValueError(f"CSV file {path!r}: negative label {min(labels)}")
    if class_names is None:
        return labels, [str(index) for index in range(max(labels) + 1)]
    if max(labels) >= len(class_names):
        raise ValueError(
            f"CSV file {path!r} has label {max(labels)}, but class_names "
            f"has {len(class_names)} names"
        )
    return labels, list(class_names)


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


def _limit(count: int, num_examples: int | None) -> int:
    if num_examples is None:
        return count
    if num_examples < 1:
        raise ValueError(f"num_examples={num_examples}; expected None or >= 1")
    return min(count, num_examples)


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

    def captions_by_image(self) -> list[list[str]]:
        """Each image's captions, in image order (a captioning evaluator's references)."""
        by_image: list[list[str]] = [[] for _ in range(len(self))]
        for caption, image in zip(self.captions, self.text_to_image.tolist()):
            by_image[image].append(caption)
        return by_image

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
        threads = threads or default_threads()
        reasons = check_image_files(paths, check_images, threads)
        texts, caption_problems = _usable_captions(captions, reasons)
        kept, skipped = tally_skipped(reasons, source)
        if caption_problems:
            log.warning(
                "%s: left out %d captions (%s)",
                source,
                sum(caption_problems.values()),
                ", ".join(f"{k}: {n}" for k, n in caption_problems.items()),
            )
        all_captions, text_to_image = [], []
        for image, number in enumerate(kept):
            all_captions += texts[number]
            text_to_image += [image] * len(texts[number])
        return cls(
            Images(ImageFiles(paths), kept, image_size, threads),
            all_captions,
            np.asarray(text_to_image, np.int32),
            skipped,
            caption_problems,
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
        root = os.path.dirname(os.path.abspath(path))
        grouped: dict[str, list[str]] = {}
        for image, caption in _csv_rows(
            path, (image_column, caption_column), separator
        ):
            grouped.setdefault(_join(root, image), []).append(caption)
        if not grouped:
            raise ValueError(f"CSV file {path!r} has no rows")
        source = f"csv:{path}"
        return cls._build(
            list(grouped),
            list(grouped.values()),
            source,
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
        paths, captions = _karpathy_images(path, image_root, split)
        source = f"karpathy:{path}[{split}]"
        return cls._build(
            paths, captions, source, image_size, num_examples, check_images, threads
        )


def _usable_captions(
    captions: Sequence[Sequence[Any]], reasons: list[str | None]
) -> tuple[list[list[str]], dict[str, int]]:
    """Each image's usable captions, and the captions left out by reason. An image
    left with no caption is marked 'missing_caption' in `reasons`."""
    problems: collections.Counter = collections.Counter()
    texts: list[list[str]] = []
    for number, raw_captions in enumerate(captions):
        good = []
        for raw in raw_captions:
            text, problem = caption_text(raw)
            if problem is not None:
                problems[problem] += 1
            elif reasons[number] is not None:
                problems["image_skipped"] += 1
            else:
                good.append(text)
        if reasons[number] is None and not good:
            reasons[number] = "missing_caption"  # nothing to retrieve it by
        texts.append(good)
    return texts, dict(sorted(problems.items()))


def _karpathy_images(
    path: str, image_root: str, split: str
) -> tuple[list[str], list[list[str]]]:
    """(image paths, their raw sentences) of `split` in a Karpathy split file."""
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
    return paths, captions
