"""CoCa: parameter counts against OpenCLIP 3.3.0, a float64 NumPy forward of tiny-coca
written from OpenCLIP's code, and OpenCLIP-layout weights in and out."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
from convert_util import random_variables

from jaxclip import sharding
from jaxclip.convert import load_weights, openclip, save_openclip
from jaxclip.convert.files import Weights
from jaxclip.convert.tensors import write_safetensors
from jaxclip.models.build import (
    create_model,
    make_encoders,
    parameter_counts,
    strip_axis_metadata,
)
from jaxclip.models.coca import CoCa
from jaxclip.models.registry import get_model_config

# `open_clip.create_model(name, device="meta")`, summed per top-level module.
OPENCLIP_COUNTS = json.loads(
    (
        Path(__file__).parent / "reference" / "openclip_3.3.0_coca_counts.json"
    ).read_text()
)


@pytest.mark.parametrize("name", sorted(OPENCLIP_COUNTS))
def test_parameter_counts_equal_openclip(name):
    counts = parameter_counts(create_model(name, sharded=False))  # jax.eval_shape
    expected = OPENCLIP_COUNTS[name]
    for part in ("total", "visual", "text", "text_decoder"):
        assert counts[part] == expected[part], part
    towers = counts["visual"] + counts["text"] + counts["text_decoder"]
    assert counts["total"] == towers + expected["logit_scale"]


def test_create_model_builds_coca_for_coca_names():
    assert isinstance(create_model("coca_ViT-B-32"), CoCa)
    assert not get_model_config("ViT-B-32").is_coca


# ---------------------------------------------------------------------------
# A float64 NumPy forward of OpenCLIP's CoCa, on OpenCLIP-layout tensors.
# ---------------------------------------------------------------------------

_erf = np.vectorize(math.erf)


def ln(x, sd, prefix):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * sd[f"{prefix}.weight"] + sd[
        f"{prefix}.bias"
    ]


def linear(x, sd, prefix):
    return x @ sd[f"{prefix}.weight"].T + sd[f"{prefix}.bias"]


def attention(queries, context, sd, prefix, heads, allowed=None):
    """torch's nn.MultiheadAttention: [b, n, d] queries, [b, m, c] keys/values;
    `allowed` [b, n, m] bool (True: may attend)."""
    width = sd[f"{prefix}.out_proj.weight"].shape[0]
    if f"{prefix}.in_proj_weight" in sd:
        wq, wk, wv = np.split(sd[f"{prefix}.in_proj_weight"], 3)
    else:
        wq, wk, wv = (sd[f"{prefix}.{p}_proj_weight"] for p in "qkv")
    bq, bk, bv = np.split(sd[f"{prefix}.in_proj_bias"], 3)
    dim = width // heads

    def split(x):  # [b, n, width] -> [b, heads, n, dim]
        return x.reshape(x.shape[0], x.shape[1], heads, dim).transpose(0, 2, 1, 3)

    q, k, v = (
        split(queries @ wq.T + bq),
        split(context @ wk.T + bk),
        split(context @ wv.T + bv),
    )
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dim)
    if allowed is not None:
        scores = np.where(allowed[:, None], scores, -np.inf)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    out = (scores / scores.sum(-1, keepdims=True)) @ v
    out = out.transpose(0, 2, 1, 3).reshape(queries.shape[0], queries.shape[1], width)
    return linear(out, sd, f"{prefix}.out_proj")


def block(x, sd, prefix, heads, allowed=None, context=None):
    """OpenCLIP's ResidualAttentionBlock (cross-attention when `context` is given)."""
    queries = ln(x, sd, f"{prefix}.ln_1")
    kv = queries if context is None else ln(context, sd, f"{prefix}.ln_1_kv")
    x = x + attention(queries, kv, sd, f"{prefix}.attn", heads, allowed)
    hidden = linear(ln(x, sd, f"{prefix}.ln_2"), sd, f"{prefix}.mlp.c_fc")
    hidden = hidden * 0.5 * (1 + _erf(hidden / math.sqrt(2)))
    return x + linear(hidden, sd, f"{prefix}.mlp.c_proj")


