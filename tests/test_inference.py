"""The inference API: preprocessing, accepted inputs, batching, zero-shot helpers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from convert_util import random_variables, transformers_clip
from PIL import Image

import jaxclip
from jaxclip.data.transforms import OPENAI_MEAN, OPENAI_STD
from jaxclip.inference import Preprocess


@pytest.fixture(scope="module")
def tiny():
    """tiny-vit with batches of 4 (so 7 inputs take two batches, the last one padded)."""
    model = jaxclip.create_model("tiny-vit", batch_size=4)
    return model, model.init(seed=0)


def photos(count: int, seed: int = 0) -> list[np.ndarray]:
    """uint8 images of assorted sizes and aspect ratios."""
    rng = np.random.default_rng(seed)
    shapes = [(50, 70), (70, 50), (32, 32), (91, 40), (40, 120), (64, 64), (33, 33)]
    return [rng.integers(0, 256, (*shapes[i % 7], 3), np.uint8) for i in range(count)]


# ---------------------------------------------------------------------------
# Preprocessing.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(50, 70, 3), (70, 50, 3), (91, 40, 3), (20, 20, 4)])
def test_preprocess_matches_hf_image_processor(shape):
    """Against transformers' PIL CLIP image processor (shortest side, centre crop)."""
    transformers_clip()
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "CLIPImageProcessorPil"):
        pytest.skip("this transformers has no CLIPImageProcessorPil")
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=list(OPENAI_MEAN),
        image_std=list(OPENAI_STD),
    )
    image = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
    if shape[-1] == 4:
        image[..., 3] = 255  # opaque: RGBA -> RGB drops alpha in both
    expected = processor(images=image, return_tensors="np")["pixel_values"][0]
    ours = Preprocess(32)(image)
    assert ours.shape == (32, 32, 3) and ours.dtype == np.uint8
    normalised = (ours / np.float32(255) - np.float32(OPENAI_MEAN)) / np.float32(
        OPENAI_STD
    )
    np.testing.assert_allclose(normalised, expected.transpose(1, 2, 0), atol=1e-6)


def test_centre_crop_rounds_like_torchvision():
    # Short side already 32: no resize. The margin is 55, and torchvision's CenterCrop
    # starts at round(27.5) = 28 (OpenCLIP's preprocessing; HF floors to 27).
    columns = np.broadcast_to(np.arange(87, dtype=np.uint8)[None, :, None], (32, 87, 3))
    np.testing.assert_array_equal(Preprocess(32)(columns)[0, :, 0], np.arange(28, 60))
    squashed = Preprocess(32, resize_mode="squash")(columns)
    assert squashed.shape == (32, 32, 3) and squashed[0, 0, 0] < 3


def test_bad_images_are_refused():
    preprocess = Preprocess(32)
    with pytest.raises(ValueError, match=r"\[C, H, W\].*shape \(5, 40, 40\)"):
        preprocess(np.zeros((5, 40, 40), np.uint8))
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        preprocess(np.full((40, 40, 3), 2.0))
    with pytest.raises(ValueError, match="uint8 or float"):
        preprocess(np.zeros((40, 40, 3), np.int64))
    with pytest.raises(ValueError, match="resize_mode"):
        Preprocess(32, resize_mode="stretch")
    with pytest.raises(ValueError, match="interpolation"):
        Preprocess(32, interpolation="lanczos")


# ---------------------------------------------------------------------------
# Encoders: every accepted input gives the same embeddings; batching is invisible.
# ---------------------------------------------------------------------------


def test_image_inputs_agree(tiny, tmp_path):
    model, variables = tiny
    image = photos(1)[0]
    Image.fromarray(image).save(tmp_path / "photo.png")
    reference = model.encode_image(variables, image)
    assert reference.shape == (1, 64) and reference.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(reference, axis=-1), 1.0, rtol=1e-5)
    for same in (
        str(tmp_path / "photo.png"),
        tmp_path / "photo.png",
        Image.fromarray(image),
        [image],
        image.transpose(2, 0, 1),  # channels first
        model.preprocess(image)[None],  # already preprocessed uint8 [1, S, S, 3]
        model.preprocess(image)[None].transpose(0, 3, 1, 2),  # and channels first
    ):
        np.testing.assert_array_equal(model.encode_image(variables, same), reference)
    # Floats in [0, 1] are resized in float, not rounded to uint8 first: close to
    # the uint8 image's embedding (the pixels differ by bicubic's rounding), not equal.
    as_floats = model.encode_image(variables, image.astype(np.float64) / 255)
    np.testing.assert_allclose(as_floats, reference, atol=5e-3)
    grey = image[..., 0]
    np.testing.assert_array_equal(
        model.encode_image(variables, grey),
        model.encode_image(variables, np.repeat(grey[..., None], 3, axis=-1)),
    )


