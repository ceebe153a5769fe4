"""Models: exact parameter counts against OpenCLIP, output shapes, model details."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxclip.data.tokenizer import special_tokens
from jaxclip.models import CLIP, get_model_config, list_models
from jaxclip.models.build import create_model, parameter_counts
from jaxclip.models.layers import Transformer, quick_gelu

# OpenCLIP's counts (`sum(p.numel() for p in model.parameters())`), logit scale included.
OPENCLIP_TOTALS = {
    "RN50": 102_007_137,
    "RN101": 119_688_033,
    "RN50x4": 178_300_601,
    "ViT-B-32": 151_277_313,
    "ViT-B-16": 149_620_737,
    "ViT-L-14": 427_616_513,
    "ViT-H-14": 986_109_441,
}
OPENCLIP_VISUAL = {"RN50": 38_316_896, "ViT-B-32": 87_849_216}


@functools.cache
def counts_of(name: str) -> dict[str, int]:
    """Parameter counts of a registered architecture, from a scanned trace (one layer
    traced per stack: the counts do not depend on scanning)."""
    return parameter_counts(create_model(name, sharded=False))


@pytest.mark.parametrize("name", sorted(OPENCLIP_TOTALS))
def test_parameter_counts_equal_openclip(name):
    counts = counts_of(name)
    assert counts["total"] == OPENCLIP_TOTALS[name]
    assert counts["total"] == counts["visual"] + counts["text"] + 1
    if name in OPENCLIP_VISUAL:
        assert counts["visual"] == OPENCLIP_VISUAL[name]
    # QuickGELU changes the activation, not the parameters.
    assert counts_of(f"{name}-quickgelu") == counts


def test_every_registered_model_builds():
    for name in list_models():
        counts = counts_of(name)
        # The logit scale, and SigLIP's logit bias.
        scalars = 2 if get_model_config(name).logit_bias else 1
        towers = counts["visual"] + counts["text"] + counts.get("text_decoder", 0)
        assert counts["total"] == towers + scalars, name


# OpenCLIP 3.3.0's own counts, `open_clip.create_model(name, device="meta")` summed by
# hand (it needs timm; OpenCLIP is not a dependency): {name: {total, visual, text}}.
OPENCLIP_SIGLIP = json.loads(
    (
        Path(__file__).parent / "reference" / "openclip_3.3.0_siglip_counts.json"
    ).read_text()
)


@pytest.mark.parametrize("name", sorted(OPENCLIP_SIGLIP))
def test_siglip_parameter_counts_match_openclip(name):
    counts = counts_of(name)
    expected = OPENCLIP_SIGLIP[name]
    assert (counts["total"], counts["visual"], counts["text"]) == (
        expected["total"],
        expected["visual"],
        expected["text"],
    )


def test_siglip_variant_adds_one_bias():
    plain = parameter_counts(create_model("tiny-vit"))
    assert (
        parameter_counts(create_model("tiny-vit", use_logit_bias=True))["total"]
        == plain["total"] + 1
    )


def test_unknown_model_name_is_refused():
    with pytest.raises(ValueError, match="model.name='ViT-Q-99'"):
        get_model_config("ViT-Q-99")


def test_openai_hyperparameters():
    assert get_model_config("ViT-H-14").vision.heads == 16  # head width 80
    assert get_model_config("ViT-B-32").vision.heads == 12  # width / 64
    assert get_model_config("RN50").vision.heads == 32  # width * 32 / 64
    assert get_model_config("RN50-quickgelu").act == "quick_gelu"
    assert get_model_config("RN50").act == "gelu"
    np.testing.assert_allclose(
        quick_gelu(jnp.array([1.0])), [1.0 / (1.0 + np.exp(-1.702))], rtol=1e-6
    )


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_clip_outputs(name):
    config = get_model_config(name)
    model = CLIP(config, use_logit_bias=True)
    size = config.vision.image_size
    images = jax.random.normal(jax.random.key(1), (3, size, size, 3))
    tokens = jnp.zeros((3, config.text.context_length), jnp.int32)
    sot, eot = special_tokens(config.text.vocab_size)
    tokens = tokens.at[:, 0].set(sot).at[:, 1].set(320).at[:, 2].set(eot)
    variables = jax.jit(model.init)(jax.random.key(0), images, tokens)
    out = jax.jit(model.apply)(variables, images, tokens)
    for key in ("image_emb", "text_emb"):
        assert out[key].shape == (3, config.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["logit_scale"], np.log(10.0), rtol=1e-6)
    np.testing.assert_allclose(out["logit_bias"], -10.0)
    plain = jax.jit(CLIP(config).init)(jax.random.key(0), images, tokens)
    np.testing.assert_allclose(
        plain["params"]["logit_scale"], np.log(1 / 0.07), rtol=1e-6
    )


def _ln(x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5)


def _reference_transformer(x, params, heads, causal):
    """Float64 NumPy pre-LN transformer with OpenCLIP's semantics (gains are 1 at init,
    biases are randomised by the caller)."""
    blocks = params["resblocks"]
    num_layers = blocks["ln_1"]["scale"].shape[0]
    length = x.shape[1]
    mask = np.triu(np.full((length, length), -np.inf), 1) if causal else 0.0
    for i in range(num_layers):
        p = jax.tree.map(lambda a, i=i: np.asarray(a[i], np.float64), blocks)
        h = _ln(x) * p["ln_1"]["scale"] + p["ln_1"]["bias"]
        qkv = np.einsum("bld,dthk->tblhk", h, p["attn"]["in_proj_kernel"])
        qkv += p["attn"]["in_proj_bias"][:, None, None]
        q, k, v = qkv
        scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1]) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        weights = scores / scores.sum(-1, keepdims=True)
        attn = np.einsum("bhqs,bshk->bqhk", weights, v)
        attn = np.einsum("bqhk,hkd->bqd", attn, p["attn"]["out_proj_kernel"])
        x = x + attn + p["attn"]["out_proj_bias"]
        h = _ln(x) * p["ln_2"]["scale"] + p["ln_2"]["bias"]
        h = h @ p["mlp"]["c_fc"]["kernel"] + p["mlp"]["c_fc"]["bias"]
        h = 0.5 * h * (1 + np.vectorize(_erf)(h / np.sqrt(2)))
        x = x + h @ p["mlp"]["c_proj"]["kernel"] + p["mlp"]["c_proj"]["bias"]
    return x


def _erf(v):
    import math

    return math.erf(v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scan", [True, False])
def test_transformer_against_numpy(causal, scan):
    x = np.random.default_rng(0).normal(size=(2, 5, 16))
    model = Transformer(width=16, num_layers=2, num_heads=2, causal=causal, scan=scan)
    x32 = jnp.asarray(x, jnp.float32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x32))["params"]
    # Random biases and gains, so that every parameter is exercised.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        treedef,
        [
            leaf + 0.1 * jax.random.normal(k, leaf.shape)
            for leaf, k in zip(leaves, keys)
        ],
    )
    got = jax.jit(model.apply)({"params": params}, x32)
    want = _reference_transformer(x, params, heads=2, causal=causal)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_scan_and_unrolled_share_parameters():
    x = jnp.ones((1, 4, 16))
    scanned = Transformer(16, 3, 2, scan=True)
    unrolled = Transformer(16, 3, 2, scan=False)
    params = jax.jit(scanned.init)(jax.random.key(0), x)
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.eval_shape(unrolled.init, jax.random.key(0), x)
    )
    np.testing.assert_allclose(
        jax.jit(scanned.apply)(params, x),
        jax.jit(unrolled.apply)(params, x),
        rtol=1e-5,
        atol=1e-6,
    )


def test_text_pools_at_end_of_text():
    config = get_model_config("tiny-vit")
    model = CLIP(config)
    length = config.text.context_length
    sot, eot = special_tokens(config.text.vocab_size)
    tokens = np.zeros((2, length), np.int32)
    tokens[:, :4] = [sot, 320, 1125, eot]
    images = jnp.zeros((2, 32, 32, 3))
    variables = jax.jit(model.init)(jax.random.key(0), images, tokens)
    encode = jax.jit(lambda t: model.apply(variables, t, method=model.encode_text))
    base = encode(tokens)
    # Tokens after EOT cannot change the embedding (causal mask + EOT pooling)...
    changed_after = tokens.copy()
    changed_after[1, 6] = 1000
    np.testing.assert_allclose(encode(changed_after), base, atol=1e-6)
    # ...tokens before it do.
    changed_before = tokens.copy()
    changed_before[1, 2] = 2368
    assert np.abs(np.asarray(encode(changed_before)[1] - base[1])).max() > 1e-3


def test_hand_built_stack_refuses_unknown_names():
    """A Transformer built without a config names the bad remat policy or activation
    and the ones it knows."""
    x = jnp.ones((1, 4, 16))
    with pytest.raises(ValueError, match=r"unknown remat policy 'sometimes'.*'dots'"):
        jax.eval_shape(
            Transformer(16, 1, 2, remat="sometimes").init, jax.random.key(0), x
        )
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*'quick_gelu'"):
        jax.eval_shape(Transformer(16, 1, 2, act="swish").init, jax.random.key(0), x)
