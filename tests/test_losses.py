"""Contrastive losses against NumPy float64 references, on one device and sharded."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxclip.losses import clip_loss, contrastive_accuracy, siglip_loss

LN100 = math.log(100.0)


# ---------------------------------------------------------------------------
# NumPy float64 references: forward value and analytic gradients.
# ---------------------------------------------------------------------------


def _log_softmax(logits: np.ndarray, axis: int) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for large |x|


def np_clip(image: np.ndarray, text: np.ndarray, logit_scale: float) -> tuple:
    """CLIP loss and its gradients `(loss, d_image, d_text, d_logit_scale)`, float64."""
    image, text = image.astype(np.float64), text.astype(np.float64)
    batch = image.shape[0]
    scale = np.exp(np.float64(logit_scale))
    logits = scale * image @ text.T
    log_rows, log_cols = _log_softmax(logits, 1), _log_softmax(logits, 0)
    loss = -(np.trace(log_rows) + np.trace(log_cols)) / (2 * batch)
    eye = np.eye(batch)
    d_logits = (np.exp(log_rows) - eye + np.exp(log_cols) - eye) / (2 * batch)
    # logits = exp(s) * sim, so d logits / d s = logits.
    return (
        loss,
        scale * d_logits @ text,
        scale * d_logits.T @ image,
        np.sum(d_logits * logits),
    )


def np_siglip(
    image: np.ndarray, text: np.ndarray, logit_scale: float, logit_bias: float
) -> tuple:
    """SigLIP loss and gradients `(loss, d_image, d_text, d_scale, d_bias)`, float64."""
    image, text = image.astype(np.float64), text.astype(np.float64)
    batch = image.shape[0]
    scale = np.exp(np.float64(logit_scale))
    similarities = image @ text.T
    logits = scale * similarities + logit_bias
    labels = 2 * np.eye(batch) - 1
    loss = np.sum(np.logaddexp(0.0, -labels * logits)) / batch  # -log_sigmoid
    d_logits = -labels * _sigmoid(-labels * logits) / batch
    return (
        loss,
        scale * d_logits @ text,
        scale * d_logits.T @ image,
        np.sum(d_logits * scale * similarities),
        np.sum(d_logits),
    )


def np_accuracy(image: np.ndarray, text: np.ndarray) -> tuple[float, float]:
    logits = image.astype(np.float64) @ text.astype(np.float64).T
    targets = np.arange(len(logits))
    return (
        np.mean(logits.argmax(1) == targets),
        np.mean(logits.argmax(0) == targets),
    )


def _numerical_grads(loss_fn, args: list) -> list:
    """Central differences in float64 of `loss_fn(*args)` w.r.t. every argument."""
    step = 1e-6
    grads = []
    for index, arg in enumerate(args):
        arg = np.asarray(arg, np.float64)
        grad = np.zeros_like(arg)
        for position in np.ndindex(arg.shape):
            plus, minus = arg.copy(), arg.copy()
            plus[position] += step
            minus[position] -= step
            args_plus = [*args[:index], plus, *args[index + 1 :]]
            args_minus = [*args[:index], minus, *args[index + 1 :]]
            grad[position] = (loss_fn(*args_plus)[0] - loss_fn(*args_minus)[0]) / (
                2 * step
            )
        grads.append(grad)
    return grads


# ---------------------------------------------------------------------------
# Inputs and helpers.
# ---------------------------------------------------------------------------


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def random_pair(batch: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Normalised float32 image and text embeddings, each text near its image."""
    rng = np.random.default_rng(seed)
    image = _normalise(rng.normal(size=(batch, dim)))
    text = _normalise(image + rng.normal(size=(batch, dim)))
    return image, text


def with_ties(batch: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows 0-3 identical in both towers, and rows 4-5 too: tied logits."""
    image, text = random_pair(batch, dim, seed=1)
    image[1:4], text[1:4] = image[0], text[0]
    image[5], text[5] = image[4], text[4]
    return image, text


def all_identical(batch: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Every image and every text the same vector: every logit equal."""
    vector = _normalise(np.random.default_rng(2).normal(size=(1, dim)))
    return np.repeat(vector, batch, 0), np.repeat(vector, batch, 0)


def assert_close(actual, expected, rtol: float, atol_frac: float, name: str) -> None:
    """rtol per element, atol as a fraction of the largest reference magnitude."""
    expected = np.asarray(expected, np.float64)
    atol = atol_frac * max(np.abs(expected).max(), 1.0)
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol, err_msg=name
    )


