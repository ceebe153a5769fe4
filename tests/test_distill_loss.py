"""OpenCLIP's distillation loss, dense and ring, against a float64 NumPy reference:
the value and the gradients w.r.t. the student (the teacher gets none)."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxclip import losses, ring, sharding

BATCH, STUDENT_DIM, TEACHER_DIM = 32, 16, 24  # the towers' dims differ on purpose
# (student, teacher) log scales: a cold teacher, and both at CLIP's largest scale.
LOG_SCALES = [(math.log(100.0), math.log(10.0)), (math.log(100.0), math.log(100.0))]


# --- The float64 reference ------------------------------------------------------------


def _log_softmax(logits: np.ndarray, axis: int) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def np_distill(image, text, log_scale, teacher_image, teacher_text, teacher_log_scale):
    """Loss and its gradients `(loss, d_image, d_text, d_log_scale)`, float64."""
    image, text = np.asarray(image, np.float64), np.asarray(text, np.float64)
    teacher_image = np.asarray(teacher_image, np.float64)
    teacher_text = np.asarray(teacher_text, np.float64)
    batch = image.shape[0]
    scale = np.exp(np.float64(log_scale))
    student = scale * image @ text.T
    teacher = np.exp(np.float64(teacher_log_scale)) * teacher_image @ teacher_text.T
    terms = []
    d_student = np.zeros_like(student)
    for axis in (1, 0):  # image→text over rows, text→image over columns
        log_q, log_p = _log_softmax(student, axis), _log_softmax(teacher, axis)
        terms.append(-np.sum(np.exp(log_p) * log_q) / batch)
        d_student += (np.exp(log_q) - np.exp(log_p)) / (2 * batch)
    # student = exp(s) * similarities, so d student / d s = student.
    return (
        0.5 * sum(terms),
        scale * d_student @ text,
        scale * d_student.T @ image,
        np.sum(d_student * student),
    )


def test_numpy_reference_gradients_match_finite_differences():
    """Each analytic gradient against a central difference along a random direction."""
    inputs = _inputs(np.random.default_rng(5), 5, 4, 3)
    args = [*inputs[:2], 0.7, *inputs[2:], 1.3]
    grads = np_distill(*args)[1:]
    rng, step = np.random.default_rng(6), 1e-6
    for index, grad in zip((0, 1, 2), grads):
        direction = rng.normal(size=np.shape(grad))
        plus, minus = list(args), list(args)
        plus[index] = args[index] + step * direction
        minus[index] = args[index] - step * direction
        numerical = (np_distill(*plus)[0] - np_distill(*minus)[0]) / (2 * step)
        np.testing.assert_allclose(np.sum(grad * direction), numerical, rtol=1e-6)


# --- Inputs and the functions under test ---------------------------------------------


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _inputs(rng, batch=BATCH, student_dim=STUDENT_DIM, teacher_dim=TEACHER_DIM):
    """Student and teacher embeddings, `(image, text, teacher_image, teacher_text)`:
    the teacher sees the student's embeddings (zero-padded) plus noise, so its
    softmaxes resemble the student's without equalling them; texts near their images.
    """
    image = _unit_rows(rng.normal(size=(batch, student_dim)))
    text = _unit_rows(image + rng.normal(size=(batch, student_dim)))
    pad = [(0, 0), (0, max(teacher_dim - student_dim, 0))]
    teacher = []
    for student in (image, text):
        noise = 0.5 * rng.normal(size=(batch, teacher_dim))
        teacher.append(_unit_rows(np.pad(student, pad)[:, :teacher_dim] + noise))
    return image, text, *teacher


@functools.cache
def _value_and_grads(impl: str, chunk_size: int = 0, mode: str = "auto"):
    """Loss and gradients w.r.t. all six inputs, jitted once per (impl, chunk_size,
    ring mode); the mode is read while tracing, so it is part of the cache key."""

    loss = functools.partial(losses.distill_loss, impl=impl, chunk_size=chunk_size)
    value_and_grads = jax.value_and_grad(loss, argnums=tuple(range(6)))

    def traced_in_mode(*args):
        # Around the backward pass too: it is traced after `loss` has returned.
        with ring.forced(mode):
            return value_and_grads(*args)

    return jax.jit(traced_in_mode)


def _placed(inputs, log_scales, mesh=None, dtype=jnp.float32):
    """The six arguments, embeddings in `dtype` split over the batch axes of `mesh`."""
    image, text, teacher_image, teacher_text = (jnp.asarray(x, dtype) for x in inputs)
    if mesh is not None:
        rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
        image, text, teacher_image, teacher_text = jax.device_put(
            (image, text, teacher_image, teacher_text), rows
        )
    log_scale, teacher_log_scale = (jnp.float32(s) for s in log_scales)
    return image, text, log_scale, teacher_image, teacher_text, teacher_log_scale


def _max_errors(got, args) -> tuple[float, ...]:
    """Measured against float64 on the very inputs given (rounded to their dtype):
    (loss relative error, each gradient's max error over its max magnitude)."""
    want = np_distill(*(np.asarray(a, np.float64) for a in args))
    loss, grads = got
    errors = [abs(float(loss) - want[0]) / abs(want[0])]
    for got_grad, want_grad in zip(grads[:3], want[1:]):
        error = np.abs(np.asarray(got_grad, np.float64) - want_grad).max()
        errors.append(error / np.abs(want_grad).max())
    return tuple(errors)


def check(got, args, loss_rtol=2e-6, grad_rtol=2e-5) -> None:
    """The loss and the student's gradients against float64, the teacher's zero."""
    loss, grads = got
    assert loss.dtype == jnp.float32 and loss.shape == ()
    for arg, grad in zip(args, grads):
        assert grad.dtype == arg.dtype and grad.shape == arg.shape
    for name, grad in zip(
        ("teacher_image", "teacher_text", "teacher_scale"), grads[3:]
    ):
        assert not np.any(np.asarray(grad)), name
    errors = _max_errors(got, args)
    names = ("loss", "d_image", "d_text", "d_log_scale")
    assert errors[0] <= loss_rtol, errors
    for name, error in zip(names[1:], errors[1:]):
        assert error <= grad_rtol, (name, errors)


# --- Dense and ring against float64 ---------------------------------------------------


@pytest.mark.parametrize("teacher_dim", [TEACHER_DIM, 8])
def test_dense_equals_float64(teacher_dim):
    """One device; a teacher wider (24) and narrower (8) than the student (16)."""
    inputs = _inputs(np.random.default_rng(0), teacher_dim=teacher_dim)
    for log_scales in LOG_SCALES:
        args = _placed(inputs, log_scales)
        check(_value_and_grads("dense")(*args), args)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (4, 2, 1), (2, 2, 2)])
