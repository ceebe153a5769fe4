"""Text transformers: OpenCLIP's causal tower (CLIP) and SigLIP's bidirectional one."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxclip.models.layers import (
    Dense,
    StackOptions,
    constrain,
    layer_norm,
    logical,
    tower_transformer,
)

POOLS = ("argmax", "last")


class TextTransformer(StackOptions):
    """Token + position embedding -> blocks -> ln_final -> pooling -> projection.

    CLIP (the defaults): causal attention; the pooled token is the end-of-text token,
    found as the argmax of the token ids (EOT has the largest id in the CLIP
    vocabulary), as in OpenAI CLIP; a bias-free projection `text_projection`.
    SigLIP: `causal=False` (every token sees every other, padding included),
    `pool="last"` (the last position) and `proj_bias=True` (`text_projection` is a
    Dense layer with a bias). `act`, `mlp_ratio`, `dtype`, `scan`, `remat` and
    `norm_eps` are keyword-only (`StackOptions`).
    """

    vocab_size: int
    context_length: int
    width: int
    num_layers: int
    num_heads: int
    output_dim: int
    causal: bool = True
    pool: str = "argmax"
    proj_bias: bool = False

    def token_embedding(self) -> nn.Embed:
        """The token embedding table `[vocab, width]` (call inside `__call__`)."""
        return nn.Embed(
            self.vocab_size,
            self.width,
            dtype=self.dtype,
            embedding_init=logical(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="token_embedding",
        )

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: int [batch, context_length] -> [batch, output_dim]."""
        if tokens.shape[-1] != self.context_length:
            raise ValueError(
                f"tokens have length {tokens.shape[-1]}, the model's context_length is "
                f"{self.context_length}"
            )
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; expected one of {POOLS}")
        token_embedding = self.token_embedding()
        positional_embedding = self.param(
            "positional_embedding",
            logical(nn.initializers.normal(0.01), ("length", "embed")),
            (self.context_length, self.width),
        )
        x = token_embedding(tokens) + positional_embedding.astype(self.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        x = tower_transformer(self, causal=self.causal)(x)
        x = layer_norm(x, "ln_final", self.dtype, self.norm_eps)
        if self.pool == "last":
            pooled = x[:, -1]
        else:
            eot = jnp.argmax(tokens, axis=-1)  # [batch]
            pooled = jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        if self.proj_bias:
            return Dense(
                self.output_dim,
                ("embed", "proj"),
                self.width**-0.5,
                dtype=self.dtype,
                name="text_projection",
            )(pooled)
        text_projection = self.param(
            "text_projection",
            logical(nn.initializers.normal(self.width**-0.5), ("embed", "proj")),
            (self.width, self.output_dim),
        )
        return pooled @ text_projection.astype(self.dtype)
