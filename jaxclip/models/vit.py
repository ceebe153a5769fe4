"""Vision Transformer image towers: OpenCLIP's `VisionTransformer` (class token) and
SigLIP's (no class token, attention-pooling head)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxclip.models.layers import (
    Mlp,
    MultiHeadAttention,
    StackOptions,
    constrain,
    layer_norm,
    logical,
    tower_transformer,
)

POOLS = ("tok", "map")


def kept_patches(num_patches: int, patch_dropout: float) -> int:
    """How many of `num_patches` patch tokens patch dropout keeps: round((1 - p) N),
    at least one (a static count, so shapes stay static)."""
    return max(1, round((1 - patch_dropout) * num_patches))


def keep_indices(keys: jax.Array, num_patches: int, keep: int) -> jax.Array:
    """A uniformly random `keep`-subset of the patch positions of each image, drawn
    from its own PRNG key (`keys`: one per image, `[batch]`): int32 `[batch, keep]`,
    ascending.

    The positions of the `keep` smallest of N i.i.d. uniforms: by symmetry every
    subset of that size is equally likely.
    """
    noise = jax.vmap(lambda key: jax.random.uniform(key, (num_patches,)))(keys)
    noise = constrain(noise, ("batch", "length"))  # [batch, num_patches]
    # Ascending, so that keeping every patch is the identity (tested); attention
    # without a mask does not care about the order.
    return jnp.sort(jnp.argsort(noise, axis=-1)[:, :keep], axis=-1)


def drop_patches(
    tokens: jax.Array, keys: jax.Array, keep: int, class_token: bool
) -> jax.Array:
    """FLIP's patch dropout: [batch, (1 +) N, width] -> [batch, (1 +) keep, width],
    each image's class token (the first token, when `class_token`) and `keep` of its
    patches chosen at random (`keep_indices` with the image's key)."""
    first = 1 if class_token else 0
    patches = tokens[:, first:]
    indices = keep_indices(keys, patches.shape[1], keep)
    kept = jnp.take_along_axis(patches, indices[:, :, None], axis=1)
    if class_token:
        kept = jnp.concatenate([tokens[:, :1], kept], axis=1)
    return constrain(kept, ("batch", "length", "embed"))


class VisionTransformer(StackOptions):
    """Patch embedding + positions -> blocks -> final LayerNorm -> pooling.

    `pool="tok"` (CLIP): a class token, patch embedding without bias, `ln_pre` before
    the blocks; the class token's final state goes through `ln_post` and a bias-free
    projection to `output_dim`.

    `pool="map"` (SigLIP): no class token, patch embedding with bias, no `ln_pre`;
    `ln_post` normalises every token and a multi-head attention-pooling head
    (`MAPHead`) gives the embedding, `width` wide (no projection: `output_dim` must
    equal `width`).

    `patch_dropout` = p > 0 (FLIP, Li et al. 2023): in training only (`train=True`),
    each image keeps `kept_patches(N, p)` of its N patch tokens, a uniformly random
    subset drawn from its own key in `patch_keys` (`[batch]`), after the positions
    are added; the class token is always kept, and the MAP head attends over the
    kept patches. `train=False` sees every token.

    `act`, `mlp_ratio`, `dtype`, `scan`, `remat` and `norm_eps` are keyword-only
    (`StackOptions`).
    """

    image_size: int
    patch_size: int
    width: int
    num_layers: int
    num_heads: int
    output_dim: int
    pool: str = "tok"
    patch_dropout: float = 0.0

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        train: bool = False,
        patch_keys: jax.Array | None = None,
    ) -> jax.Array:
        """images: float [batch, H, W, 3], already normalised -> [batch, output_dim].

        `patch_keys`: one PRNG key per image, needed when `train` and
        `patch_dropout` > 0 (no other dropout or batch statistics in the ViT)."""
        self.check_image_size(images)
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; expected one of {POOLS}")
        if not 0 <= self.patch_dropout < 1:
            raise ValueError(f"patch_dropout={self.patch_dropout} must be in [0, 1)")
        tokens = self.patch_tokens(images)
        if train and self.patch_dropout > 0:
            if patch_keys is None:
                raise ValueError(
                    f"patch_dropout={self.patch_dropout} in training needs patch_keys, "
                    "one PRNG key per image"
                )
            num_patches = (self.image_size // self.patch_size) ** 2
            keep = kept_patches(num_patches, self.patch_dropout)
            tokens = drop_patches(tokens, patch_keys, keep, self.pool == "tok")
        if self.pool == "tok":
            tokens = self.norm(tokens, "ln_pre")
        tokens = tower_transformer(self, causal=False)(tokens)
        if self.pool == "map":
            if self.output_dim != self.width:
                raise ValueError(
                    f"an attention-pooled ViT has no projection: output_dim "
                    f"{self.output_dim} must equal its width {self.width}"
                )
            tokens = self.norm(tokens, "ln_post")
            return MAPHead(
                self.num_heads,
                self.mlp_ratio,
                self.act,
                self.dtype,
                self.norm_eps,
                name="attn_pool",
            )(tokens)
        pooled = self.norm(tokens[:, 0], "ln_post")  # [batch, width]
        proj = self.param(
            "proj",
            logical(nn.initializers.normal(self.width**-0.5), ("embed", "proj")),
            (self.width, self.output_dim),
        )
        return pooled @ proj.astype(self.dtype)

    def norm(self, x: jax.Array, name: str) -> jax.Array:
        return layer_norm(x, name, self.dtype, self.norm_eps)

    def check_image_size(self, images: jax.Array) -> None:
        """Refuse images `[batch, H, W, 3]` of another size than the tower's."""
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"images are {images.shape[1]}x{images.shape[2]}, the model expects "
                f"{self.image_size}x{self.image_size}"
            )

    def patch_tokens(self, images: jax.Array) -> jax.Array:
        """Images -> (class token and) patches with positions, [batch, tokens, width]."""
        class_token = self.pool == "tok"
        scale = self.width**-0.5 if class_token else 0.02
        patches = nn.Conv(
            self.width,
            kernel_size=(self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            use_bias=not class_token,
            dtype=self.dtype,
            kernel_init=logical(
                nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")
            ),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            name="conv1",
        )(images.astype(self.dtype))
        batch = patches.shape[0]
        tokens = patches.reshape(batch, -1, self.width)  # [batch, grid*grid, width]
        if class_token:
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


class MAPHead(nn.Module):
    """Multi-head attention pooling (big_vision's "MAP" head, SigLIP's image pooling).

    A learned probe attends over the tokens; then a pre-LN MLP with a residual:
    `y = attn(probe, tokens)`, `out = y + mlp(ln(y))`, [batch, width]. Parameters:
    `probe` [width], `attn` (fused q/k/v like the blocks'), `ln`, `mlp`.
    """

    num_heads: int
    mlp_ratio: float
    act: str
    dtype: jnp.dtype
    norm_eps: float

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        width = tokens.shape[-1]
        probe = self.param(
            "probe",
            logical(nn.initializers.normal(width**-0.5), ("embed",)),
            (width,),
        )
        query = jnp.broadcast_to(probe.astype(self.dtype), (tokens.shape[0], 1, width))
        pooled = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")(
            query, tokens
        )
        normed = layer_norm(pooled, "ln", self.dtype, self.norm_eps)
        pooled = pooled + Mlp(self.mlp_ratio, self.act, self.dtype, name="mlp")(normed)
        return pooled[:, 0]
