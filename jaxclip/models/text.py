"""Causal text transformer, laid out like OpenCLIP's text tower."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxclip.models.layers import (
    StackOptions,
    constrain,
    layer_norm,
    logical,
    tower_transformer,
)


class TextTransformer(StackOptions):
    """Token + position embedding -> causal blocks -> ln_final -> EOT pooling -> proj.

    The pooled token is the end-of-text token, found as the argmax of the token ids
    (EOT has the largest id in the CLIP vocabulary), as in OpenAI CLIP. `act`,
    `mlp_ratio`, `dtype`, `scan` and `remat` are keyword-only (`StackOptions`).
    """

    vocab_size: int
    context_length: int
    width: int
    num_layers: int
    num_heads: int
    output_dim: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: int [batch, context_length] -> [batch, output_dim]."""
        if tokens.shape[-1] != self.context_length:
            raise ValueError(
                f"tokens have length {tokens.shape[-1]}, the model's context_length is "
                f"{self.context_length}"
            )
        token_embedding = nn.Embed(
            self.vocab_size,
            self.width,
            dtype=self.dtype,
            embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="token_embedding",
        )
        positional_embedding = self.param(
            "positional_embedding",
            logical(nn.initializers.normal(0.01), ("length", "embed")),
            (self.context_length, self.width),
        )
        x = token_embedding(tokens) + positional_embedding.astype(self.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        x = tower_transformer(self, causal=True)(x)
        x = layer_norm(x, "ln_final", self.dtype)
        eot = jnp.argmax(tokens, axis=-1)  # [batch]
        pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        text_projection = self.param(
            "text_projection",
            logical(nn.initializers.normal(self.width**-0.5), ("embed", "proj")),
            (self.width, self.output_dim),
        )
        return pooled @ text_projection.astype(self.dtype)
