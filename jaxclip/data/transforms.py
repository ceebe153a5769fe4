"""Image transforms. Images stay uint8 on the host; the device normalises them.

Host side, per sample: decode with PIL (JPEGs in draft mode, i.e. at a reduced DCT
scale when the crop allows it), pick a crop box, and resize that box to the square
output size in one step (`Image.resize(box=...)`), so only the pixels that survive
are resampled. Crops:

- `random_square`: the CLIP paper's training augmentation, a random square crop of
  the image resized along its short side (a square of side = short side, at a random
  offset, resized to the output size).
- `random_resized`: OpenCLIP's `RandomResizedCrop(scale=(0.9, 1.0))`, torchvision's
  algorithm with area fraction `scale` and aspect ratio in [3/4, 4/3].
- `center`: evaluation, resize along the short side and take the centre square.
"""

from __future__ import annotations

import dataclasses
import io
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

# OpenAI CLIP's pixel statistics (RGB, on the 0..1 scale).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP-style normalisation to [-1, 1]

CROPS = ("random_square", "random_resized", "center")
# PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS), our default.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

Box = tuple[float, float, float, float]  # left, top, right, bottom, in pixels


def normalize_images(
    images: jax.Array,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
    dtype: jnp.dtype = jnp.float32,
    scale: float = 255.0,
) -> jax.Array:
    """uint8 [batch, H, W, 3] -> float (pixels / 255 - mean) / std, on the device.

    `scale=1.0` takes float pixels in [0, 1] instead.
    """
    pixels = images.astype(jnp.float32) / scale
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return ((pixels - mean) / std).astype(dtype)


def center_box(width: int, height: int) -> Box:
    """The centred square of side min(width, height)."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def random_square_box(width: int, height: int, rng: np.random.Generator) -> Box:
    """A square of side min(width, height) at a uniformly random integer offset."""
    side = min(width, height)
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    return (left, top, left + side, top + side)


def random_resized_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """torchvision's RandomResizedCrop.get_params: a box of random area and aspect."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return (left, top, left + crop_width, top + crop_height)
    # Fallback: the whole image, its aspect ratio clamped to `ratio`, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_width, crop_height = int(round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return (left, top, left + crop_width, top + crop_height)


class BadImage(Exception):
    """An image that cannot be used; `reason` is one of sources.BAD_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def crop_box(
    crop: str,
    width: int,
    height: int,
    rng: np.random.Generator | None = None,
    crop_scale: tuple[float, float] = (0.9, 1.0),
) -> Box:
    """The box that `crop` (one of CROPS) takes from a width x height image."""
    if crop == "random_square":
        return random_square_box(width, height, rng)
    if crop == "random_resized":
        return random_resized_box(width, height, rng, crop_scale)
    if crop == "center":
        return center_box(width, height)
    raise ValueError(f"crop={crop!r}; expected one of {list(CROPS)}")


def decode_crop_resize(
    data: bytes | np.ndarray,
    size: int,
    crop: str,
    rng: np.random.Generator | None = None,
    crop_scale: tuple[float, float] = (0.9, 1.0),
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Encoded image (or uint8 [H, W, 3]) -> cropped uint8 [size, size, 3].

    Raises BadImage('not_an_image' | 'decompression_bomb' | 'corrupt_image').
    """
    if isinstance(data, np.ndarray):
        image, (height, width) = None, data.shape[:2]
    else:
        image = _open(data)
        width, height = image.size
    if width * height > max_image_pixels:
        raise BadImage("decompression_bomb")
    if width < 1 or height < 1:
        raise BadImage("corrupt_image")
    box = crop_box(crop, width, height, rng, crop_scale)
    if image is None:
        already = data.shape == (size, size, 3) and data.dtype == np.uint8
        if already and box == (0, 0, size, size):
            return data  # already the output (the drawn shapes): nothing to do
        image = Image.fromarray(data)
    if box == (0, 0, size, size) and image.size == (size, size) and image.mode == "RGB":
        return np.asarray(image)  # already the output: nothing to resample
    try:
        if image.format == "JPEG":
            box = _draft(image, box, size)
        if image.mode != "RGB":
            image = image.convert("RGB")  # grey, palette, CMYK; alpha is dropped
        resized = image.resize(
            (size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0
        )
        return np.asarray(resized)
    except Image.DecompressionBombError:
        raise BadImage("decompression_bomb") from None
    except Exception:  # truncated data, broken streams: PIL raises many types
        raise BadImage("corrupt_image") from None


# How the formats PIL reads for jaxclip begin: bytes that start like an image but
# that PIL cannot open are a damaged image (cut off inside its header), not another
# kind of file.
IMAGE_SIGNATURES = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
)


