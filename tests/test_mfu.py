"""FLOP counts and MFU bookkeeping: XLA's count against the analytic formula, the
peak table, and published model sizes."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_util import example_tokens

from jaxclip.models import CLIP, get_model_config
from jaxclip.models.coca import CoCa
from jaxclip.models.registry import (
    DecoderConfig,
    ModelConfig,
    TextConfig,
    VisionConfig,
)
from jaxclip.train import mfu


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
    tokens = jnp.asarray(example_tokens(batch, 32))
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


def test_xla_flop_count_matches_the_analytic_formula_for_coca():
    # CoCa adds the attentional pooler, the text tower's CLS position and the
    # decoder (self- and cross-attention, the projection to the vocabulary).
    config = ModelConfig(
        256,
        VisionConfig(64, 2, 256, patch_size=16),
        TextConfig(context_length=32, width=256, heads=4, layers=2, vocab_size=4096),
        decoder=DecoderConfig(
            width=256, heads=4, layers=2, n_queries=16, attn_pooler_heads=4
        ),
    )
    model = CoCa(config, scan=False)
    batch = 8
    images = jnp.zeros((batch, 64, 64, 3))
    tokens = jnp.asarray(example_tokens(batch, 32))
    params = jax.eval_shape(model.init, jax.random.key(0), images, tokens)

    def loss(params, images, tokens):
        out = model.apply(params, images, tokens)
        logits = out["image_emb"] @ out["text_emb"].T
        captions = jnp.sum(jax.nn.log_softmax(out["logits"]))
        return jnp.sum(jax.nn.log_softmax(logits)) + captions

    lowered = jax.jit(jax.grad(loss)).lower(params, images, tokens)
    counted = mfu.cost_flops(lowered.compile())
    analytic = mfu.analytic_flops(config, batch)
    assert abs(counted / analytic - 1) < 0.1, (counted, analytic)
    per_sample = mfu.forward_flops_per_sample(config)
    assert per_sample["decoder"] > per_sample["image"]


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