def test_batches_equal_one_at_a_time(tiny):
    model, variables = tiny
    images = photos(7)
    batched = model.encode_image(variables, images)  # batches of 4 and 3 (padded to 4)
    single = np.concatenate([model.encode_image(variables, image) for image in images])
    np.testing.assert_allclose(batched, single, atol=1e-6)
    texts = [f"a photo of a number {i}" for i in range(7)]
    batched = model.encode_text(variables, texts)
    single = np.concatenate([model.encode_text(variables, text) for text in texts])
    np.testing.assert_allclose(batched, single, atol=1e-6)
    tokens = model.tokenizer(texts)
    np.testing.assert_array_equal(model.encode_text(variables, tokens), batched)
    raw = model.encode_text(variables, texts, normalize=False)
    np.testing.assert_allclose(
        raw / np.linalg.norm(raw, axis=-1, keepdims=True), batched, atol=1e-6
    )
    assert model.encode_image(variables, []).shape == (0, 64)
    with pytest.raises(ValueError, match=r"token ids must be \[n, 16\]"):
        model.encode_text(variables, np.zeros((2, 77), np.int32))


# ---------------------------------------------------------------------------
# Zero-shot helpers against a direct computation from the embeddings.
# ---------------------------------------------------------------------------


def test_zero_shot_classifier_and_probabilities(tiny):
    model, variables = tiny
    images = photos(3)
    classes = ["cat", "dog", "car", "tree"]
    templates = ["a photo of a {}.", "a drawing of a {}."]
    classifier = model.zero_shot_classifier(variables, classes, templates)
    prompts = [t.format(c) for c in classes for t in templates]
    per_prompt = (
        model.encode_text(variables, prompts).astype(np.float64).reshape(4, 2, -1)
    )
    mean = per_prompt.mean(axis=1)
    np.testing.assert_allclose(
        classifier, mean / np.linalg.norm(mean, axis=-1, keepdims=True), atol=1e-6
    )

    probs = model.classify(variables, images, classes, templates)
    logits = np.exp(np.float64(variables["params"]["logit_scale"])) * (
        model.encode_image(variables, images) @ classifier.T
    )
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    assert probs.shape == (3, 4)
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    np.testing.assert_allclose(
        model.classify(variables, images, classifier), probs, atol=1e-7
    )

    texts = ["a photo of a cat", "a photo of a dog"]
    probs = model.predict(variables, images, texts)
    logits = np.exp(np.float64(variables["params"]["logit_scale"])) * (
        model.encode_image(variables, images) @ model.encode_text(variables, texts).T
    )
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(
        probs, expected / expected.sum(-1, keepdims=True), atol=1e-6
    )


def test_siglip_models_give_independent_sigmoids():
    config = jaxclip.get_model_config("tiny-vit")
    model = jaxclip.create_model(config, logit_bias=True)
    variables = random_variables(config, seed=1, logit_bias=True)
    images = photos(2)
    probs = model.predict(variables, images, ["a", "b", "c"])
    params = variables["params"]
    logits = np.exp(np.float64(params["logit_scale"])) * (
        model.encode_image(variables, images)
        @ model.encode_text(variables, ["a", "b", "c"]).T
    ) + np.float64(params["logit_bias"])
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits)), atol=1e-6)


def test_create_model_accepts_names_and_configs():
    assert jaxclip.create_model("ViT-B-32").image_size == 224
    config = dataclasses.replace(jaxclip.get_model_config("tiny-vit"), embed_dim=32)
    assert jaxclip.create_model(config).config.embed_dim == 32
    with pytest.raises(ValueError, match="not a registered architecture"):
        jaxclip.create_model("ViT-Z-1")
