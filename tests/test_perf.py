"""Performance features keep the numbers: bf16, attention paths, remat, FLOP counts,
MFU bookkeeping and the device prefetcher."""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclip import sharding
from jaxclip.config import ConfigError, base_config, validate_config
from jaxclip.data.pipeline import shapes_iterator
from jaxclip.models import CLIP, get_model_config
from jaxclip.models.layers import (
    REMAT_POLICIES,
    Transformer,
    dot_product_attention,
    gelu,
    heads_major_attention,
)
from jaxclip.models.registry import ModelConfig, TextConfig, VisionConfig
from jaxclip.train import mfu
from jaxclip.train.prefetch import DevicePrefetcher


def _tokens(batch: int, length: int) -> np.ndarray:
    tokens = np.zeros((batch, length), np.int32)
    tokens[:, :5] = [49406, 320, 1125, 539, 49407]
    tokens[1, 3:6] = [2368, 1929, 49407]
    return tokens


def test_bf16_embeddings_match_float32():
    config = get_model_config("tiny-vit")
    size = config.vision.image_size
    images = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    tokens = _tokens(2, config.text.context_length)
    fp32 = CLIP(config, dtype=jnp.float32)
    bf16 = CLIP(config, dtype=jnp.bfloat16)
    variables = jax.jit(fp32.init)(jax.random.key(0), images, tokens)
    # Parameters are float32 whatever the compute dtype; the layouts are identical.
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    assert jax.tree.structure(variables) == jax.tree.structure(
        jax.eval_shape(bf16.init, jax.random.key(0), images, tokens)
    )
    want = jax.jit(fp32.apply)(variables, images, tokens)
    got = jax.jit(bf16.apply)(variables, images, tokens)
    for key in ("image_emb", "text_emb"):
        assert want[key].dtype == got[key].dtype == jnp.float32  # unit norm in fp32
        # Unit vectors: an absolute error of 1e-2 is a relative error of 1e-2.
        np.testing.assert_allclose(got[key], want[key], atol=1e-2, err_msg=key)


