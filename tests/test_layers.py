"""The layers keep the numbers whatever path computes them: bf16 compute, the two
attention paths, GELU, and the remat policies."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_util import example_tokens

from jaxclip.models import CLIP, get_model_config
from jaxclip.models.layers import (
    REMAT_POLICIES,
    Transformer,
    dot_product_attention,
    gelu,
    heads_major_attention,
)


def test_bf16_embeddings_match_float32():
    config = get_model_config("tiny-vit")
    size = config.vision.image_size
    images = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    tokens = example_tokens(2, config.text.context_length, config.text.vocab_size)
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
