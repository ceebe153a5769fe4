"""Vision Transformer image tower, laid out like OpenCLIP's `VisionTransformer`."""

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


class VisionTransformer(StackOptions):
    """Patch embedding (no bias) + class token + positions -> ln_pre -> blocks -> ln_post.

    The class token's final state goes through `ln_post` and a bias-free projection.
    `act`, `mlp_ratio`, `dtype`, `scan` and `remat` are keyword-only (`StackOptions`).
    """

    image_size: int
    patch_size: int
    width: int
    num_layers: int
    num_heads: int
    output_dim: int

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        """images: float [batch, H, W, 3], already normalised -> [batch, output_dim]."""
        del train  # no dropout or batch statistics in the ViT
        if images.shape[1] != self.image_size or images.shape[2] != self.image_size:
            raise ValueError(
                f"images are {images.shape[1]}x{images.shape[2]}, the model expects "
                f"{self.image_size}x{self.image_size}"
            )
        tokens = self.patch_tokens(images)
        tokens = layer_norm(tokens, "ln_pre", self.dtype)
        tokens = tower_transformer(self, causal=False)(tokens)
        pooled = layer_norm(tokens[:, 0], "ln_post", self.dtype)  # [batch, width]
        proj = self.param(
            "proj",
            logical(nn.initializers.normal(self.width**-0.5), ("embed", "proj")),
            (self.width, self.output_dim),
        )
        return pooled @ proj.astype(self.dtype)

    def patch_tokens(self, images: jax.Array) -> jax.Array:
        """Images -> class token and patches with positions, [batch, 1 + grid², width]."""
        scale = self.width**-0.5
        patches = nn.Conv(
            self.width,
            kernel_size=(self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            kernel_init=logical(
                nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")
            ),
            name="conv1",
        )(images.astype(self.dtype))
        batch = patches.shape[0]
        tokens = patches.reshape(batch, -1, self.width)  # [batch, grid*grid, width]
        class_embedding = self.param(
            "class_embedding",
            logical(nn.initializers.normal(scale), ("embed",)),
            (self.width,),
        )
        class_token = jnp.broadcast_to(
            class_embedding.astype(self.dtype), (batch, 1, self.width)
        )
        tokens = jnp.concatenate([class_token, tokens], axis=1)
        positional_embedding = self.param(
            "positional_embedding",
            logical(nn.initializers.normal(scale), ("length", "embed")),
            (tokens.shape[1], self.width),
        )
        tokens = tokens + positional_embedding.astype(self.dtype)
        return constrain(tokens, ("batch", "length", "embed"))
