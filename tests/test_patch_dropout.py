"""Patch dropout (FLIP): the kept patches are a uniform random subset drawn from the
step, the class token stays, evaluation sees every token, and the train step keeps
its guarantees (sharded, resumable, exact under GradCache)."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from config_util import tiny_config
from train_util import assert_same_run, example_tokens, model_batches, run_steps

from jaxclip import sharding
from jaxclip.config import ConfigError, validate_config
from jaxclip.models.build import create_model, model_from_config
from jaxclip.models.registry import ModelConfig, TextConfig, VisionConfig
from jaxclip.models.vit import drop_patches, keep_indices, kept_patches
from jaxclip.train import mfu
from jaxclip.train.state import (
    abstract_train_state,
    learning_rate_schedule,
    make_optimizer,
)
from jaxclip.train.step import image_keys, make_train_step, patch_dropout_key

METRICS = ("loss", "grad_norm", "i2t_acc", "t2i_acc", "logit_scale")


def drawn_indices(num_patches, patch_dropout, steps, rows, seed=0):
    """The kept patch positions the train step draws: [steps, rows, keep]."""
    config = tiny_config(overrides={"seed": seed, "model.patch_dropout": patch_dropout})
    keep = kept_patches(num_patches, patch_dropout)

    @jax.jit
    def draw(step):
        keys = image_keys(patch_dropout_key(config, step), jnp.arange(rows))
        return keep_indices(keys, num_patches, keep)

    return np.stack([np.asarray(draw(step)) for step in range(steps)])


@pytest.mark.parametrize("num_patches, patch_dropout", [(49, 0.5), (64, 0.75)])
def test_every_patch_is_kept_equally_often(num_patches, patch_dropout):
    """ViT-B-32's 7x7 grid and an 8x8 one, over 64 steps x 64 images."""
    indices = drawn_indices(num_patches, patch_dropout, steps=64, rows=64)
    keep = kept_patches(num_patches, patch_dropout)
    assert keep == round((1 - patch_dropout) * num_patches)
    assert indices.shape == (64, 64, keep)
    # Each image's kept set: `keep` distinct positions (ascending, so no repeats).
    assert np.all(np.diff(indices, axis=-1) > 0)
    assert indices.min() >= 0 and indices.max() < num_patches
    draws = indices.shape[0] * indices.shape[1]
    counts = np.bincount(indices.ravel(), minlength=num_patches)
    # Kept with probability keep / N (1 - p up to the rounding of keep), a binomial
    # over the draws; 5 standard deviations, for 49 or 64 positions at once.
    expected = keep / num_patches
    sigma = math.sqrt(expected * (1 - expected) / draws)
    np.testing.assert_allclose(counts / draws, expected, atol=5 * sigma, rtol=0)
    # The sets differ from image to image and from step to step (two equal ones
    # would be a chance of 1 in C(49, 24) ~ 6e13).
    sets = {tuple(row) for row in indices.reshape(draws, keep)}
    assert len(sets) == draws


def test_every_subset_is_equally_likely():
    """All C(6, 3) = 20 subsets of a 6-patch image, chi-squared over 4,000 draws:
    equal marginals alone would allow a biased choice of subsets."""
    indices = drawn_indices(6, 0.5, steps=50, rows=80, seed=3)
    subsets = {s: i for i, s in enumerate(itertools.combinations(range(6), 3))}
    observed = np.bincount(
        [subsets[tuple(row)] for row in indices.reshape(-1, 3)], minlength=20
    )
    _, p_value = scipy.stats.chisquare(observed)
    assert p_value > 1e-4, observed


def test_masks_follow_the_seed():
    a, b = drawn_indices(16, 0.5, 2, 8, seed=0), drawn_indices(16, 0.5, 2, 8, seed=1)
    np.testing.assert_array_equal(a, drawn_indices(16, 0.5, 2, 8, seed=0))
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("class_token", [True, False])
def test_drop_patches_keeps_the_class_token_and_gathers_each_images_own(class_token):
    batch, num_patches, width, keep = 4, 16, 3, 5
    first = int(class_token)
    # Token t of image b holds 100 b + t in every channel.
    values = 100 * np.arange(batch)[:, None] + np.arange(first + num_patches)
    tokens = jnp.asarray(np.repeat(values[:, :, None], width, axis=2), jnp.float32)
    keys = jax.random.split(jax.random.key(7), batch)
    kept = np.asarray(drop_patches(tokens, keys, keep, class_token))
    indices = np.asarray(keep_indices(keys, num_patches, keep))
    assert kept.shape == (batch, first + keep, width)
    want = 100 * np.arange(batch)[:, None] + first + indices  # NumPy's gather
    if class_token:
        want = np.concatenate([100 * np.arange(batch)[:, None], want], axis=1)
    np.testing.assert_array_equal(kept, np.repeat(want[:, :, None], width, axis=2))


def images_and_tokens(batch=4, size=32, length=16):
    images = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
    # 1,000 ids fit every tiny model's text table.
    return images, jnp.asarray(example_tokens(batch, length, vocab_size=1000))


