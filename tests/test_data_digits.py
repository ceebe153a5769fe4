"""scikit-learn's handwritten digits as a training source: the fixed stratified split,
images against an independent upsampling, captions against sklearn's labels, and the
grain pipeline's batches and exact resumption from the config."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from jaxclip.config import ConfigError, base_config, validate_config
from jaxclip.data import digits
from jaxclip.data.pipeline import make_train_iterator

sklearn_datasets = pytest.importorskip("sklearn.datasets")

# Written out by hand rather than read from the module under test.
WORDS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
}


@pytest.fixture(scope="module")
def reference():
    """sklearn's own arrays: images float64 [1797, 8, 8] in 0..16, target [1797]."""
    loaded = sklearn_datasets.load_digits()
    return loaded.images, loaded.target


def bilinear(grey: np.ndarray, size: int) -> np.ndarray:
    """float64 [h, w] -> [size, size]: half-pixel centres, edges clamped (upsampling)."""

    def weights(length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        at = np.clip((np.arange(size) + 0.5) * length / size - 0.5, 0, length - 1)
        low = np.floor(at).astype(int)
        return low, np.minimum(low + 1, length - 1), at - low

    top, bottom, fy = weights(grey.shape[0])
    left, right, fx = weights(grey.shape[1])
    rows = grey[top] * (1 - fy)[:, None] + grey[bottom] * fy[:, None]
    return rows[:, left] * (1 - fx) + rows[:, right] * fx


def record_index(record: dict) -> int:
    """The sklearn index named by a record's key 'digits:<index>'."""
    prefix, index = record["key"].split(":")
    assert prefix == "digits"
    return int(index)


def test_split_is_stratified_disjoint_and_fixed(reference):
    images, target = reference
    train, test = digits.split_indices("train"), digits.split_indices("test")
    assert (len(train), len(test)) == (1438, 359)
    assert np.intersect1d(train, test).size == 0
    np.testing.assert_array_equal(np.union1d(train, test), np.arange(len(target)))
    # Stratified: each digit holds out 20% of its scans, to within rounding.
    per_digit = np.bincount(target, minlength=10)
    held = np.bincount(target[test], minlength=10)
    assert np.all(np.abs(held - 0.2 * per_digit) <= 0.5), held
    # No held-out image is in train, by pixels (the dataset has no duplicates).
    train_pixels = {images[i].tobytes() for i in train}
    assert not any(images[i].tobytes() in train_pixels for i in test)
    # The held-out set never changes: pinned indices, and no seed to pass.
    np.testing.assert_array_equal(test[:5], [0, 19, 32, 35, 41])
    assert int(test.sum()) == 340_762


def test_sources_hold_their_split_in_order(reference):
    _, target = reference
    for split in ("train", "test"):
        source = digits.DigitsSource(split, 8)
        indices = [record_index(source[i]) for i in range(len(source))]
        np.testing.assert_array_equal(indices, digits.split_indices(split))
    with pytest.raises(ValueError, match="digits split 'val'"):
        digits.DigitsSource("val", 8)


@pytest.mark.parametrize("image_size", [8, 16, 28])
def test_image_matches_an_independent_bilinear_upsampling(reference, image_size):
    images, _ = reference
    source = digits.DigitsSource("train", image_size)
    for position in (0, 1, 700, len(source) - 1):
        record = source[position]
        image = record["image"]
        assert image.dtype == np.uint8 and image.shape == (image_size, image_size, 3)
        assert record["error"] is None
        for channel in (1, 2):  # grey, replicated to RGB
            np.testing.assert_array_equal(image[..., channel], image[..., 0])
        scan = images[record_index(record)] * (255 / 16)  # float64, 0..255
        want = bilinear(scan, image_size)
        # PIL rounds the scaled levels, its horizontal pass and its output to
        # uint8: at most 0.5 each.
        np.testing.assert_allclose(image[..., 0], want, atol=1.5)
        assert np.mean(np.abs(image[..., 0] - want)) < 0.5
    # The darkest and brightest levels map to 0 and 255.
    full = digits.DigitsSource("train", 8)
    pixels = np.stack([full[i]["image"] for i in range(50)])
    assert pixels.min() == 0 and pixels.max() == 255


def test_captions_name_the_right_digit_and_vary(reference):
    _, target = reference
    templates_seen = set()
    for split in ("train", "test"):
        source = digits.DigitsSource(split, 8)
        again = digits.DigitsSource(split, 16)  # a new source, another size
        for position in range(len(source)):
            record = source[position]
            caption = record["caption"]
            named = [WORDS[word] for word in caption.split() if word in WORDS]
            assert named == [target[record_index(record)]], caption
            assert again[position]["caption"] == caption  # a function of the index
            templates_seen.add(caption.rsplit(" ", 1)[0])
    assert len(templates_seen) >= 4, templates_seen
    assert digits.class_names() == list(WORDS)
    for template in digits.ZEROSHOT_TEMPLATES:
        assert template.count("{}") == 1
        assert not set(template.split()) & set(WORDS)


def test_held_out_is_the_test_split(reference):
    _, target = reference
    held = digits.held_out(16)
    source = digits.DigitsSource("test", 16)
    assert held["images"].shape == (359, 16, 16, 3) and held["images"].dtype == np.uint8
    assert held["label"].shape == (359,)
    np.testing.assert_array_equal(held["label"], target[digits.split_indices("test")])
    for position in (0, 100, 358):
        np.testing.assert_array_equal(
            held["images"][position], source[position]["image"]
        )


def digits_config(**data_fields):
    config = base_config()
    config.model.name = "tiny-vit"
    config.data.source = "digits"
    config.train.batch_size = 8
    config.data.threads = 1
    config.data.prefetch = 0
    for name, value in data_fields.items():
        config.data[name] = value
    return config


def test_train_iterator_gives_batches_and_resumes_exactly():
    image_size, context_length = 16, 16
    config = digits_config(crop="random_resized")

    def fresh():
        return make_train_iterator(config, image_size, context_length, with_keys=True)

    train_keys = {f"digits:{i}" for i in digits.split_indices("train")}
    first = fresh()
    try:
        started = [next(first) for _ in range(2)]
        state = json.loads(json.dumps(first.get_state()))  # as the checkpoint stores it
        expected = [next(first) for _ in range(2)]
    finally:
        first.close()
    for batch in started + expected:
        assert batch["images"].shape == (8, image_size, image_size, 3)
        assert batch["images"].dtype == np.uint8
        assert batch["tokens"].shape == (8, context_length)
        assert batch["tokens"].dtype == np.int32
        assert {str(key) for key in batch["keys"]} <= train_keys
    assert state["source"] == "digits"
    resumed = fresh()
    try:
        resumed.set_state(state)
        rest = [next(resumed) for _ in range(2)]
    finally:
        resumed.close()
    for got, want in zip(rest, expected):
        np.testing.assert_array_equal(got["keys"], want["keys"])
        np.testing.assert_array_equal(got["images"], want["images"])
        np.testing.assert_array_equal(got["tokens"], want["tokens"])


def test_config_accepts_digits_alone_and_in_a_mix(monkeypatch):
    validate_config(digits_config())
    validate_config(digits_config(source="mix", mix=(("digits", "", 1.0),)))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install scikit-learn"):
        validate_config(digits_config())


def test_missing_scikit_learn_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install scikit-learn"):
        digits.load_raw.__wrapped__()  # past the cache of the real load
