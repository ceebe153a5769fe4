"""Real images for a small CLIP: scikit-learn's bundled handwritten digits.

`sklearn.datasets.load_digits` ships 1,797 scans of handwritten digits (UCI "Optical
Recognition of Handwritten Digits"): 8x8 pixels, 17 grey levels (0 = paper,
16 = ink), about 180 per digit, inside the scikit-learn wheel, so nothing is
downloaded. scikit-learn is imported only when the data is first needed.

The split is fixed and stratified: the held-out `test` split is 20% of each digit
(rounded half up: 35 to 37 per digit, 359 images), `train` the other 1,438. Which
images are held out depends only on `_SPLIT_SEED`, never on the training seed, so
every run evaluates on the same images.

An image is the scan's grey levels scaled to 0..255 (round(level * 255 / 16)),
upsampled to the model's size with PIL's bilinear filter and copied to the three
RGB channels: white digits on black. Bilinear rather than bicubic (the crops'
filter): bicubic overshoots at the scans' steep 8-pixel steps, and bilinear keeps
every pixel between the levels of the scan pixels around it.

A caption names the digit in words, in one of `CAPTION_TEMPLATES` ("a handwritten
digit seven"); which template is a function of the scan's index in the dataset
alone, so a caption never changes between epochs, runs or processes.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from PIL import Image

DIGIT_NAMES: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
NUM_CLASSES = len(DIGIT_NAMES)
SPLITS: tuple[str, ...] = ("train", "test")
TEST_FRACTION = 0.2
GREY_LEVELS = 16  # the scans' levels run 0..16
# None of the templates' own words is a digit name, so a caption names exactly one.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of the number {}",
    "a handwritten digit {}",
    "the number {} written by hand",
    "a scan of a handwritten {}",
    "a low resolution image of the digit {}",
)
# The zero-shot prompts are the training captions themselves, so the classifier's
# ensemble reads exactly the sentences the text tower was trained on.
ZEROSHOT_TEMPLATES: tuple[str, ...] = CAPTION_TEMPLATES

# Fixed for good: changing either changes the held-out set or every caption.
# SeedSequence's hash is specified by NumPy (not a Generator stream), so the split
# and the captions are the same on every NumPy version.
_SPLIT_SEED = 1797
_CAPTION_SEED = 1798


def class_names() -> list[str]:
    """Zero-shot class names ('zero', ..., 'nine'), ordered by label."""
    return list(DIGIT_NAMES)


@functools.cache
def load_raw() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 scans: grey levels uint8 [n, 8, 8] in 0..16, labels int32 [n]."""
    try:
        from sklearn.datasets import load_digits  # optional dependency
    except ImportError:
        raise ImportError(
            "data.source='digits' needs scikit-learn: pip install scikit-learn "
            "(or pip install 'jaxclip[digits]')"
        ) from None
    digits = load_digits()
    levels = digits.images.astype(np.uint8)  # float64 holding whole numbers 0..16
    levels.setflags(write=False)
    labels = digits.target.astype(np.int32)
    labels.setflags(write=False)
    return levels, labels


@functools.cache
def split_indices(split: str) -> np.ndarray:
    """Dataset indices (int64, ascending) of `split`: 'train' (1,438) or 'test' (359)."""
    if split not in SPLITS:
        raise ValueError(f"digits split {split!r}; expected one of {list(SPLITS)}")
    _, labels = load_raw()
    # One fixed pseudo-random key per scan; each digit holds out its lowest keys.
    keys = np.random.SeedSequence(_SPLIT_SEED).generate_state(len(labels), np.uint64)
    held_out = np.zeros(len(labels), bool)
    for digit in range(NUM_CLASSES):
        members = np.flatnonzero(labels == digit)
        count = int(np.floor(len(members) * TEST_FRACTION + 0.5))
        held_out[members[np.argsort(keys[members], kind="stable")[:count]]] = True
    indices = np.flatnonzero(held_out if split == "test" else ~held_out)
    indices.setflags(write=False)
    return indices


@functools.cache
def _template_ids() -> np.ndarray:
    """The caption template of every scan, int [n], by dataset index."""
    _, labels = load_raw()
    keys = np.random.SeedSequence(_CAPTION_SEED).generate_state(len(labels), np.uint64)
    return (keys % len(CAPTION_TEMPLATES)).astype(np.int32)


def render(levels: np.ndarray, image_size: int) -> np.ndarray:
    """Grey levels uint8 [8, 8] in 0..16 -> uint8 [image_size, image_size, 3]."""
    scaled = (levels.astype(np.uint16) * 255 + GREY_LEVELS // 2) // GREY_LEVELS
    grey = Image.fromarray(scaled.astype(np.uint8))  # mode 'L'
    if grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.repeat(np.asarray(grey)[:, :, None], 3, axis=2)


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int | np.integer) or image_size < 1:
        raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")


class DigitsSource:
    """The scans of one split, one record per index, for the grain pipeline.

    A finite source: the pipeline shuffles it anew each epoch and repeats it. Records
    are {'key': 'digits:<dataset index>', 'image': uint8 [S, S, 3], 'caption': str,
    'error': None}; the image is already at the output size, so a square crop of it
    is the whole image and only `random_resized` crops change it.
    """

    infinite = False

    def __init__(self, split: str, image_size: int):
        _check_image_size(image_size)
        self.split, self.image_size = split, int(image_size)
        self.indices = split_indices(split)  # dataset index of each record
        levels, labels = load_raw()
        # Copies of this split's rows only: a few hundred kB in each worker process.
        self.levels = levels[self.indices]  # uint8 [n, 8, 8]
        self.labels = labels[self.indices]  # int32 [n]
        self.template_ids = _template_ids()[self.indices]  # int32 [n]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        template = CAPTION_TEMPLATES[int(self.template_ids[index])]
        return {
            "key": f"digits:{int(self.indices[index])}",
            "image": render(self.levels[index], self.image_size),
            "caption": template.format(DIGIT_NAMES[int(self.labels[index])]),
            "error": None,
        }


def labelled(split: str, image_size: int) -> dict[str, np.ndarray]:
    """One split's scans as 'images' uint8 [n, S, S, 3] and 'label' int32 [n], in
    dataset order (for evaluation: zero-shot on 'test', a linear probe fit on 'train')."""
    _check_image_size(image_size)
    levels, labels = load_raw()
    indices = split_indices(split)
    images = np.stack([render(levels[i], image_size) for i in indices])
    return {"images": images, "label": labels[indices].copy()}


def held_out(image_size: int) -> dict[str, np.ndarray]:
    """The test split for zero-shot evaluation: 'images' uint8 [359, S, S, 3] and
    'label' int32 [359], in dataset order."""
    return labelled("test", image_size)
