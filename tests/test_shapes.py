"""Tests for the built-in coloured-shapes demo data."""

import math

import numpy as np
import pytest

from jaxclip.data import shapes

# CSS colour keywords: a reference palette chosen without looking at the drawing
# code, so the colour check does not grade the code against its own constants.
CSS_RGB = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "white": (255, 255, 255),
    "orange": (255, 165, 0),
    "cyan": (0, 255, 255),
}
# The caption endings the demo promises, written out by hand.
POSITION_PHRASES = {
    "at the top left": "top left",
    "at the top right": "top right",
    "at the bottom left": "bottom left",
    "at the bottom right": "bottom right",
    "in the centre": "centre",
}


def foreground(image: np.ndarray, strength: float = 0.5) -> np.ndarray:
    """Mask [H, W] of pixels far from the image's median colour (its background)."""
    # The shape never covers half the image, so the median is background.
    pixels = image.astype(np.float64)
    background = np.median(pixels.reshape(-1, 3), axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    return distance > strength * distance.max()


def parse(caption: str) -> tuple[str, str, str, str]:
    """(size, colour, shape, position) of a caption 'a small red circle at the top left'."""
    article, size, colour, shape, *where = caption.split(" ")
    assert article == "a", caption
    return size, colour, shape, POSITION_PHRASES[" ".join(where)]


def test_vocabularies_and_class_names():
    assert 4 <= len(shapes.SHAPES) <= 5 and 5 <= len(shapes.COLOURS) <= 6
    assert set(shapes.COLOURS) <= set(CSS_RGB)
    assert shapes.SIZES == ("small", "large")
    assert set(shapes.POSITIONS) == set(POSITION_PHRASES.values())
    names = shapes.class_names()
    assert len(names) == len(set(names)) == shapes.NUM_CLASSES
    assert len(shapes.SHAPES) * len(shapes.COLOURS) == shapes.NUM_CLASSES
    for shape_id, shape in enumerate(shapes.SHAPES):
        for colour_id, colour in enumerate(shapes.COLOURS):
            assert (
                names[shape_id * len(shapes.COLOURS) + colour_id] == f"{colour} {shape}"
            )


@pytest.mark.parametrize("image_size", [16, 33, 48])
def test_keys_shapes_and_dtypes(image_size):
    for batch in (
        shapes.draw_batch(3, 1, 5, image_size),
        shapes.eval_set(3, 7, image_size),
    ):
        count = len(batch["captions"])
        assert set(batch) == {"images", "captions", "shape", "colour", "label"}
        assert batch["images"].shape == (count, image_size, image_size, 3)
        assert batch["images"].dtype == np.uint8
        assert all(isinstance(caption, str) for caption in batch["captions"])
        for key in ("shape", "colour", "label"):
            assert batch[key].shape == (count,) and batch[key].dtype == np.int32
    assert len(shapes.draw_batch(3, 1, 5, image_size)["captions"]) == 5
    assert len(shapes.eval_set(3, 7, image_size)["captions"]) == 7


def test_deterministic_and_independent_of_call_order():
    first = shapes.draw_batch(7, 11, 16, 32)
    shapes.draw_batch(7, 3, 16, 32)
    shapes.eval_set(7, 16, 32)
    again = shapes.draw_batch(7, 11, 16, 32)
    for key in ("images", "shape", "colour", "label"):
        np.testing.assert_array_equal(first[key], again[key])
    assert first["captions"] == again["captions"]
    np.testing.assert_array_equal(
        shapes.eval_set(7, 16, 32)["images"], shapes.eval_set(7, 16, 32)["images"]
    )
    for other in (shapes.draw_batch(7, 12, 16, 32), shapes.draw_batch(8, 11, 16, 32)):
        assert not np.array_equal(first["images"], other["images"])
        assert first["captions"] != other["captions"]


def test_eval_set_disjoint_from_training_draws():
    held_out = shapes.eval_set(0, 64, 32)["images"].reshape(64, -1)
    assert not np.array_equal(
        held_out, shapes.eval_set(1, 64, 32)["images"].reshape(64, -1)
    )
    for index in range(4):
        train = shapes.draw_batch(0, index, 64, 32)["images"].reshape(64, -1)
        same = (held_out[:, None, :] == train[None, :, :]).all(axis=-1)  # [eval, train]
        assert not same.any(), (
            f"an eval image repeats a training image of batch {index}"
        )


def test_eval_set_classes_balanced():
    labels = shapes.eval_set(0, 2 * shapes.NUM_CLASSES, 16)["label"]
    np.testing.assert_array_equal(np.bincount(labels, minlength=shapes.NUM_CLASSES), 2)


def test_labels_captions_and_templates_agree():
    batch = shapes.draw_batch(1, 0, 256, 16)
    names = shapes.class_names()
    np.testing.assert_array_equal(
        batch["label"], batch["shape"] * len(shapes.COLOURS) + batch["colour"]
    )
    assert batch["shape"].min() >= 0 and batch["shape"].max() < len(shapes.SHAPES)
    assert batch["colour"].min() >= 0 and batch["colour"].max() < len(shapes.COLOURS)
    seen = set()
    for caption, shape, colour, label in zip(
        batch["captions"], batch["shape"], batch["colour"], batch["label"]
    ):
        size, colour_word, shape_word, position = parse(caption)
        assert size in ("small", "large")
        assert colour_word == shapes.COLOURS[colour]
        assert shape_word == shapes.SHAPES[shape]
        # The zero-shot prompts must read exactly like the training captions.
        prompts = {
            template.format(names[label]) for template in shapes.ZEROSHOT_TEMPLATES
        }
        assert caption in prompts
        seen.add((size, position))
    assert len(seen) == len(shapes.SIZES) * len(shapes.POSITIONS)
    assert all(template.count("{}") == 1 for template in shapes.ZEROSHOT_TEMPLATES)


def test_drawn_colour_is_the_named_colour():
    batch = shapes.draw_batch(2, 0, 200, 32)
    palette_names = list(CSS_RGB)
    palette = np.array([CSS_RGB[name] for name in palette_names], np.float64)
    # Compared at full brightness: a shape's pixels are blended with the dark
    # background, which darkens yellow towards orange in plain RGB distance.
    palette /= palette.max(axis=1, keepdims=True)
    for image, colour, caption in zip(
        batch["images"], batch["colour"], batch["captions"]
    ):
        # The shape's core: edge pixels are blended with the background.
        mean_rgb = image[foreground(image, 0.8)].astype(np.float64).mean(axis=0)
        distance = np.linalg.norm(palette - mean_rgb / mean_rgb.max(), axis=-1)
        nearest = palette_names[distance.argmin()]
        assert nearest == shapes.COLOURS[colour], (caption, mean_rgb)


def test_position_and_size_match_caption():
    batch = shapes.eval_set(4, 240, 32)
    areas = {}  # (shape, size) -> foreground pixel counts
    for image, caption in zip(batch["images"], batch["captions"]):
        size, _, shape, position = parse(caption)
        mask = foreground(image)
        rows, cols = np.nonzero(mask)
        centre_y, centre_x = rows.mean() / 32, cols.mean() / 32
        if position == "centre":
            assert 0.4 < centre_x < 0.6 and 0.4 < centre_y < 0.6, caption
        else:
            vertical, horizontal = position.split(" ")
            assert (centre_y < 0.5) == (vertical == "top"), caption
            assert (centre_x < 0.5) == (horizontal == "left"), caption
        areas.setdefault((shape, size), []).append(mask.sum())
    for shape in shapes.SHAPES:
        assert max(areas[shape, "small"]) < min(areas[shape, "large"]), shape


def test_shapes_fill_their_bounding_box_as_geometry_predicts():
    # Large shapes at 96 px: enough pixels for the area ratios to show.
    batch = shapes.eval_set(5, 4 * shapes.NUM_CLASSES, 96)
    fills = {shape: [] for shape in shapes.SHAPES}
    for image, caption in zip(batch["images"], batch["captions"]):
        size, _, shape, _ = parse(caption)
        if size != "large":
            continue
        rows, cols = np.nonzero(foreground(image))
        box = foreground(image)[
            rows.min() : rows.max() + 1, cols.min() : cols.max() + 1
        ]
        fills[shape].append(box.mean())
        height, width = box.shape
        if shape == "triangle":  # pointing up: width grows linearly downwards
            row_widths = box.sum(axis=1) / width
            assert row_widths[: height // 4].mean() < 0.25
            assert row_widths[-(height // 4) :].mean() > 0.75
        if shape == "cross":  # full middle row and column, empty corners
            # (their end pixels are anti-aliased, so they may fall short)
            assert box[height // 2, 1:-1].all() and box[1:-1, width // 2].all()
            corner_h, corner_w = height // 4, width // 4
            for corner in (
                box[:corner_h, :corner_w],
                box[:corner_h, -corner_w:],
                box[-corner_h:, :corner_w],
                box[-corner_h:, -corner_w:],
            ):
                assert not corner.any()
    expected = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
    for shape, fill in expected.items():
        assert len(fills[shape]) >= 3
        np.testing.assert_allclose(fills[shape], fill, atol=0.05, err_msg=shape)


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: shapes.draw_batch(0, 0, 0, 32), "batch_size"),
        (lambda: shapes.draw_batch(0, 0, -4, 32), "batch_size"),
        (lambda: shapes.draw_batch(0, 0, 4, 15), "image_size"),
        (lambda: shapes.draw_batch(-1, 0, 4, 32), "seed"),
        (lambda: shapes.draw_batch(0, -1, 4, 32), "index"),
        (lambda: shapes.eval_set(0, 0, 32), "num_examples"),
        (lambda: shapes.eval_set(0, 8, 8), "image_size"),
    ],
)
def test_bad_arguments_are_refused_by_name(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()