def jax_clip(image, text, logit_scale) -> tuple:
    """Loss and gradients w.r.t. all three inputs, through the public API."""
    value_and_grad = jax.value_and_grad(clip_loss, argnums=(0, 1, 2))
    loss, grads = value_and_grad(image, text, jnp.float32(logit_scale))
    return (loss, *grads)


def jax_siglip(image, text, logit_scale, logit_bias) -> tuple:
    value_and_grad = jax.value_and_grad(siglip_loss, argnums=(0, 1, 2, 3))
    loss, grads = value_and_grad(
        image, text, jnp.float32(logit_scale), jnp.float32(logit_bias)
    )
    return (loss, *grads)


GRAD_NAMES = ("loss", "d_image", "d_text", "d_logit_scale", "d_logit_bias")


def check_against(actual: tuple, expected: tuple, loss_rtol, grad_rtol, atol_frac):
    assert actual[0].dtype == jnp.float32 and actual[0].shape == ()
    assert_close(actual[0], expected[0], loss_rtol, 1e-6, "loss")
    for name, got, want in zip(GRAD_NAMES[1:], actual[1:], expected[1:]):
        assert_close(got, want, grad_rtol, atol_frac, name)


# ---------------------------------------------------------------------------
# The references themselves.
# ---------------------------------------------------------------------------


def test_numpy_reference_gradients_match_finite_differences():
    image, text = random_pair(3, 4)
    for reference, scalars in ((np_clip, [0.7]), (np_siglip, [0.7, -1.3])):
        args = [image, text, *scalars]
        numerical = _numerical_grads(reference, args)
        analytic = reference(*args)[1:]
        for got, want in zip(analytic, numerical):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------
# Values and gradients against float64.
# ---------------------------------------------------------------------------

SHAPES = [(1, 8), (4, 16), (16, 32), (64, 128)]
SCALES_AND_BIASES = [(LN100, -10.0), (0.0, 0.5)]


@pytest.mark.parametrize("batch,dim", SHAPES)
@pytest.mark.parametrize("logit_scale,logit_bias", SCALES_AND_BIASES)
def test_random_embeddings(batch, dim, logit_scale, logit_bias):
    image, text = random_pair(batch, dim)
    check_against(
        jax_clip(image, text, logit_scale),
        np_clip(image, text, logit_scale),
        loss_rtol=1e-5,
        grad_rtol=1e-4,
        atol_frac=1e-5,
    )
    check_against(
        jax_siglip(image, text, logit_scale, logit_bias),
        np_siglip(image, text, logit_scale, logit_bias),
        loss_rtol=1e-5,
        grad_rtol=1e-4,
        atol_frac=1e-5,
    )


@pytest.mark.parametrize("make_inputs", [with_ties, all_identical])
@pytest.mark.parametrize("logit_scale,logit_bias", SCALES_AND_BIASES)
def test_tied_embeddings(make_inputs, logit_scale, logit_bias):
    image, text = make_inputs(8, 16)
    check_against(
        jax_clip(image, text, logit_scale),
        np_clip(image, text, logit_scale),
        loss_rtol=1e-5,
        grad_rtol=1e-4,
        atol_frac=1e-5,
    )
    check_against(
        jax_siglip(image, text, logit_scale, logit_bias),
        np_siglip(image, text, logit_scale, logit_bias),
        loss_rtol=1e-5,
        grad_rtol=1e-4,
        atol_frac=1e-5,
    )


def test_all_identical_clip_loss_is_log_batch():
    """Every logit equal: each softmax is uniform, so the loss is exactly log(batch)."""
    image, text = all_identical(8, 16)
    np.testing.assert_allclose(clip_loss(image, text, LN100), math.log(8), rtol=1e-6)


@pytest.mark.parametrize("logit_scale,logit_bias", SCALES_AND_BIASES)
def test_bfloat16_inputs(logit_scale, logit_bias):
    """bf16 embeddings are cast up, so the loss matches float64 of the rounded values;
    the gradients come back in bf16, hence the loose gradient tolerance."""
    image, text = (jnp.asarray(x, jnp.bfloat16) for x in random_pair(32, 64))
    image_64, text_64 = np.asarray(image, np.float64), np.asarray(text, np.float64)
    clip = jax_clip(image, text, logit_scale)
    siglip = jax_siglip(image, text, logit_scale, logit_bias)
    assert clip[1].dtype == clip[2].dtype == jnp.bfloat16
    tolerances = {"loss_rtol": 1e-5, "grad_rtol": 2e-2, "atol_frac": 1e-2}
    check_against(clip, np_clip(image_64, text_64, logit_scale), **tolerances)
    check_against(
        siglip, np_siglip(image_64, text_64, logit_scale, logit_bias), **tolerances
    )


