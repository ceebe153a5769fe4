"""Decoding and crops (against plain PIL/NumPy references), caption checks, and the
device-side normalisation (against NumPy in float64)."""

from __future__ import annotations

import io
import math

import jax.numpy as jnp
import numpy as np
import pytest
from data_util import encode_image
from PIL import Image

from jaxclip.data import transforms
from jaxclip.data.transforms import (
    BadImage,
    ImageTextTransform,
    caption_text,
    decode_crop_resize,
    random_resized_box,
    random_square_box,
)


def coordinate_image(width: int, height: int) -> np.ndarray:
    """uint8 [H, W, 3]: red encodes x, green encodes y (as fractions of 250)."""
    x = np.linspace(0, 250, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 250, height)[:, None].repeat(width, 1)
    return np.stack([x, y, np.full_like(x, 128)], -1).round().astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(
        buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {})
    )
    return buffer.getvalue()


def reference_resize_then_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """torchvision-style eval transform in plain PIL: Resize(short side) + CenterCrop."""
    image = Image.fromarray(pixels)
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize(
        (round(width * scale), round(height * scale)), Image.Resampling.BICUBIC
    )
    left = round((resized.size[0] - size) / 2)
    top = round((resized.size[1] - size) / 2)
    return np.asarray(resized.crop((left, top, left + size, top + size)))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("width, height", [(320, 200), (150, 400), (40, 30)])
def test_center_crop_matches_resize_then_centre_crop(fmt, width, height):
    pixels = coordinate_image(width, height)
    expected = reference_resize_then_crop(pixels, 64)
    got = decode_crop_resize(encode(pixels, fmt), 64, "center")
    assert got.dtype == np.uint8 and got.shape == (64, 64, 3)
    difference = np.abs(got.astype(int) - expected.astype(int))
    # JPEG draft mode decodes the 320 px side at a reduced DCT scale; PNG is exact
    # up to where the centre falls between pixels.
    assert difference[..., :2].mean() < (2.0 if fmt == "JPEG" else 1.0)
    assert difference[4:-4, 4:-4, :2].max() <= (8 if fmt == "JPEG" else 4)


def test_draft_mode_decodes_large_jpegs_at_reduced_scale(monkeypatch):
    pixels = coordinate_image(1024, 800)
    data = encode(pixels)
    sizes = []
    original_resize = Image.Image.resize

    def recording_resize(self, size, *args, **kwargs):
        sizes.append(self.size)
        return original_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    got = decode_crop_resize(data, 64, "center")
    # 800 px short side, 64 px out: the 1/8 scale (100 px) still covers the crop.
    assert sizes == [(128, 100)]
    expected = reference_resize_then_crop(pixels, 64)
    assert np.abs(got.astype(int) - expected.astype(int))[..., :2].mean() < 2.0


def test_random_square_crop_is_a_full_height_square():
    rng = np.random.default_rng(0)
    lefts = set()
    for _ in range(200):
        left, top, right, bottom = random_square_box(300, 200, rng)
        assert top == 0 and bottom == 200 and right - left == 200
        assert 0 <= left <= 100
        lefts.add(left)
    assert min(lefts) < 10 and max(lefts) > 90  # the offset spans the range
    assert random_square_box(50, 120, rng)[0::2] == (0, 50)


def test_random_square_crop_pixels_come_from_the_box():
    pixels = coordinate_image(300, 100)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    left, top, right, bottom = random_square_box(300, 100, rng_a)
    got = decode_crop_resize(encode(pixels, "PNG"), 50, "random_square", rng_b)
    # Red encodes x: the output spans exactly the box's x range.
    x_of_red = got[..., 0].astype(float) / 250 * 299
    assert abs(x_of_red[:, 0].mean() - (left + 1)) < 3
    assert abs(x_of_red[:, -1].mean() - (right - 2)) < 3


