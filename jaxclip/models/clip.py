"""The CLIP model: an image tower and a text tower meeting in one embedding space."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxclip.models.layers import Dtype
from jaxclip.models.registry import ModelConfig
from jaxclip.models.resnet import ModifiedResNet
from jaxclip.models.text import TextTransformer
from jaxclip.models.vit import VisionTransformer

# CLIP initialises the temperature at 0.07; SigLIP at scale 10 with bias -10.
CLIP_INIT_LOGIT_SCALE = math.log(1 / 0.07)
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)
SIGLIP_INIT_LOGIT_BIAS = -10.0
MAX_LOGIT_SCALE = math.log(100.0)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Unit-norm rows, computed in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def vit_fields(cfg: ModelConfig) -> dict:
    """A ViT image tower's sizes and activation, as `VisionTransformer` takes them."""
    vision = cfg.vision
    return dict(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        width=vision.width,
        num_layers=vision.layers,
        num_heads=vision.heads,
        output_dim=cfg.embed_dim,
        act=cfg.vision_act,
        mlp_ratio=vision.mlp_ratio,
    )


def text_fields(cfg: ModelConfig) -> dict:
    """The text tower's sizes and activation, as `TextTransformer` takes them."""
    text = cfg.text
    return dict(
        vocab_size=text.vocab_size,
        context_length=text.context_length,
        width=text.width,
        num_layers=text.layers,
        num_heads=text.heads,
        output_dim=cfg.embed_dim,
        act=cfg.text_act,
        mlp_ratio=text.mlp_ratio,
    )


def stack_fields(model: nn.Module, cfg: ModelConfig) -> dict:
    """What the transformer towers of `model` (a CLIP or CoCa) share
    (`layers.StackOptions`), apart from the MLP ratio and the activation."""
    return dict(
        dtype=model.dtype, scan=model.scan, remat=model.remat, norm_eps=cfg.norm_eps
    )


def set_up_temperature(model: nn.Module, init_scale: float) -> None:
    """In `model.setup()` (a CLIP or CoCa): the learnable log scale `logit_scale`,
    and where `model.has_logit_bias`, SigLIP's `logit_bias` (initialised to -10)."""
    model.logit_scale = model.param(
        "logit_scale", nn.initializers.constant(init_scale), ()
    )
    if model.has_logit_bias:
        model.logit_bias = model.param(
            "logit_bias", nn.initializers.constant(SIGLIP_INIT_LOGIT_BIAS), ()
        )


class CLIP(nn.Module):
    """Two towers plus a learnable log temperature (and, for SigLIP, a bias).

    `use_logit_bias=True` gives the SigLIP variant: the scale is initialised to log 10
    and a learned bias, the `logit_bias` parameter, to -10 (always on for the SigLIP
    architectures, `config.logit_bias`). `patch_dropout` > 0 drops that fraction of
    a ViT image tower's patch tokens in training (`VisionTransformer`; the train step
    passes one key per image as `patch_keys`). Build it with
    `jaxclip.models.build.create_model`, which also picks `scan` for the platform.
    """

    config: ModelConfig
    use_logit_bias: bool = False
    dtype: Dtype = jnp.float32
    scan: bool = True
    remat: str = "none"
    patch_dropout: float = 0.0

    def setup(self) -> None:
        cfg = self.config
        vision, text = cfg.vision, cfg.text
        # What both transformer towers share (`layers.StackOptions`), apart from the
        # MLP ratio and the activation, which are per tower.
        stack = stack_fields(self, cfg)
        if vision.is_resnet:
            if self.patch_dropout:
                raise ValueError(
                    f"patch_dropout={self.patch_dropout} needs a ViT image tower; "
                    "this model's is a ResNet (no patch tokens to drop)"
                )
            self.visual = ModifiedResNet(
                layers=tuple(vision.layers),
                output_dim=cfg.embed_dim,
                heads=vision.heads,
                image_size=vision.image_size,
                width=vision.width,
                dtype=self.dtype,
            )
        else:
            self.visual = VisionTransformer(
                **vit_fields(cfg),
                pool=vision.pool,
                patch_dropout=self.patch_dropout,
                **stack,
            )
        self.text = TextTransformer(
            **text_fields(cfg),
            causal=text.causal,
            pool=text.pool,
            proj_bias=text.proj_bias,
            **stack,
        )
        init_scale = (
            SIGLIP_INIT_LOGIT_SCALE if self.has_logit_bias else CLIP_INIT_LOGIT_SCALE
        )
        set_up_temperature(self, init_scale)

    @property
    def has_logit_bias(self) -> bool:
        """Whether the model holds a `logit_bias` parameter."""
        return self.use_logit_bias or self.config.logit_bias

    def encode_image(
        self,
        images: jax.Array,
        train: bool = False,
        normalize: bool = True,
        patch_keys: jax.Array | None = None,
    ) -> jax.Array:
        """Normalised float images [batch, H, W, 3] -> embeddings [batch, embed_dim].

        `patch_keys` (one PRNG key per image) draw the patch dropout masks when
        `train` and `patch_dropout` > 0."""
        if patch_keys is None:
            features = self.visual(images, train=train)
        else:
            features = self.visual(images, train=train, patch_keys=patch_keys)
        return l2_normalize(features) if normalize else features

    def encode_text(self, tokens: jax.Array, normalize: bool = True) -> jax.Array:
        """Token ids [batch, context_length] -> embeddings [batch, embed_dim]."""
        features = self.text(tokens)
        return l2_normalize(features) if normalize else features

    def __call__(
        self,
        images: jax.Array,
        tokens: jax.Array,
        train: bool = False,
        patch_keys: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Both towers: unit-norm embeddings plus the (log) scale and bias."""
        out = {
            "image_emb": self.encode_image(images, train=train, patch_keys=patch_keys),
            "text_emb": self.encode_text(tokens),
            "logit_scale": self.logit_scale,
        }
        if self.has_logit_bias:
            out["logit_bias"] = self.logit_bias
        return out
