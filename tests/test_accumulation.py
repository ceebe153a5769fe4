"""Exact gradient accumulation (GradCache) against one big-batch gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_util import tiny_config
from train_util import assert_same_run, model_batches, run_steps

from jaxclip import sharding
from jaxclip.config import ConfigError, validate_config
from jaxclip.data.transforms import normalize_images
from jaxclip.models import CLIP
from jaxclip.models.registry import get_model_config
from jaxclip.train.step import full_batch_grads, gradcache_grads

BATCH = 32  # 4 per device on 8 devices, so k = 1, 2, 4 all divide it


def batch_and_params(config, model):
    data = model_batches(model, 0, BATCH)
    batch = next(data)
    images = normalize_images(
        jnp.asarray(batch["images"]), config.data.mean, config.data.std, jnp.float32
    )
    tokens = jnp.asarray(batch["tokens"])
    variables = model.init(jax.random.key(0), images[:2], tokens[:2])
    # A logit scale away from its init, so its gradient is not special.
    params = {**variables["params"], "logit_scale": jnp.float32(2.5)}
    if "logit_bias" in params:
        params["logit_bias"] = jnp.float32(-3.0)
    return {"params": params}, images, tokens


def sharded_grads(fn, mesh, variables, images, tokens, accum_steps=None):
    """`fn` jitted on the mesh, given the batch whole or, with `accum_steps` = k
    (1 too), as k consecutive micro-batches `[k, B/k, ...]`, the layout GradCache
    takes, each split over the batch axes."""
    batch = []
    for x in (np.asarray(images), np.asarray(tokens)):
        if accum_steps is None:
            batch.append(jax.device_put(x, sharding.batch_sharding(mesh, x.ndim)))
        else:
            x = x.reshape(accum_steps, -1, *x.shape[1:])
            where = sharding.micro_batch_sharding(mesh, x.ndim)
            batch.append(jax.device_put(x, where))
    with sharding.use_mesh(mesh):
        loss, grads, out, _ = jax.jit(fn)(variables, *batch)
    return jax.device_get((loss, grads, out))


def micro_batch_order(rows: np.ndarray, accum_steps: int) -> np.ndarray:
    """The big batch's rows in the order GradCache returns them: the batch split
    into k consecutive micro-batches of m rows, then row j of micro-batch i at
    j k + i (one process)."""
    return np.swapaxes(rows.reshape(accum_steps, -1, *rows.shape[1:]), 0, 1).reshape(
        rows.shape
    )


def assert_grads_close(got, want):
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(want))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * scale),
        got,
        want,
    )


def tiny_vit(loss_name: str) -> CLIP:
    # Unrolled: XLA:CPU can deadlock on collectives inside loops with 8 devices.
    return CLIP(
        get_model_config("tiny-vit"), use_logit_bias=loss_name == "siglip", scan=False
    )


@pytest.fixture(scope="module")
def big_batch_reference():
    """Per loss: inputs and the dense loss's one-pass gradient on the whole batch."""
    mesh = sharding.make_mesh((4, 2, 1))
    references = {}
    for loss_name in ("clip", "siglip"):
        config, model = (
            tiny_config(overrides={"loss.name": loss_name}),
            tiny_vit(loss_name),
        )
        variables, images, tokens = batch_and_params(config, model)
        references[loss_name] = (
            (variables, images, tokens),
            sharded_grads(
                lambda v, i, t, c=config, m=model: full_batch_grads(c, m, v, i, t),
                mesh,
                variables,
                images,
                tokens,
            ),
        )
    return references


@pytest.mark.slow
@pytest.mark.parametrize(
    "accum_steps, loss_name, impl",
    # k = 1, 2, 4 with both implementations for the softmax loss; the sigmoid loss
    # shares the accumulation code, so two cases keep the suite's compile time down.
    [(k, "clip", impl) for k in (1, 2, 4) for impl in ("dense", "ring")]
    + [(2, "siglip", "dense"), (4, "siglip", "ring")],
)
def test_accumulated_grads_equal_big_batch(
    big_batch_reference, accum_steps, loss_name, impl
):
    config = tiny_config(
        overrides={"loss.name": loss_name, "loss.impl": impl, "loss.chunk_size": 3}
    )
    model = tiny_vit(loss_name)
    mesh = sharding.make_mesh((4, 2, 1))
    (variables, images, tokens), want = big_batch_reference[loss_name]
    want_loss, want_grads, want_out = want
    got_loss, got_grads, got_out = sharded_grads(
        lambda v, i, t: gradcache_grads(config, model, v, i, t),
        mesh,
        variables,
        images,
        tokens,
        accum_steps,
    )
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    # The full batch's embeddings come back, each micro-batch's rows interleaved.
    for name in ("image_emb", "text_emb"):
        want_rows = micro_batch_order(want_out[name], accum_steps)
        np.testing.assert_allclose(got_out[name], want_rows, atol=1e-6, err_msg=name)
    assert_grads_close(got_grads, want_grads)
    # The temperature's gradient is counted once, not k times.
    np.testing.assert_allclose(
        got_grads["logit_scale"], want_grads["logit_scale"], rtol=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots"])
def test_accumulation_with_scanned_layers_and_remat(remat):
    """The lax.scan accumulation loop (one device) with remat equals the big batch."""
    config = tiny_config()
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    plain = CLIP(get_model_config("tiny-vit"), scan=True)
    variables, images, tokens = batch_and_params(config, plain)
    _, want_grads, _ = sharded_grads(
        lambda v, i, t: full_batch_grads(config, plain, v, i, t),
        mesh,
        variables,
        images,
        tokens,
    )
    model = CLIP(get_model_config("tiny-vit"), scan=True, remat=remat)
    _, got_grads, _ = sharded_grads(
        lambda v, i, t: gradcache_grads(config, model, v, i, t),
        mesh,
        variables,
        images,
        tokens,
        accum_steps=4,
    )
    assert_grads_close(got_grads, want_grads)


@pytest.mark.slow
def test_ring_loss_with_accumulation_in_the_train_step():
    """Ring loss + 4 micro-batches in the real train step = dense big-batch steps."""
    mesh = sharding.make_mesh((4, 2, 1))
    dense_state, dense = run_steps(
        tiny_config(overrides={"train.batch_size": BATCH}), mesh, 2
    )
    ring_accum = {
        "train.batch_size": BATCH,
        "loss.impl": "ring",
        "loss.chunk_size": 2,
        "train.accum_steps": 4,
    }
    accum_state, accum = run_steps(tiny_config(overrides=ring_accum), mesh, 2)
    assert_same_run(
        (accum_state, accum),
        (dense_state, dense),
        ("loss", "grad_norm", "i2t_acc", "t2i_acc", "logit_scale"),
    )


def test_accum_steps_must_divide_the_per_device_batch():
    config = tiny_config(overrides={"train.batch_size": 16, "train.accum_steps": 4})
    config.mesh.shape = (8, 1, 1)  # 2 per device: 4 micro-batches cannot split it
    with pytest.raises(ConfigError, match="train.accum_steps=4"):
        validate_config(config)
    config.train.accum_steps = 0
    with pytest.raises(ConfigError, match="train.accum_steps"):
        validate_config(config)