def numpy_coca(sd, config, images, tokens):
    """(image embedding, text embedding, caption logits of tokens[:, :-1])."""
    sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
    layers = config.vision.layers
    # Image tower: patches, class token, blocks, attentional pooler, ln_post.
    conv = sd["visual.conv1.weight"]  # [width, 3, p, p]
    patch = conv.shape[-1]
    batch, size = images.shape[0], images.shape[1]
    grid = size // patch
    patches = images.reshape(batch, grid, patch, grid, patch, 3)
    x = np.einsum("bgyhxc,ocyx->bgho", patches, conv).reshape(batch, grid * grid, -1)
    cls = np.broadcast_to(sd["visual.class_embedding"], (batch, 1, x.shape[-1]))
    x = np.concatenate([cls, x], 1) + sd["visual.positional_embedding"]
    x = ln(x, sd, "visual.ln_pre")
    for i in range(layers):
        x = block(x, sd, f"visual.transformer.resblocks.{i}", config.vision.heads)
    query = ln(sd["visual.attn_pool.query"], sd, "visual.attn_pool.ln_q")
    query = np.broadcast_to(query, (batch, *query.shape))
    pooled = attention(
        query,
        ln(x, sd, "visual.attn_pool.ln_k"),
        sd,
        "visual.attn_pool.attn",
        config.decoder.attn_pooler_heads,
    )
    pooled = ln(pooled, sd, "visual.ln_post")
    image_emb, image_tokens = pooled[:, 0] @ sd["visual.proj"], pooled[:, 1:]
    # Text tower: CLS appended; causal, with OpenCLIP's legacy pad mask (key 0 always
    # kept, key j >= 1 kept when token j - 1 is not padding).
    rows, length = tokens.shape
    x = sd["text.token_embedding.weight"][tokens]
    cls = np.broadcast_to(sd["text.cls_emb"], (rows, 1, x.shape[-1]))
    x = np.concatenate([x, cls], 1) + sd["text.positional_embedding"][: length + 1]
    allowed = np.zeros((rows, length + 1, length + 1), bool)
    for r in range(rows):
        for q in range(length + 1):
            for k in range(q + 1):
                allowed[r, q, k] = k == 0 or tokens[r, k - 1] != 0
    for i in range(config.text.layers):
        x = block(x, sd, f"text.transformer.resblocks.{i}", config.text.heads, allowed)
    text_emb = ln(x[:, -1], sd, "text.ln_final") @ sd["text.text_projection"]
    # Decoder on the text tokens but the last (teacher forcing).
    x = x[:, :-2]
    causal = np.tril(np.ones((x.shape[1], x.shape[1]), bool))[None].repeat(rows, 0)
    for i in range(config.decoder.layers):
        heads = config.decoder.heads
        x = block(x, sd, f"text_decoder.resblocks.{i}", heads, causal)
        x = block(x, sd, f"text_decoder.cross_attn.{i}", heads, context=image_tokens)
    logits = ln(x, sd, "text_decoder.ln_final") @ sd["text_decoder.text_projection"]
    unit = lambda e: e / np.linalg.norm(e, axis=-1, keepdims=True)  # noqa: E731
    return unit(image_emb), unit(text_emb), logits


ROWS = 4  # divides the (data, fsdp) = (2, 2) batch axes of the sharded test


def tiny_inputs(config):
    """ROWS images, and token rows with 2, 6, 4 and L - 2 tokens between the start
    and the end of text (the others padding)."""
    rng = np.random.default_rng(1)
    size = config.vision.image_size
    images = rng.standard_normal((ROWS, size, size, 3)).astype(np.float32)
    length = config.text.context_length
    tokens = np.zeros((ROWS, length), np.int32)
    for row, n in enumerate([2, 6, 4, length - 2]):
        tokens[row, : n + 1] = rng.integers(1, config.text.vocab_size - 1, n + 1)
        tokens[row, n + 1] = config.text.vocab_size - 1  # end of text
    return images, tokens