def unreadable_reason(data: bytes) -> str:
    """Why PIL could not open `data`: 'corrupt_image' when it starts like an image
    (e.g. a JPEG truncated inside its header), else 'not_an_image'."""
    head = bytes(data[:12])
    webp = head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    return (
        "corrupt_image" if webp or head.startswith(IMAGE_SIGNATURES) else "not_an_image"
    )


def _open(data: bytes) -> Image.Image:
    """The image's header, read (BadImage if it is not an image or a bomb)."""
    try:
        return Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise BadImage("decompression_bomb") from None
    except Exception:  # UnidentifiedImageError, or a header PIL chokes on
        raise BadImage(unreadable_reason(data)) from None


def _draft(image: Image.Image, box: Box, size: int) -> Box:
    """Set a JPEG to decode at a reduced DCT scale; returns `box` at that scale.

    Draft mode decodes at 1/2, 1/4 or 1/8 scale, which PIL only picks while the
    result stays at least the requested size: ask for the size at which the crop box
    still covers `size` pixels.
    """
    width, height = image.size
    scale = size / min(box[2] - box[0], box[3] - box[1])
    if scale >= 1:
        return box
    image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    scale_x, scale_y = image.size[0] / width, image.size[1] / height
    return (
        box[0] * scale_x,
        box[1] * scale_y,
        min(box[2] * scale_x, image.size[0]),
        min(box[3] * scale_y, image.size[1]),
    )


@dataclasses.dataclass(frozen=True)
class ImageTextTransform:
    """A raw record -> {'key', 'image' uint8 [size, size, 3], 'caption'} or a reason.

    Used with grain's `random_map`, which passes a generator seeded by the pipeline
    seed and the sample's position, so the crops are the same on every run.
    """

    image_size: int
    crop: str = "random_square"
    crop_scale: tuple[float, float] = (0.9, 1.0)
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict:
        key = record["key"]
        if record.get("error"):
            return {"key": key, "error": record["error"]}
        caption, reason = caption_text(record.get("caption"))
        if reason is None and record.get("image") is None:
            reason = "missing_image"
        if reason is not None:
            return {"key": key, "error": reason}
        _quiet_pil_bomb_warning()
        try:
            image = decode_crop_resize(
                record["image"],
                self.image_size,
                self.crop,
                rng,
                self.crop_scale,
                self.max_image_pixels,
            )
        except BadImage as bad:
            return {"key": key, "error": bad.reason}
        return {"key": key, "image": image, "caption": caption}


def caption_text(caption: bytes | str | None) -> tuple[str, str | None]:
    """(caption as text, None), or ('', reason) when it cannot be used."""
    if caption is None:
        return "", "missing_caption"
    if isinstance(caption, np.ndarray):  # tfds may hand back 0-d arrays
        caption = caption.item()
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            return "", "bad_caption_encoding"
    try:
        caption.encode("utf-8")  # CSV rows keep undecodable bytes as surrogates
    except UnicodeEncodeError:
        return "", "bad_caption_encoding"
    if not caption.strip():
        return "", "empty_caption"
    return caption, None


_PIL_WARNING_SILENCED = False


def _quiet_pil_bomb_warning() -> None:
    """Our max_image_pixels check replaces PIL's warning (once per process; a
    `catch_warnings` block per image would not be thread-safe)."""
    global _PIL_WARNING_SILENCED
    if not _PIL_WARNING_SILENCED:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _PIL_WARNING_SILENCED = True
