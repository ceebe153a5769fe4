"""The ring losses against the dense reference: values and every gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxclip import losses, ring, sharding

BATCH, DIM = 32, 16


def _unit_rows(rng: np.random.Generator, rows: int) -> np.ndarray:
    x = rng.normal(size=(rows, DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    image, text = _unit_rows(rng, BATCH), _unit_rows(rng, BATCH)
    duplicated_image, duplicated_text = image.copy(), text.copy()
    duplicated_image[1::4] = duplicated_image[0::4]  # ties between rows and columns
    duplicated_text[1::4] = duplicated_text[0::4]
    same = np.broadcast_to(_unit_rows(rng, 1), (BATCH, DIM))
    return {
        "random": (image, text),
        "duplicated": (duplicated_image, duplicated_text),
        "identical": (same, same),
    }


def _value_and_grads(loss_name: str, impl: str, chunk_size: int = 0):
    def loss(image, text, log_scale, bias):
        if loss_name == "clip":
            return losses.clip_loss(
                image, text, log_scale, impl=impl, chunk_size=chunk_size
            )
        return losses.siglip_loss(
            image, text, log_scale, bias, impl=impl, chunk_size=chunk_size
        )

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (4, 2, 1), (2, 2, 2)])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ring_equals_dense(mesh_shape, loss_name, dtype):
    mesh = sharding.make_mesh(mesh_shape)
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    dense, ring = (
        _value_and_grads(loss_name, "dense"),
        _value_and_grads(loss_name, "ring"),
    )
    # bf16 embeddings: both paths compute in float32 from the same rounded inputs, and
    # return bf16 gradients, which may differ by one rounding step.
    grad_rtol = 1e-5 if dtype == jnp.float32 else 1e-2
    with jax.set_mesh(mesh):
        for case, (image, text) in _cases().items():
            args = (
                jax.device_put(jnp.asarray(image, dtype), rows),
                jax.device_put(jnp.asarray(text, dtype), rows),
            )
            for scale in (1.0, 100.0):
                scalars = (jnp.float32(np.log(scale)), jnp.float32(-5.0))
                want_loss, want_grads = dense(*args, *scalars)
                got_loss, got_grads = ring(*args, *scalars)
                np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5, err_msg=case)
                names = ("image", "text", "logit_scale", "logit_bias")
                if loss_name == "clip":
                    names = names[:3]  # the CLIP loss does not use the bias
                for name, got, want in zip(names, got_grads, want_grads):
                    assert got.dtype == want.dtype, name
                    got, want = (
                        np.asarray(got, np.float64),
                        np.asarray(want, np.float64),
                    )
                    # Relative to the size of the terms summed: scale / B per logit
                    # for an embedding, about `scale` for the scalars. Where terms
                    # cancel (identical embeddings) the gradient is rounding noise
                    # with no meaningful relative error.
                    terms = scale if name.startswith("logit") else scale / BATCH
                    tol = grad_rtol * max(np.abs(want).max(), terms)
                    np.testing.assert_allclose(
                        got, want, atol=tol, err_msg=f"{case} {name} scale {scale}"
                    )


@pytest.mark.parametrize("mode", ["unrolled", "loop"])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_chunked_ring_equals_dense(loss_name, mode):
    """Chunks that divide the local batch of 4 (1, 2) and that do not (3).

    'loop' is the form TPUs and GPUs run (`lax.fori_loop` over the 8 ring steps, two
    steps per iteration for the CLIP loss, so an odd remainder too); the CPU unrolls
    it on several devices by default (jaxclip/ring.py).
    """
    mesh = sharding.make_mesh((4, 2, 1))
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    dense = _value_and_grads(loss_name, "dense")
    image, text = _cases()["duplicated"]
    with jax.set_mesh(mesh):
        args = (
            jax.device_put(jnp.asarray(image, jnp.float32), rows),
            jax.device_put(jnp.asarray(text, jnp.float32), rows),
            jnp.float32(np.log(100.0)),
            jnp.float32(-5.0),
        )
        want_loss, want_grads = dense(*args)
        for chunk_size in (1, 2, 3):
            with ring.forced(mode):
                got_loss, got_grads = _value_and_grads(loss_name, "ring", chunk_size)(
                    *args
                )
            np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
            for index, (got, want) in enumerate(zip(got_grads, want_grads)):
                terms = 100.0 if index >= 2 else 100.0 / BATCH  # as in the test above
                tol = 1e-5 * max(np.abs(want).max(), terms)
                np.testing.assert_allclose(got, want, atol=tol, err_msg=str(chunk_size))


def test_ring_needs_a_mesh():
    image = jnp.ones((4, DIM)) / np.sqrt(DIM)
    with pytest.raises(ValueError, match="needs a mesh"):
        losses.clip_loss(image, image, jnp.float32(0.0), impl="ring")


def _accuracy_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    image = _unit_rows(rng, BATCH)
    noise = np.where(np.arange(BATCH)[:, None] % 2 == 0, 0.1, 3.0)
    text = image + noise * rng.normal(size=(BATCH, DIM))  # about half retrievable
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    # One-hot rows repeating every 5: similarities are exactly 0 or 1, so the ties
    # are exact, and the first index wins (row i's match is i only when i < 5).
    one_hot = np.eye(DIM)[np.arange(BATCH) % 5]
    return {"noisy": (image, text), "ties": (one_hot, one_hot)}


@pytest.mark.parametrize(
    "mesh_shape, mode", [((8, 1, 1), "auto"), ((2, 2, 2), "auto"), ((2, 2, 2), "loop")]
)
def test_ring_accuracy_equals_float64_argmax(mesh_shape, mode):
    mesh = sharding.make_mesh(mesh_shape)
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES, None))
    for case, (image, text) in _accuracy_cases().items():
        similarities = image @ text.T  # float64
        want = (
            np.mean(np.argmax(similarities, axis=1) == np.arange(BATCH)),
            np.mean(np.argmax(similarities, axis=0) == np.arange(BATCH)),
        )
        assert 0 < want[0] < 1, case  # the case can tell right from wrong
        with jax.set_mesh(mesh):
            args = [
                jax.device_put(jnp.asarray(x, jnp.float32), rows) for x in (image, text)
            ]
            for chunk_size in (0, 3):
                accuracy = jax.jit(
                    lambda i, t, c=chunk_size: losses.contrastive_accuracy(
                        i, t, impl="ring", chunk_size=c
                    )
                )
                with ring.forced(mode):
                    got = accuracy(*args)
                np.testing.assert_allclose(got, want, err_msg=f"{case} {chunk_size}")
