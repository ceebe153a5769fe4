"""What `encode_image` accepts, as an OpenCLIP or HF user passes it: float and
normalised batches, either layout, OpenCLIP's preprocess form; and the shared encoders.

References: the module applied directly to pixels normalised in NumPy float64, and
transformers' CLIP image processor."""

from __future__ import annotations

import numpy as np
import pytest
from convert_util import transformers_clip
from PIL import Image

import jaxclip
from jaxclip.data.transforms import OPENAI_MEAN, OPENAI_STD

SIZE = 32  # tiny-vit's image size


@pytest.fixture(scope="module")
def tiny():
    model = jaxclip.create_model("tiny-vit", batch_size=4)
    return model, model.init(seed=0)


def direct_embeddings(model, variables, unit_pixels: np.ndarray) -> np.ndarray:
    """Unit-norm embeddings of float pixels in [0, 1], `[n, S, S, 3]`, normalised in
    float64 and passed to the Flax module as they are."""
    normalised = (unit_pixels.astype(np.float64) - OPENAI_MEAN) / OPENAI_STD
    out = model.module.apply(
        variables, normalised.astype(np.float32), method=model.module.encode_image
    )
    return np.asarray(out, np.float32)


def test_float_batches_are_not_rounded(tiny):
    """Float pixels in [0, 1] at the model's size reach the model unrounded (they
    used to go through uint8 and PIL, which moved the embeddings by ~1e-4)."""
    model, variables = tiny
    pixels = np.random.default_rng(0).random((3, SIZE, SIZE, 3))
    want = direct_embeddings(model, variables, pixels)
    np.testing.assert_allclose(model.encode_image(variables, pixels), want, atol=2e-6)
    channels_first = pixels.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(
        model.encode_image(variables, channels_first), want, atol=2e-6
    )
    rounded = np.round(pixels * 255) / 255
    assert np.abs(direct_embeddings(model, variables, rounded) - want).max() > 1e-5


def test_normalized_batches_in_either_layout(tiny):
    model, variables = tiny
    pixels = np.random.default_rng(1).random((5, SIZE, SIZE, 3))
    want = direct_embeddings(model, variables, pixels)
    normalised = (pixels - OPENAI_MEAN) / OPENAI_STD
    for batch in (normalised, normalised.transpose(0, 3, 1, 2)):
        got = model.encode_image(variables, batch, normalized=True)
        np.testing.assert_allclose(got, want, atol=2e-6)


def test_openclip_preprocess_matches_hf_and_feeds_normalized(tiny):
    """`openclip_preprocess` gives what OpenCLIP's (and HF's) processor gives:
    normalised float32 [3, S, S]; a stack of them encodes with normalized=True like
    the uint8 path."""
    transformers_clip()
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "CLIPImageProcessorPil"):
        pytest.skip("this transformers has no CLIPImageProcessorPil")
    model, variables = tiny
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": SIZE},
        crop_size={"height": SIZE, "width": SIZE},
        image_mean=list(OPENAI_MEAN),
        image_std=list(OPENAI_STD),
    )
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, shape, np.uint8) for shape in ((50, 70, 3),) * 2]
    ours = np.stack([model.openclip_preprocess(image) for image in images])
    assert ours.shape == (2, 3, SIZE, SIZE) and ours.dtype == np.float32
    expected = processor(images=images, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    np.testing.assert_allclose(
        model.encode_image(variables, ours, normalized=True),
        model.encode_image(variables, images),
        atol=2e-6,
    )


def test_float_images_of_any_size_are_resized_in_float(tiny):
    model, variables = tiny
    # A smooth photo: on pixel noise PIL's 8-bit bicubic clips between its two
    # passes, and differs from the float resize by several grey levels.
    coarse = np.random.default_rng(3).integers(0, 256, (6, 8, 3), np.uint8)
    uint8 = np.asarray(Image.fromarray(coarse).resize((70, 50), Image.BILINEAR))
    # A quarter of a grey level off: rounding through uint8 would erase it.
    floats = np.clip(uint8 / 255 + 0.25 / 255, 0, 1)
    out = model.preprocess(floats)
    assert out.dtype == np.float32 and out.shape == (SIZE, SIZE, 3)
    from_uint8 = model.preprocess(uint8) / 255
    assert not np.array_equal(np.round(out * 255) / 255, out)  # not rounded
    np.testing.assert_allclose(out, from_uint8, atol=2 / 255)
    mixed = model.encode_image(variables, [uint8, floats])  # one batch, both kinds
    np.testing.assert_allclose(
        mixed[1], direct_embeddings(model, variables, out[None])[0], atol=2e-6
    )
    np.testing.assert_allclose(
        mixed[0], model.encode_image(variables, uint8)[0], atol=2e-6
    )


def test_bad_batches_say_what_was_passed(tiny):
    model, variables = tiny
    with pytest.raises(ValueError, match=r"float32 array of shape \(4, 5, 32, 32\)"):
        model.encode_image(variables, np.zeros((4, 5, 32, 32), np.float32))
    with pytest.raises(ValueError, match="normalized=True needs float pixels"):
        model.encode_image(
            variables, np.zeros((2, 32, 32, 3), np.uint8), normalized=True
        )
    with pytest.raises(ValueError, match=r"pass normalized=True"):
        model.encode_image(variables, np.full((2, 3, 32, 32), -1.5, np.float32))
    with pytest.raises(ValueError, match=r"must already be 32 x 32.*\(2, 3, 40, 40\)"):
        model.encode_image(
            variables, np.zeros((2, 3, 40, 40), np.float32), normalized=True
        )
    with pytest.raises(ValueError, match=r"normalized=True takes one array"):
        model.encode_image(variables, ["cat.jpg"], normalized=True)


def test_models_of_one_architecture_share_their_encoders():
    """A second `create_model` (or `load`) of the same architecture and dtype reuses
    the jitted encoders: nothing is compiled again."""
    first = jaxclip.create_model("tiny-vit")
    variables = first.init(seed=0)
    batch = np.zeros((2, SIZE, SIZE, 3), np.uint8)
    first.encode_image(variables, batch)
    compiled = first.encoders.images._cache_size()
    second = jaxclip.create_model("tiny-vit")
    assert second.encoders is first.encoders
    second.encode_image(variables, batch)
    assert second.encoders.images._cache_size() == compiled
    other = jaxclip.create_model("tiny-vit", dtype="bfloat16")
    assert other.encoders is not first.encoders
