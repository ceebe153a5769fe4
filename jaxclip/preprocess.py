"""Images for inference: OpenCLIP's resize and centre crop, and the rules for what an
encoder accepts.

- `Preprocess(S)`: any image (a path, a PIL image, an array) to `[S, S, 3]`: uint8 for
  uint8 input, float32 in [0, 1] for float input (resized in float, never rounded).
  The device normalises with the model's mean and std, as in training.
- `OpenCLIPPreprocess`: the same, returned as OpenCLIP's preprocess returns it: a
  normalised float32 `[3, S, S]` array, for code that moves over from OpenCLIP; encode
  its batches with `normalized=True`.
- `pixel_batch`: the one place that reads a batch array and says how to encode it.

Layouts: a 3-D image or 4-D batch is channels-last when its last axis has 1, 3 or 4
channels, else channels-first when the axis after the batch (or the first axis of one
image) has 1 or 3. Pixel values: uint8 is 0..255; float is [0, 1], or already
normalised when the caller says `normalized=True` (nothing is guessed from the values).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

ImageLike = Any  # a path, a PIL image, or an array [H, W], [H, W, C] or [C, H, W]

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
RESIZE_MODES = ("shortest", "squash")
PIXEL_KINDS = ("uint8", "unit", "normalized")  # what the encoder is given


def describe(value: Any) -> str:
    """'a float64 array of shape (4, 3, 224, 224)' or 'a str', for error messages."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"a {np.dtype(value.dtype).name} array of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def channels_last(array: np.ndarray, batch: bool) -> np.ndarray:
    """`array` (one image, or a batch when `batch`) with channels last; a 2-D image
    gets one channel. Refuses a shape that is neither layout, naming what came."""
    spatial = array.ndim - (1 if batch else 0)
    if spatial == 2 and not batch:
        return array[..., None]
    if spatial == 3:
        if array.shape[-1] in (1, 3, 4):
            return array
        first = 1 if batch else 0
        if array.shape[first] in (1, 3):
            return np.moveaxis(array, first, -1)
    want = "[n, H, W, C] or [n, C, H, W]" if batch else "[H, W], [H, W, C] or [C, H, W]"
    raise ValueError(
        f"an image {'batch' if batch else 'array'} must be {want} with C in 1, 3 (or "
        f"4 channels last); got {describe(array)}"
    )


def check_pixels(array: np.ndarray, normalized: bool = False) -> str:
    """The kind of pixels in `array` (see `PIXEL_KINDS`), or a clear refusal."""
    if normalized:
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"normalized=True needs float pixels (already (x - mean) / std); got "
                f"{describe(array)}"
            )
        return "normalized"
    if array.dtype == np.uint8:
        return "uint8"
    if array.dtype == np.bool_:
        return "bool"
    if np.issubdtype(array.dtype, np.floating):
        if array.size and not (array.min() >= 0 and array.max() <= 1):
            raise ValueError(
                f"float pixels must hold values in [0, 1] (got {describe(array)} with "
                "values in "
                f"[{array.min():.3g}, {array.max():.3g}]); if they are already "
                "normalised with the model's mean and std, pass normalized=True"
            )
        return "unit"
    raise ValueError(f"image arrays must be uint8 or float, not {describe(array)}")


class Geometry(NamedTuple):
    """Where one image goes: resized to `size` (width, height), then cropped to `box`."""

    size: tuple[int, int]
    box: tuple[int, int, int, int]


def geometry(width: int, height: int, side: int, resize_mode: str) -> Geometry:
    """torchvision's Resize(side) then CenterCrop(side), rounding as they do; or a
    squash to side x side."""
    if resize_mode == "squash":
        return Geometry((side, side), (0, 0, side, side))
    short, long = sorted((width, height))
    new_long = int(side * long / short)
    size = (side, new_long) if width <= height else (new_long, side)
    left = int(round((size[0] - side) / 2.0))
    top = int(round((size[1] - side) / 2.0))
    return Geometry(size, (left, top, left + side, top + side))