def image_embeddings(model, variables, images, tokens, keys=None):
    """The model's image embeddings, in training when `keys` are given."""
    apply = jax.jit(model.apply, static_argnames="train")
    train = keys is not None
    return apply(variables, images, tokens, train=train, patch_keys=keys)["image_emb"]


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-siglip"])
def test_evaluation_sees_every_token(name):
    """`train=False` ignores patch dropout: the same embeddings as a model without it;
    in training, dropping patches changes them, and keeping every patch does not."""
    images, tokens = images_and_tokens()
    plain = create_model(name, scan=False)
    dropping = create_model(name, scan=False, patch_dropout=0.5)
    variables = jax.jit(plain.init)(jax.random.key(0), images, tokens)
    keys = jax.random.split(jax.random.key(2), images.shape[0])
    want = image_embeddings(plain, variables, images, tokens)
    got = image_embeddings(dropping, variables, images, tokens)
    np.testing.assert_array_equal(got, want)
    dropped = image_embeddings(dropping, variables, images, tokens, keys)
    assert np.abs(dropped - want).max() > 1e-3
    # p = 0.01 keeps all 16 patches: the gather is then the identity.
    assert kept_patches(16, 0.01) == 16
    keep_all = create_model(name, scan=False, patch_dropout=0.01)
    every = image_embeddings(keep_all, variables, images, tokens, keys)
    np.testing.assert_allclose(every, want, atol=1e-6)


def test_bad_settings_are_refused():
    images, tokens = images_and_tokens()
    model = create_model("tiny-vit", scan=False, patch_dropout=0.5)
    variables = model.init(jax.random.key(0), images, tokens)
    with pytest.raises(ValueError, match="needs patch_keys"):
        model.apply(variables, images, tokens, train=True)
    resnet = create_model("tiny-rn", patch_dropout=0.5, sharded=False)
    with pytest.raises(ValueError, match="needs a ViT image tower"):
        resnet.init(jax.random.key(0), *images_and_tokens(size=64))
    config = tiny_config("tiny-rn", {"model.patch_dropout": 0.5})
    with pytest.raises(ConfigError, match="model.patch_dropout=0.5 needs a ViT"):
        validate_config(config)
    for value in (1.0, -0.1):
        config = tiny_config(overrides={"model.patch_dropout": value})
        with pytest.raises(ConfigError, match=r"model.patch_dropout.*\[0, 1\)"):
            validate_config(config)
    validate_config(tiny_config(overrides={"model.patch_dropout": 0.75}))


def test_xla_flop_count_matches_the_analytic_formula():
    """The analytic count (used for MFU on scanned steps) counts only kept patches:
    XLA's count of a training forward + backward, as tests/test_mfu.py's."""
    config = ModelConfig(
        64,
        VisionConfig(64, 2, 256, patch_size=8),  # 64 patches, 16 kept
        TextConfig(context_length=32, width=256, heads=4, layers=2),
    )
    model = create_model(config, scan=False, sharded=False, patch_dropout=0.75)
    batch = 8
    images = jnp.zeros((batch, 64, 64, 3))
    tokens = jnp.asarray(example_tokens(batch, 32))
    keys = jax.random.split(jax.random.key(0), batch)
    params = jax.eval_shape(model.init, jax.random.key(0), images, tokens)

    def loss(params, images, tokens, keys):
        out = model.apply(params, images, tokens, train=True, patch_keys=keys)
        logits = out["image_emb"] @ out["text_emb"].T
        return jnp.sum(jax.nn.log_softmax(logits)) + jnp.sum(
            jax.nn.log_softmax(logits.T)
        )

    lowered = jax.jit(jax.grad(loss)).lower(params, images, tokens, keys)
    counted = mfu.cost_flops(lowered.compile())
    analytic = mfu.analytic_flops(config, batch, 0.75)
    image = mfu.forward_flops_per_sample(config, 0.75)["image"]
    assert image < 0.5 * mfu.forward_flops_per_sample(config)["image"]
    assert abs(counted / analytic - 1) < 0.1, (counted, analytic)


# --- The train step, on the 8-device mesh.

MESH_SHAPE = (4, 2, 1)


def dropout_config(**overrides):
    return tiny_config(overrides={"model.patch_dropout": 0.5, **overrides})


@pytest.mark.slow
def test_gradcache_draws_the_masks_of_the_one_pass_step():
    """accum_steps = 2 (each micro-batch embedded, then re-run for its gradient) gives
    the one-pass step's losses, gradients and parameters: every image keeps the same
    patches, in both of GradCache's passes."""
    mesh = sharding.make_mesh(MESH_SHAPE)
    one_pass = run_steps(dropout_config(), mesh, 2)
    accumulated = run_steps(dropout_config(**{"train.accum_steps": 2}), mesh, 2)
    assert all(np.isfinite(m["loss"]) for m in one_pass[1])
    assert_same_run(accumulated, one_pass, METRICS)


@pytest.mark.slow
def test_a_resumed_step_draws_the_same_masks():
    """The masks come from the seed and `state.step` only: the state after step 1,
    given to a newly built step (as a restarted process would), repeats step 2 bit
    for bit; the same state at another step number draws other masks."""
    config = dropout_config()
    mesh = sharding.make_mesh(MESH_SHAPE)
    after_two, history = run_steps(config, mesh, 2)
    after_one, _ = run_steps(config, mesh, 1)  # the same run's first step

    model = model_from_config(config)
    tx = make_optimizer(config)
    _, shardings = abstract_train_state(model, tx, mesh)
    step = make_train_step(
        config, model, tx, learning_rate_schedule(config), mesh, shardings
    )
    data = model_batches(model, config.seed, config.train.batch_size)
    next(data)
    batch = sharding.shard_batch(next(data), mesh)
    with sharding.use_mesh(mesh):
        state, metrics = step(jax.device_put(after_one, shardings), batch)
        elsewhere = jax.device_put(
            after_one.replace(step=after_one.step + 5), shardings
        )
        _, other = step(elsewhere, batch)
    state, metrics, other = jax.device_get((state, metrics, other))
    for name in METRICS:
        np.testing.assert_array_equal(metrics[name], history[1][name], err_msg=name)
    jax.tree.map(np.testing.assert_array_equal, state.params, after_two.params)
    # The loss is taken before the update, so only the masks can change it.
    assert abs(float(other["loss"]) - float(history[1]["loss"])) > 1e-5