@functools.cache
def tiny_variables(fused: bool = False):
    config = get_model_config("tiny-coca")
    if fused:  # pooler queries as wide as the image tokens: torch fuses its q/k/v
        config = dataclasses.replace(
            config,
            vision=dataclasses.replace(config.vision, width=32, head_width=16),
        )
    return config, random_variables(config, seed=0)


@functools.cache
def tiny_forward(fused: bool = False) -> dict[str, np.ndarray]:
    """The scanned model's forward on `tiny_inputs`, one device (compiled once)."""
    config, variables = tiny_variables(fused)
    model = create_model(config, scan=True, sharded=False)
    out = jax.jit(model.apply)(variables, *tiny_inputs(config))
    return {key: np.asarray(value) for key, value in out.items()}


@pytest.mark.parametrize("fused", [False, True])
def test_forward_matches_numpy_float64(fused):
    config, variables = tiny_variables(fused)
    out = tiny_forward(fused)
    image_emb, text_emb, logits = numpy_coca(
        openclip.to_openclip(variables, config), config, *tiny_inputs(config)
    )
    assert out["image_emb"].dtype == out["text_emb"].dtype == np.float32
    assert out["logits"].shape == (ROWS, config.text.context_length - 1, 100)
    np.testing.assert_allclose(out["image_emb"], image_emb, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["text_emb"], text_emb, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["logits"], logits, atol=1e-5, rtol=0)
    assert np.abs(logits).max() > 0.1  # not trivially small