class Preprocess:
    """Image -> `[S, S, 3]`: resize and centre-crop as OpenCLIP does.

    uint8 images (paths, PIL images, uint8 arrays) give uint8; float arrays in [0, 1]
    give float32 in [0, 1], resized and cropped in float so nothing is rounded.
    `resize_mode="shortest"` scales the shorter side to S and crops the centre;
    `"squash"` resizes to S x S without keeping the aspect ratio. `interpolation` is
    "bicubic" (OpenAI's and most OpenCLIP models') or "bilinear".
    """

    def __init__(
        self,
        image_size: int,
        resize_mode: str = "shortest",
        interpolation: str = "bicubic",
    ):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"resize_mode={resize_mode!r}; expected one of {list(RESIZE_MODES)}"
            )
        if interpolation not in RESAMPLE:
            raise ValueError(
                f"interpolation={interpolation!r}; expected one of {sorted(RESAMPLE)}"
            )
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.interpolation = interpolation

    def __call__(self, image: ImageLike) -> np.ndarray:
        if not isinstance(image, (str, os.PathLike, Image.Image)):
            array = channels_last(np.asarray(image), batch=False)
            if check_pixels(array) == "unit":
                return self._float(array)
        return self._pil(to_pil(image))

    def _pil(self, image: Image.Image) -> np.ndarray:
        place = geometry(*image.size, self.image_size, self.resize_mode)
        resized = image.resize(place.size, RESAMPLE[self.interpolation])
        return np.asarray(resized.crop(place.box))

    def _float(self, array: np.ndarray) -> np.ndarray:
        """Float pixels `[H, W, C]` in [0, 1], each channel resized as a float image."""
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        height, width = array.shape[:2]
        place = geometry(width, height, self.image_size, self.resize_mode)
        channels = [
            Image.fromarray(np.ascontiguousarray(array[..., c], np.float32), mode="F")
            .resize(place.size, RESAMPLE[self.interpolation])
            .crop(place.box)
            for c in range(3)
        ]
        out = np.stack([np.asarray(c, np.float32) for c in channels], axis=-1)
        return np.clip(out, 0.0, 1.0)  # bicubic overshoots, as uint8 clamps

    def __repr__(self) -> str:
        return (
            f"Preprocess(image_size={self.image_size}, resize_mode={self.resize_mode!r}, "
            f"interpolation={self.interpolation!r})"
        )


class OpenCLIPPreprocess:
    """Image -> normalised float32 `[3, S, S]`, as OpenCLIP's preprocess returns it
    (a NumPy array rather than a torch tensor). Stack its outputs and encode them with
    `model.encode_image(variables, batch, normalized=True)`."""

    def __init__(
        self, preprocess: Preprocess, mean: Sequence[float], std: Sequence[float]
    ):
        self.preprocess = preprocess
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def __call__(self, image: ImageLike) -> np.ndarray:
        pixels = self.preprocess(image)
        if pixels.dtype == np.uint8:
            pixels = pixels.astype(np.float32) / np.float32(255)
        return ((pixels - self.mean) / self.std).transpose(2, 0, 1)

    def __repr__(self) -> str:
        return f"OpenCLIPPreprocess({self.preprocess!r}, mean, std)"


def to_pil(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, or a uint8 (or bool) array."""
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = channels_last(np.asarray(image), batch=False)
    if check_pixels(array) == "bool":
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        raise ValueError(f"to_pil takes uint8 or bool arrays, not {describe(array)}")
    if array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array).convert("RGB")


def is_single_image(images: Any) -> bool:
    """A path, a PIL image, or an array of one image (2-D or 3-D)."""
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return True
    return hasattr(images, "shape") and len(images.shape) in (2, 3)


def pixel_batch(
    images: Any, image_size: int, normalized: bool
) -> tuple[np.ndarray, str] | None:
    """A 4-D array that needs no preprocessing: (its NHWC pixels, their kind); None
    when `images` must go through `Preprocess` one image at a time.

    A batch at the model's size goes to the device as it is (uint8, float in [0, 1],
    or already normalised); a batch of another size is preprocessed per image, which
    an already-normalised batch cannot be.
    """
    if not hasattr(images, "shape") or len(images.shape) != 4:
        if normalized:
            raise ValueError(
                "normalized=True takes one array [n, S, S, 3] or [n, 3, S, S] of "
                f"S = {image_size} (what OpenCLIPPreprocess gives, stacked); got "
                f"{describe(images)}"
            )
        return None
    array = channels_last(np.asarray(images), batch=True)
    kind = check_pixels(array, normalized)
    if array.shape[1:] == (image_size, image_size, 3) and kind != "bool":
        return array, kind
    if normalized:
        raise ValueError(
            f"normalized pixels must already be {image_size} x {image_size} with 3 "
            f"channels; got {describe(images)}"
        )
    return None
