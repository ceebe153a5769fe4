"""Image transforms. Images stay uint8 on the host; the device normalises them."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# OpenAI CLIP's pixel statistics (RGB, on the 0..1 scale).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP-style normalisation to [-1, 1]


def normalize_images(
    images: jax.Array,
    mean: tuple[float, float, float] = OPENAI_MEAN,
    std: tuple[float, float, float] = OPENAI_STD,
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
    """uint8 [batch, H, W, 3] -> float (pixels / 255 - mean) / std, on the device."""
    pixels = images.astype(jnp.float32) / 255.0
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return ((pixels - mean) / std).astype(dtype)