def test_methods_compose_unrolled():
    """decode(encode_image's tokens, encode_text's tokens[:, :-1]), unrolled, is the
    scanned forward's logits; and a shorter token row (captioning's prefix) gives the
    same logits for its positions: nothing looks ahead."""
    config, variables = tiny_variables()
    images, tokens = tiny_inputs(config)
    model = create_model(config, scan=False, sharded=False)

    @jax.jit
    def logits(variables, images, tokens):
        _, image_tokens = model.apply(variables, images, method=model.encode_image)
        _, text_tokens = model.apply(variables, tokens, method=model.encode_text)
        assert image_tokens.shape == (ROWS, config.decoder.n_queries - 1, 32)
        full = model.apply(
            variables, image_tokens, text_tokens[:, :-1], method=model.decode
        )
        _, prefix_tokens = model.apply(
            variables, tokens[:, :5], method=model.encode_text
        )
        prefix = model.apply(
            variables, image_tokens, prefix_tokens, method=model.decode
        )
        return full, prefix

    full, prefix = logits(variables, images, tokens)
    np.testing.assert_allclose(full, tiny_forward()["logits"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(prefix, full[:, :5], atol=1e-6, rtol=0)


def test_encoders_give_the_embeddings():
    """`make_encoders` (inference, zero-shot evaluation) on CoCa: the embeddings."""
    config, variables = tiny_variables()
    images, tokens = tiny_inputs(config)
    model = create_model(config, sharded=False)
    encoders = make_encoders(model, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    out = tiny_forward()
    image_emb = encoders.images(variables, images, pixels="normalized")
    np.testing.assert_allclose(image_emb, out["image_emb"], atol=1e-6)
    np.testing.assert_allclose(
        encoders.texts(variables, tokens), out["text_emb"], atol=1e-6
    )


def is_partitioned(leaf) -> bool:
    return isinstance(leaf, nn.Partitioned)


def test_sharded_forward_matches_one_device():
    """Every parameter carries logical axes: placed by them on a (data, fsdp, tensor)
    = (2, 2, 2) mesh, the forward gives one device's numbers."""
    config, variables = tiny_variables()
    images, tokens = tiny_inputs(config)
    model = create_model(config)  # unrolled on the 8 CPU devices
    mesh = sharding.make_mesh((2, 2, 2))
    boxed = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
    leaves = jax.tree.leaves(boxed, is_leaf=is_partitioned)
    unnamed = [x for x in leaves if not is_partitioned(x) and x.shape != ()]
    assert not unnamed  # only the logit scale has no axes
    shardings = strip_axis_metadata(sharding.logical_to_shardings(boxed, mesh))
    params = jax.device_put(variables, shardings)
    decoder = params["params"]["text_decoder"]
    P = jax.sharding.PartitionSpec  # noqa: N806
    assert decoder["text_projection"].sharding.spec == P("fsdp", "tensor")
    cross = decoder["layers"]["cross_attn"]["attn"]["in_proj_kernel"]
    assert cross.sharding.spec == P(None, "fsdp", None, "tensor", None)  # layers first
    with sharding.use_mesh(mesh):
        images = jax.device_put(images, sharding.batch_sharding(mesh, 4))
        tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, 2))
        out = jax.jit(model.apply)(params, images, tokens)
    expected = tiny_forward()
    for key in ("image_emb", "text_emb", "logits"):
        np.testing.assert_allclose(out[key], expected[key], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------
# Weights in and out.
# ---------------------------------------------------------------------------


def assert_same_bits(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("fused", [False, True])
def test_openclip_round_trip_is_bit_identical(tmp_path, fused):
    config, variables = tiny_variables(fused=fused)
    state = openclip.to_openclip(variables, config)
    pooler = "visual.attn_pool.attn."
    assert (pooler + "in_proj_weight" in state) == fused  # as torch stores it
    assert (pooler + "q_proj_weight" in state) != fused
    assert set(state) == set(openclip.expected_shapes(config))
    # The mapping alone, then through files: OpenCLIP's directory (with its config)
    # and a bare weights file (architecture from the shapes).
    assert_same_bits(openclip.from_openclip(state, config), variables)
    weights = Weights(config=config, variables=variables, name=None)
    save_openclip(weights, tmp_path / "dir")
    loaded = load_weights(tmp_path / "dir")
    assert loaded.config == config
    assert_same_bits(loaded.variables, variables)
    if not fused:
        write_safetensors(str(tmp_path / "bare.safetensors"), state)
        bare = load_weights(tmp_path / "bare.safetensors")
        assert bare.name == "tiny-coca" and bare.config == config
        assert_same_bits(bare.variables, variables)


def test_openclip_coca_config_is_read():
    """OpenCLIP 3.3.0's model_configs/coca_ViT-B-32.json, as written there."""
    model_cfg = {
        "embed_dim": 512,
        "vision_cfg": {
            "image_size": 224,
            "layers": 12,
            "width": 768,
            "patch_size": 32,
            "attentional_pool": True,
            "attn_pooler_heads": 8,
            "output_tokens": True,
        },
        "text_cfg": {
            "context_length": 76,
            "vocab_size": 49408,
            "width": 512,
            "heads": 8,
            "layers": 12,
            "embed_cls": True,
            "output_tokens": True,
        },
        "multimodal_cfg": {
            "context_length": 76,
            "vocab_size": 49408,
            "width": 512,
            "heads": 8,
            "layers": 12,
            "attn_pooler_heads": 8,
        },
        "custom_text": True,
    }
    config = openclip.config_from_openclip(model_cfg)
    assert config == get_model_config("coca_ViT-B-32")
    assert openclip.config_from_openclip(openclip.openclip_model_cfg(config)) == config
    model_cfg["text_cfg"]["embed_cls"] = False
    with pytest.raises(ValueError, match="text_cfg.embed_cls"):
        openclip.config_from_openclip(model_cfg)


def test_mismatched_state_dict_is_refused():
    config, variables = tiny_variables()
    state = openclip.to_openclip(variables, config)
    del state["text_decoder.cross_attn.1.ln_1_kv.weight"]
    with pytest.raises(ValueError, match="ln_1_kv"):
        openclip.from_openclip(state, config)