def _reference_attention(q, k, v, causal):
    """Float64 softmax attention on [batch, length, heads, head_dim]."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if causal:
        length = q.shape[1]
        logits = logits + np.triu(np.full((length, length), -np.inf), 1)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_paths_equal_explicit_softmax(causal):
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 7, 3, 16))  # [b, l, h, d]
    want = _reference_attention(q, k, v, causal)
    got = dot_product_attention(q, k, v, causal)  # jax.nn.dot_product_attention
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    to_heads = lambda t: jnp.swapaxes(t, 1, 2)  # noqa: E731  [b, h, l, d]
    got = heads_major_attention(to_heads(q), to_heads(k), to_heads(v), causal)
    np.testing.assert_allclose(to_heads(got), want, rtol=1e-5, atol=1e-5)

    # And the gradients, against a float32 autodiff of the explicit formula.
    def explicit(q, k, v):
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
        if causal:
            logits = jnp.where(jnp.tril(jnp.ones((7, 7), bool)), logits, -jnp.inf)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits), v)

    def heads_major(q, k, v):
        out = heads_major_attention(to_heads(q), to_heads(k), to_heads(v), causal)
        return to_heads(out)

    cotangent = jax.random.normal(jax.random.key(1), q.shape)
    want_grads = jax.vjp(explicit, q, k, v)[1](cotangent)
    got_grads = jax.vjp(heads_major, q, k, v)[1](cotangent)
    for got, want in zip(got_grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gelu_and_its_gradient_match_the_erf_formula():
    x = np.linspace(-8.0, 8.0, 2001)
    from math import erf, exp, pi, sqrt

    want = np.array([t * 0.5 * (1 + erf(t / sqrt(2))) for t in x])
    want_grad = np.array(
        [0.5 * (1 + erf(t / sqrt(2))) + t * exp(-t * t / 2) / sqrt(2 * pi) for t in x]
    )
    x32 = jnp.asarray(x, jnp.float32)
    np.testing.assert_allclose(gelu(x32), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        jax.vmap(jax.grad(gelu))(x32), want_grad, rtol=1e-5, atol=1e-6
    )


def test_remat_policies_give_the_same_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 6, 32))
    params = jax.jit(Transformer(32, 2, 2, causal=True).init)(jax.random.key(1), x)

    def grads(remat: str):
        model = Transformer(32, 2, 2, causal=True, scan=True, remat=remat)
        loss = lambda p, x: jnp.sum(jnp.sin(model.apply(p, x)))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    reference = grads("none")
    for policy in REMAT_POLICIES:
        if policy == "none":
            continue
        jax.tree.map(
            lambda a, b, policy=policy: np.testing.assert_allclose(
                a, b, rtol=1e-5, atol=1e-6, err_msg=policy
            ),
            grads(policy),
            reference,
        )


def test_xla_flop_count_matches_the_analytic_formula():
    # A small CLIP whose matmuls dominate, as in real models (width 256).
    config = ModelConfig(
        64,
        VisionConfig(64, 2, 256, patch_size=16),
        TextConfig(context_length=32, width=256, heads=4, layers=2),
    )
    model = CLIP(config, scan=False)
    batch = 8
    images = jnp.zeros((batch, 64, 64, 3))
    tokens = jnp.asarray(_tokens(batch, 32))
    params = jax.eval_shape(model.init, jax.random.key(0), images, tokens)

    def loss(params, images, tokens):
        out = model.apply(params, images, tokens)
        logits = out["image_emb"] @ out["text_emb"].T
        return jnp.sum(jax.nn.log_softmax(logits)) + jnp.sum(
            jax.nn.log_softmax(logits.T)
        )

    lowered = jax.jit(jax.grad(loss)).lower(params, images, tokens)
    counted = mfu.cost_flops(lowered.compile())
    analytic = mfu.analytic_flops(config, batch)
    assert abs(counted / analytic - 1) < 0.1, (counted, analytic)


def test_peak_table_and_override():
    def device(kind):
        return types.SimpleNamespace(device_kind=kind)

    assert mfu.peak_flops(device("NVIDIA H100 80GB HBM3")) == 989e12
    assert mfu.peak_flops(device("NVIDIA H100 PCIe")) == 756e12
    assert mfu.peak_flops(device("NVIDIA A100-SXM4-80GB"), "float32") == 156e12
    assert mfu.peak_flops(device("TPU v5 lite")) == 197e12
    assert mfu.peak_flops(device("TPU v5p")) == 459e12
    assert mfu.peak_flops(device("TPU v6 lite")) == 918e12
    assert mfu.peak_flops(device("TPU v4")) == 275e12
    assert mfu.peak_flops(device("NVIDIA H200")) == 989e12
    assert mfu.peak_flops(device("cpu")) is None
    assert mfu.peak_flops(device("cpu"), override=1e11) == 1e11
    assert mfu.mfu(5e11, 2.0, 1e12) == pytest.approx(0.25)
    assert np.isnan(mfu.mfu(5e11, 2.0, None))


def test_analytic_counts_match_published_sizes():
    # Forward GFLOPs per image + text, as OpenCLIP's model profiles count them
    # (ViT-B-32: 4.41 + 2.96 GMACs; RN50: 5.45 + 2.96).
    vit = mfu.forward_flops_per_sample(get_model_config("ViT-B-32"))
    assert vit["image"] / 2e9 == pytest.approx(4.41, rel=0.01)
    assert vit["text"] / 2e9 == pytest.approx(2.98, rel=0.01)
    rn50 = mfu.forward_flops_per_sample(get_model_config("RN50"))
    assert rn50["image"] / 2e9 == pytest.approx(5.45, rel=0.07)


def test_prefetcher_keeps_the_consumed_state():
    mesh = sharding.make_mesh((8, 1, 1))
    plain = shapes_iterator(0, 8, 32, 16)
    prefetched = DevicePrefetcher(shapes_iterator(0, 8, 32, 16), mesh, size=2)
    for _ in range(3):
        want = next(plain)
        got = next(prefetched)
        prefetched.fill()  # two batches ahead now
        np.testing.assert_array_equal(np.asarray(got["images"]), want["images"])
        np.testing.assert_array_equal(np.asarray(got["tokens"]), want["tokens"])
        assert prefetched.get_state() == plain.get_state()
    prefetched.set_state(plain.get_state())
    np.testing.assert_array_equal(
        np.asarray(next(prefetched)["tokens"]), next(plain)["tokens"]
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("train.prefetch", 0),
        ("mfu.peak_flops", -1.0),
    ],
)
def test_performance_fields_are_validated(field, value):
    config = base_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        validate_config(config)


def test_unit_params_unboxed_for_remat():
    # remat policies build the same parameter tree as none (no converter changes).
    x = jnp.ones((1, 4, 16))
    trees = {
        policy: jax.tree.structure(
            nn.meta.unbox(
                jax.eval_shape(
                    Transformer(16, 2, 2, remat=policy).init, jax.random.key(0), x
                )
            )
        )
        for policy in REMAT_POLICIES
    }
    assert len(set(trees.values())) == 1