# ---------------------------------------------------------------------------
# Sharded over the batch on 8 devices.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "axis_sizes,batch_axes,axis_type",
    [
        ((8,), "data", AxisType.Explicit),  # jax.make_mesh's default
        ((8,), "data", AxisType.Auto),
        ((4, 2), ("data", "fsdp"), AxisType.Explicit),
    ],
)
def test_sharded_matches_single_device(axis_sizes, batch_axes, axis_type):
    """Batch sharded over 8 devices: same losses, gradients and accuracies."""
    assert jax.device_count() >= 8, (
        "needs XLA_FLAGS=--xla_force_host_platform_device_count=8"
    )
    axis_names = ("data", "fsdp")[: len(axis_sizes)]
    mesh = jax.make_mesh(axis_sizes, axis_names, (axis_type,) * len(axis_sizes))
    batch_sharding = NamedSharding(mesh, P(batch_axes, None))
    image, text = random_pair(32, 16)
    scalars = (jnp.float32(LN100), jnp.float32(-10.0))

    def values_and_grads(image, text, logit_scale, logit_bias):
        """Each loss with its gradients w.r.t. every input."""
        args = (image, text, logit_scale, logit_bias)
        clip = jax.value_and_grad(clip_loss, argnums=(0, 1, 2))(*args[:3])
        siglip = jax.value_and_grad(siglip_loss, argnums=(0, 1, 2, 3))(*args)
        return clip, siglip, contrastive_accuracy(image, text)

    step = jax.jit(values_and_grads)
    device = jax.devices()[0]
    single = step(jax.device_put(image, device), jax.device_put(text, device), *scalars)
    sharded_image = jax.device_put(image, batch_sharding)
    sharded_text = jax.device_put(text, batch_sharding)
    sharded = step(sharded_image, sharded_text, *scalars)

    assert sharded_image.sharding.spec == P(batch_axes, None)
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        assert_close(got, want, rtol=1e-5, atol_frac=1e-6, name="sharded")


# ---------------------------------------------------------------------------
# Accuracy and errors.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch,dim", [(1, 4), (16, 8), (64, 4)])
def test_contrastive_accuracy(batch, dim):
    image, text = random_pair(batch, dim, seed=3)
    image_to_text, text_to_image = contrastive_accuracy(image, text)
    assert image_to_text.dtype == text_to_image.dtype == jnp.float32
    want_image_to_text, want_text_to_image = np_accuracy(image, text)
    assert float(image_to_text) == pytest.approx(want_image_to_text)
    assert float(text_to_image) == pytest.approx(want_text_to_image)


def test_contrastive_accuracy_is_not_trivial():
    image, text = random_pair(64, 4, seed=3)
    accuracies = [float(a) for a in contrastive_accuracy(image, text)]
    assert all(0.0 < a < 1.0 for a in accuracies), accuracies


def test_unknown_impl_is_refused():
    image, text = random_pair(4, 8)
    with pytest.raises(ValueError, match=r"impl='blocked'.*\['dense', 'ring'\]"):
        clip_loss(image, text, 0.0, impl="blocked")
    with pytest.raises(ValueError, match=r"impl='sparse'.*\['dense', 'ring'\]"):
        siglip_loss(image, text, 0.0, 0.0, impl="sparse")


@pytest.mark.parametrize(
    "image_shape,text_shape,message",
    [
        ((4, 8), (4, 16), "same shape"),
        ((4, 8), (5, 8), "same shape"),
        ((8,), (8,), "2-D"),
        ((2, 4, 8), (2, 4, 8), "2-D"),
    ],
)
def test_bad_shapes_are_refused(image_shape, text_shape, message):
    image, text = jnp.ones(image_shape), jnp.ones(text_shape)
    with pytest.raises(ValueError, match=message):
        clip_loss(image, text, 0.0)
    with pytest.raises(ValueError, match=message):
        siglip_loss(image, text, 0.0, 0.0)
    with pytest.raises(ValueError, match=message):
        contrastive_accuracy(image, text)


def test_non_scalar_temperature_is_refused():
    image, text = random_pair(4, 8)
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        clip_loss(image, text, jnp.zeros(1))
    with pytest.raises(ValueError, match="logit_bias must be a scalar"):
        siglip_loss(image, text, 0.0, jnp.zeros(4))