def test_ring_and_sharded_dense_equal_float64(mesh_shape):
    mesh = sharding.make_mesh(mesh_shape)
    inputs = _inputs(np.random.default_rng(1))
    with jax.set_mesh(mesh):
        for log_scales in LOG_SCALES:
            args = _placed(inputs, log_scales, mesh)
            check(_value_and_grads("ring")(*args), args)
            check(_value_and_grads("dense")(*args), args)


@pytest.mark.parametrize("mode", ["unrolled", "loop"])
def test_chunked_ring_equals_float64(mode):
    """Chunks that divide the local batch of 4 (2) and that do not (3); 'loop' is
    the form TPUs and GPUs run (8 ring steps, two per loop iteration)."""
    mesh = sharding.make_mesh((4, 2, 1))
    with jax.set_mesh(mesh):
        args = _placed(_inputs(np.random.default_rng(2)), LOG_SCALES[1], mesh)
        for chunk_size in (2, 3):
            check(_value_and_grads("ring", chunk_size, mode)(*args), args)


def test_bfloat16_ring_equals_float64():
    """bf16 embeddings: tiles are float32 from the rounded values, so the loss is
    float64's of the rounded inputs; the gradients come back rounded to bf16."""
    mesh = sharding.make_mesh((4, 2, 1))
    with jax.set_mesh(mesh):
        args = _placed(
            _inputs(np.random.default_rng(3)), LOG_SCALES[0], mesh, jnp.bfloat16
        )
        check(_value_and_grads("ring", 3)(*args), args, loss_rtol=1e-5, grad_rtol=1e-2)


def test_teacher_gets_zero_gradient():
    """Even where the loss does depend on the teacher (it is frozen)."""
    mesh = sharding.make_mesh((4, 2, 1))
    with jax.set_mesh(mesh):
        args = _placed(_inputs(np.random.default_rng(4)), LOG_SCALES[0], mesh)
        for impl in ("dense", "ring"):
            _, grads = _value_and_grads(impl)(*args)
            for grad in grads[3:]:
                np.testing.assert_array_equal(grad, np.zeros_like(grad), err_msg=impl)
        # Not vacuous: the loss moves with the teacher's scale.
        cooler = (*args[:5], args[5] - 1.0)
        assert (
            _value_and_grads("ring")(*cooler)[0] != _value_and_grads("ring")(*args)[0]
        )