def test_random_resized_box_follows_scale_and_ratio():
    rng = np.random.default_rng(1)
    for _ in range(300):
        left, top, right, bottom = random_resized_box(400, 300, rng, (0.9, 1.0))
        width, height = right - left, bottom - top
        assert left >= 0 and right <= 400 and top >= 0 and bottom <= 300
        # Rounding the sides moves area and aspect by at most a pixel's worth.
        assert 0.9 * 0.99 <= width * height / (400 * 300) <= 1.0
        assert 3 / 4 * 0.99 <= width / height <= 4 / 3 * 1.01
    # Too elongated for any box of that area and aspect: the clamped centre crop.
    assert random_resized_box(1000, 50, rng, (0.9, 1.0)) == (466, 0, 533, 50)


def test_bad_images_raise_their_reason():
    good = encode_image((10, 20, 30), 80, 60)
    with pytest.raises(BadImage, match="not_an_image"):
        decode_crop_resize(b"this is a caption, not a picture", 32, "center")
    # Cut in the entropy-coded data, after the header: identified, fails to decode.
    noisy = encode(coordinate_image(400, 300) ^ np.uint8(37))
    with pytest.raises(BadImage, match="corrupt_image"):
        decode_crop_resize(noisy[: len(noisy) * 2 // 3], 32, "center")
    # Cut inside the header (the docs' "truncated"): PIL cannot even identify it,
    # but it starts as a JPEG (or PNG) does, so it is a damaged image.
    png = io.BytesIO()
    Image.fromarray(coordinate_image(40, 30)).save(png, "PNG")
    for cut in (good[:300], good[:4], png.getvalue()[:20]):
        with pytest.raises(BadImage, match="corrupt_image"):
            decode_crop_resize(cut, 32, "center")
    with pytest.raises(BadImage, match="decompression_bomb"):
        decode_crop_resize(good, 32, "center", max_image_pixels=80 * 60 - 1)
    assert decode_crop_resize(good, 32, "center", max_image_pixels=80 * 60).shape == (
        32,
        32,
        3,
    )


def test_modes_are_converted_to_rgb():
    grey = encode(np.full((20, 30), 77, np.uint8), "PNG")
    np.testing.assert_array_equal(decode_crop_resize(grey, 8, "center"), 77)
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (200, 100, 50), 0
    np.testing.assert_array_equal(
        decode_crop_resize(encode(rgba, "PNG"), 8, "center")[0, 0], (200, 100, 50)
    )


def test_caption_checks():
    assert caption_text(b"a cat") == ("a cat", None)
    assert caption_text("une t\u00eate") == ("une t\u00eate", None)
    assert caption_text(None) == ("", "missing_caption")
    assert caption_text(b" \n\t") == ("", "empty_caption")
    assert caption_text(b"caf\xe9") == ("", "bad_caption_encoding")  # Latin-1
    assert caption_text(b"caf\xe9".decode("utf-8", "surrogateescape")) == (
        "",
        "bad_caption_encoding",
    )


def test_transform_is_deterministic_in_the_rng_and_reports_reasons():
    transform = ImageTextTransform(16, "random_resized")
    record = {"key": "k", "image": encode(coordinate_image(90, 60)), "caption": b"x"}
    first = transform(record, np.random.default_rng(3))
    again = transform(record, np.random.default_rng(3))
    np.testing.assert_array_equal(first["image"], again["image"])
    assert first["caption"] == "x" and first["key"] == "k"
    assert transform({**record, "caption": None}, None) == {
        "key": "k",
        "error": "missing_caption",
    }
    assert transform({**record, "image": None}, None)["error"] == "missing_image"
    assert transform({**record, "error": "read_error"}, None)["error"] == "read_error"


@pytest.mark.parametrize(
    "mean, std", [(transforms.OPENAI_MEAN, transforms.OPENAI_STD), ((0.5,) * 3,) * 2]
)
def test_device_normalisation_matches_float64(mean, std):
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 3), dtype=np.uint8)
    expected = (images.astype(np.float64) / 255 - np.array(mean)) / np.array(std)
    got = transforms.normalize_images(jnp.asarray(images), mean, std)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)
    assert math.isclose(float(got.max()), float(expected.max()), rel_tol=1e-5)