def test_teacher_equal_to_student_gives_its_entropy_and_no_gradient():
    """Teacher == student: the loss is the softmaxes' own entropy, a minimum of the
    loss over the student's logits, so the gradient vanishes."""
    image, text, _, _ = _inputs(np.random.default_rng(5), teacher_dim=STUDENT_DIM)
    mesh = sharding.make_mesh((4, 2, 1))
    logits = 100.0 * image @ text.T
    entropy = 0.0
    for axis in (1, 0):
        log_p = _log_softmax(logits, axis)
        entropy -= 0.5 * np.sum(np.exp(log_p) * log_p) / BATCH
    with jax.set_mesh(mesh):
        args = _placed((image, text, image, text), LOG_SCALES[1], mesh)
        for impl in ("dense", "ring"):
            loss, grads = _value_and_grads(impl)(*args)
            np.testing.assert_allclose(loss, entropy, rtol=2e-6, err_msg=impl)
            # Each d_logit is a difference of equal softmaxes: float32 rounding only,
            # against terms of about scale / BATCH (embeddings) and scale (log scale).
            for grad, terms in zip(grads[:3], (100.0 / BATCH, 100.0 / BATCH, 100.0)):
                assert np.abs(np.asarray(grad)).max() <= 1e-5 * terms, impl


# --- Memory: no [B, B] on any device --------------------------------------------------


def _largest_float_array(compiled_text: str) -> int:
    """Elements of the largest floating-point array in a compiled (per-device) HLO."""
    sizes = [
        math.prod(int(d) for d in dims.split(",") if d)
        for dims in re.findall(r"\b(?:f64|f32|bf16|f16)\[([\d,]*)\]", compiled_text)
    ]
    return max(sizes)


def test_ring_holds_no_batch_square_on_any_device():
    """Compiled loss+grad at B = 256 on 8 devices (local b = 32, dims 16 and 24): the
    ring's largest float array is a `[b, b]` tile, below a device's strip `[b, B]` of
    the logits, which the sharded dense loss does hold. (The teacher's zero gradients
    come out sharded like the teacher, not as whole `[B, d]` arrays.)"""
    batch, mesh = 256, sharding.make_mesh((8, 1, 1))
    strip = batch // 8 * batch
    with jax.set_mesh(mesh):
        args = _placed(
            _inputs(np.random.default_rng(7), batch=batch), LOG_SCALES[0], mesh
        )
        largest = {
            impl: _largest_float_array(
                _value_and_grads(impl).lower(*args).compile().as_text()
            )
            for impl in ("dense", "ring")
        }
    assert largest["dense"] >= strip, largest  # the check can see a strip
    assert largest["ring"] < strip, largest
    assert largest["ring"] <= (batch // 8) ** 2, largest


# --- Bad inputs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "shapes, message",
    [
        (
            [(4, 8), (4, 16), (4, 8), (4, 8)],
            "image_emb and text_emb must have the same",
        ),
        ([(4, 8), (4, 8), (4, 8), (5, 8)], "teacher_image_emb and teacher_text_emb"),
        ([(4, 8), (4, 8), (4,), (4,)], "teacher_image_emb .* must be 2-D"),
        ([(4, 8), (4, 8), (6, 8), (6, 8)], "the teacher's batch must be the student's"),
    ],
)
def test_bad_shapes_are_refused(shapes, message):
    image, text, teacher_image, teacher_text = (jnp.ones(shape) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        losses.distill_loss(image, text, 0.0, teacher_image, teacher_text, 0.0)


def test_bad_scales_and_impl_are_refused():
    image = jnp.ones((4, 8)) / np.sqrt(8)
    with pytest.raises(ValueError, match="teacher_logit_scale must be a scalar"):
        losses.distill_loss(image, image, 0.0, image, image, jnp.zeros(1))
    with pytest.raises(ValueError, match="logit_scale must be a scalar"):
        losses.distill_loss(image, image, jnp.zeros(2), image, image, 0.0)
    with pytest.raises(ValueError, match=r"impl='blocked'.*\['dense', 'ring'\]"):
        losses.distill_loss(image, image, 0.0, image, image, 0.0, impl="blocked")
