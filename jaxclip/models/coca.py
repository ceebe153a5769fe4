"""OpenCLIP's CoCa (Yu et al. 2022, "Contrastive Captioners"): CLIP's two towers plus
a multimodal text decoder that captions the image.

    image -> ViT -> attentional pooler (n_queries) -> ln_post
             query 0 -> proj          = image embedding (contrastive)
             queries 1:               = image tokens (the decoder's context)
    text + CLS (appended) -> causal transformer
             CLS -> ln_final -> text_projection = text embedding (contrastive)
             the other tokens (before ln_final) -> decoder
    decoder: per layer, causal self-attention block then cross-attention block to
             the image tokens; ln_final; text_projection -> logits over the vocabulary

Parameter names follow OpenCLIP's `coca_model.py` where Linen allows (the converter,
`jaxclip.convert.coca`, maps the rest). This is OpenCLIP's own CoCa, not the paper's:
the pooler runs before `ln_post`, and the text tower's padding mask is shifted by one
position (OpenCLIP's legacy `correct_cls_mask=False`, which its weights were trained
with).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxclip.data.tokenizer import PAD_TOKEN
from jaxclip.models.clip import (
    CLIP_INIT_LOGIT_SCALE,
    l2_normalize,
    set_up_temperature,
    stack_fields,
    text_fields,
    vit_fields,
)
from jaxclip.models.layers import (
    CrossAttentionBlock,
    Dtype,
    ResidualAttentionBlock,
    StackOptions,
    constrain,
    head_width,
    layer_norm,
    logical,
    scanned,
    tower_transformer,
)
from jaxclip.models.registry import ModelConfig
from jaxclip.models.text import TextTransformer
from jaxclip.models.vit import VisionTransformer

PAD_ID = PAD_TOKEN  # OpenCLIP's CoCa pad_id: the text tower masks these keys


class PoolerAttention(nn.Module):
    """Multi-head attention whose queries and keys/values differ in width, like torch's
    `nn.MultiheadAttention(d_model, heads, kdim=context_dim, vdim=context_dim)`:
    separate `q_proj_kernel` [d_model, heads, head_dim], `k_proj_kernel` and
    `v_proj_kernel` [context_dim, heads, head_dim], a fused `in_proj_bias`
    [3, heads, head_dim], and `out_proj_kernel` [heads, head_dim, d_model]."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, queries: jax.Array, context: jax.Array) -> jax.Array:
        """queries [batch, n, d_model], context [batch, length, context_dim] ->
        [batch, n, d_model]."""
        d_model, context_dim = queries.shape[-1], context.shape[-1]
        head_dim = head_width(d_model, self.num_heads)
        shape = (self.num_heads, head_dim)
        axes = ("embed", "heads", "kv")
        init = nn.initializers.xavier_uniform(in_axis=0, out_axis=(1, 2))
        q_kernel = self.param("q_proj_kernel", logical(init, axes), (d_model, *shape))
        k_kernel = self.param(
            "k_proj_kernel", logical(init, axes), (context_dim, *shape)
        )
        v_kernel = self.param(
            "v_proj_kernel", logical(init, axes), (context_dim, *shape)
        )
        bias = self.param(
            "in_proj_bias",
            logical(nn.initializers.zeros, (None, "heads", "kv")),
            (3, *shape),
        ).astype(self.dtype)
        out_kernel = self.param(
            "out_proj_kernel",
            logical(nn.initializers.lecun_normal(), ("heads", "kv", "embed")),
            (*shape, d_model),
        )
        out_bias = self.param(
            "out_proj_bias", logical(nn.initializers.zeros, ("embed",)), (d_model,)
        )
        queries, context = queries.astype(self.dtype), context.astype(self.dtype)
        query = jnp.einsum("bnd,dhk->bnhk", queries, q_kernel.astype(self.dtype))
        key = jnp.einsum("bld,dhk->blhk", context, k_kernel.astype(self.dtype))
        value = jnp.einsum("bld,dhk->blhk", context, v_kernel.astype(self.dtype))
        out = jax.nn.dot_product_attention(
            query + bias[0], key + bias[1], value + bias[2]
        )
        out = constrain(out, ("batch", "length", "heads", "kv"))
        out = jnp.einsum("bnhk,hkd->bnd", out, out_kernel.astype(self.dtype))
        return out + out_bias.astype(self.dtype)


class AttentionalPooler(nn.Module):
    """OpenCLIP's `AttentionalPooler`: `n_queries` learned queries (`query`
    [n_queries, d_model], LayerNorm `ln_q`) attend over the LayerNorm'd (`ln_k`)
    tokens. [batch, length, context_dim] -> [batch, n_queries, d_model]."""

    d_model: int
    n_queries: int
    num_heads: int
    dtype: Dtype = jnp.float32
    norm_eps: float = 1e-5

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        query = self.param(
            "query",
            logical(nn.initializers.normal(1.0), ("length", "embed")),
            (self.n_queries, self.d_model),
        )
        tokens = layer_norm(tokens, "ln_k", self.dtype, self.norm_eps)
        query = layer_norm(query, "ln_q", self.dtype, self.norm_eps)
        query = jnp.broadcast_to(query, (tokens.shape[0], *query.shape))
        return PoolerAttention(self.num_heads, self.dtype, name="attn")(query, tokens)


class CoCaVisionTransformer(VisionTransformer):
    """OpenCLIP's ViT with `attentional_pool=True` and `output_tokens=True`: the
    tower's tokens -> `attn_pool` (`output_dim` wide) -> `ln_post`; the first pooled
    token through `proj` [output_dim, output_dim] is the embedding, the others are the
    image tokens. `pool` is unused (always the class token and `ln_pre`)."""

    n_queries: int = 256
    attn_pooler_heads: int = 8

    @nn.compact
    def __call__(
        self,
        images: jax.Array,
        train: bool = False,
        patch_keys: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """images float [batch, H, W, 3] -> (embedding [batch, output_dim],
        image tokens [batch, n_queries - 1, output_dim])."""
        self.check_image_size(images)
        if self.patch_dropout:
            raise ValueError("CoCa's image tower has no patch dropout here")
        tokens = self.norm(self.patch_tokens(images), "ln_pre")
        tokens = tower_transformer(self, causal=False)(tokens)
        pooled = AttentionalPooler(
            self.output_dim,
            self.n_queries,
            self.attn_pooler_heads,
            self.dtype,
            self.norm_eps,
            name="attn_pool",
        )(tokens)
        pooled = self.norm(pooled, "ln_post")  # [batch, n_queries, output_dim]
        pooled = constrain(pooled, ("batch", "length", "embed"))
        proj = self.param(
            "proj",
            logical(nn.initializers.normal(self.width**-0.5), ("embed", "proj")),
            (self.output_dim, self.output_dim),
        )
        return pooled[:, 0] @ proj.astype(self.dtype), pooled[:, 1:]


def text_attention_mask(tokens: jax.Array) -> jax.Array:
    """bool [batch, L + 1, L + 1], True where a query may attend, for token ids
    [batch, L] with the CLS token appended: causal, and without the keys OpenCLIP's
    CoCa marks as padding. OpenCLIP (`correct_cls_mask=False`, the default its CoCa
    weights were trained with) puts the CLS key's "always valid" flag first, so key 0
    is always valid and key j >= 1 is valid when token j - 1 is not padding: the pad
    mask lands one position late, and the CLS key follows the last token."""
    batch, length = tokens.shape
    valid = jnp.concatenate(
        [jnp.ones((batch, 1), bool), tokens != PAD_ID], axis=1
    )  # [batch, L + 1], by key
    positions = jnp.arange(length + 1)
    causal = positions[None, :] <= positions[:, None]  # [query, key]
    return causal[None] & valid[:, None, :]


class CoCaTextTransformer(TextTransformer):
    """OpenCLIP's text tower with `embed_cls=True` and `output_tokens=True`: a learned
    `cls_emb` is appended after the tokens (positions: `context_length + 1`); the
    CLS output through `ln_final` and `text_projection` is the embedding, the other
    outputs (before `ln_final`) are the text tokens for the decoder. `pool` is unused.

    Token rows may be shorter than `context_length` (captioning feeds prefixes)."""

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        mask: jax.Array | None = None,
        position: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array] | jax.Array:
        """tokens int [batch, L <= context_length] -> (embedding [batch, output_dim],
        text tokens [batch, L, width]).

        With `decode` (generation), the n tokens [batch, n] at `position` onwards ->
        their text tokens [batch, n, width] (no CLS: causal attention keeps it from
        the others), the keys and values cached; `mask` as in `decoding_mask`."""
        batch, length = tokens.shape
        if length > self.context_length:
            raise ValueError(
                f"tokens have length {length}, more than the model's context_length "
                f"{self.context_length}"
            )
        token_embedding = self.token_embedding()
        positional_embedding = self.param(
            "positional_embedding",
            logical(nn.initializers.normal(0.01), ("length", "embed")),
            (self.context_length + 1, self.width),
        )
        transformer = tower_transformer(self, causal=False)
        if self.decode:
            rows = jax.lax.dynamic_slice_in_dim(positional_embedding, position, length)
            x = token_embedding(tokens) + rows.astype(self.dtype)
            return transformer(x, mask, position)
        cls_emb = self.param(
            "cls_emb", logical(nn.initializers.normal(0.01), ("embed",)), (self.width,)
        )
        cls = jnp.broadcast_to(cls_emb.astype(self.dtype), (batch, 1, self.width))
        x = jnp.concatenate([token_embedding(tokens), cls], axis=1)
        x = x + positional_embedding[: length + 1].astype(self.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        x = transformer(x, text_attention_mask(tokens))
        pooled = layer_norm(x[:, -1], "ln_final", self.dtype, self.norm_eps)
        text_projection = self.param(
            "text_projection",
            logical(nn.initializers.normal(self.width**-0.5), ("embed", "proj")),
            (self.width, self.output_dim),
        )
        return pooled @ text_projection.astype(self.dtype), x[:, :-1]


def decoding_mask(tokens: jax.Array) -> jax.Array:
    """bool [batch, 1, L]: which of the L cached keys the text tower's queries may see
    during generation, for the token buffer [batch, L] (the tokens so far, padding
    after them): `text_attention_mask`'s padding rule (key 0 always, key j when token
    j - 1 is not padding); causality comes from the positions."""
    batch = tokens.shape[0]
    valid = jnp.concatenate(
        [jnp.ones((batch, 1), bool), tokens[:, :-1] != PAD_ID], axis=1
    )
    return valid[:, None, :]


class DecoderLayer(nn.Module):
    """One layer of OpenCLIP's `MultimodalTransformer`: a causal self-attention block
    (`resblocks`) then a cross-attention block (`cross_attn`) to the image tokens."""

    num_heads: int
    act: str
    mlp_ratio: float
    dtype: Dtype
    num_layers: int
    norm_eps: float
    decode: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        image_tokens: jax.Array | None,
        mask: jax.Array | None = None,
        position: jax.Array | None = None,
    ) -> tuple[jax.Array, None]:
        common = dict(
            act=self.act,
            mlp_ratio=self.mlp_ratio,
            dtype=self.dtype,
            num_layers=self.num_layers,
            norm_eps=self.norm_eps,
            decode=self.decode,
        )
        x, _ = ResidualAttentionBlock(
            self.num_heads, causal=True, **common, name="resblocks"
        )(x, mask, position)
        return CrossAttentionBlock(self.num_heads, **common, name="cross_attn")(
            x, image_tokens
        )


class MultimodalDecoder(StackOptions):
    """OpenCLIP's `MultimodalTransformer`: `num_layers` decoder layers, stacked on a
    `layers` axis like every jaxclip stack, then `ln_final` and a bias-free
    `text_projection` [width, vocab_size] to the logits."""

    width: int
    num_layers: int
    num_heads: int
    vocab_size: int

    @nn.compact
    def __call__(
        self,
        image_tokens: jax.Array | None,
        text_tokens: jax.Array,
        mask: jax.Array | None = None,
        position: jax.Array | None = None,
    ) -> jax.Array:
        """image tokens [batch, n, width], text tokens [batch, L, width] ->
        logits [batch, L, vocab_size].

        With `decode`: the text tokens at `position` onwards and `mask` [batch, 1,
        cache_length] (all True: the decoder masks no padding, and the mask sizes
        its cache); the first call's image tokens are cached, later calls pass
        None."""
        for name, tokens in (("image", image_tokens), ("text", text_tokens)):
            if tokens is not None and tokens.shape[-1] != self.width:
                raise ValueError(
                    f"{name} tokens are {tokens.shape[-1]} wide, the decoder "
                    f"{self.width}"
                )
        stack = scanned(DecoderLayer, self, self.num_layers)
        x, _ = stack(
            self.num_heads,
            self.act,
            self.mlp_ratio,
            self.dtype,
            self.num_layers,
            self.norm_eps,
            self.decode,
            name="layers",
        )(
            text_tokens.astype(self.dtype),
            None if image_tokens is None else image_tokens.astype(self.dtype),
            mask,
            position,
        )
        x = layer_norm(x, "ln_final", self.dtype, self.norm_eps)
        text_projection = self.param(
            "text_projection",
            logical(nn.initializers.normal(self.width**-0.5), ("embed", "vocab")),
            (self.width, self.vocab_size),
        )
        logits = x @ text_projection.astype(self.dtype)
        return constrain(logits, ("batch", "length", "vocab"))


class CoCa(nn.Module):
    """OpenCLIP's CoCa: the contrastive towers (`visual`, `text`), the captioning
    `text_decoder`, and the log temperature `logit_scale` (plus `logit_bias` with
    `use_logit_bias`). Build it with `jaxclip.models.build.create_model`.

    `cached=True` (`model.clone(cached=True)`, the same variables) is the generation
    form: `decode_step` with a key/value cache (jaxclip/models/generate.py)."""

    config: ModelConfig
    use_logit_bias: bool = False
    dtype: Dtype = jnp.float32
    scan: bool = True
    remat: str = "none"
    cached: bool = False

    def setup(self) -> None:
        cfg = self.config
        vision, text, decoder = cfg.vision, cfg.text, cfg.decoder
        if decoder is None or vision.is_resnet:
            raise ValueError("CoCa needs a ViT image tower and a `decoder` config")
        if decoder.width != cfg.embed_dim:
            raise ValueError(
                f"decoder.width {decoder.width} must equal embed_dim {cfg.embed_dim}: "
                "the decoder cross-attends to the pooled image tokens"
            )
        stack = stack_fields(self, cfg)
        self.visual = CoCaVisionTransformer(
            **vit_fields(cfg),
            n_queries=decoder.n_queries,
            attn_pooler_heads=decoder.attn_pooler_heads,
            **stack,
        )
        self.text = CoCaTextTransformer(**text_fields(cfg), **stack, decode=self.cached)
        self.text_decoder = MultimodalDecoder(
            width=decoder.width,
            num_layers=decoder.layers,
            num_heads=decoder.heads,
            vocab_size=text.vocab_size,
            act=cfg.act,
            mlp_ratio=decoder.mlp_ratio,
            **stack,
            decode=self.cached,
        )
        set_up_temperature(self, CLIP_INIT_LOGIT_SCALE)

    @property
    def has_logit_bias(self) -> bool:
        """Whether the model holds a `logit_bias` parameter."""
        return self.use_logit_bias or self.config.logit_bias

    def encode_image(
        self, images: jax.Array, train: bool = False, normalize: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """Normalised float images [batch, H, W, 3] -> (embeddings [batch, embed_dim],
        image tokens [batch, n_queries - 1, embed_dim])."""
        features, tokens = self.visual(images, train=train)
        return (l2_normalize(features) if normalize else features), tokens

    def encode_text(
        self, tokens: jax.Array, normalize: bool = True
    ) -> tuple[jax.Array, jax.Array]:
        """Token ids [batch, L] -> (embeddings [batch, embed_dim], text tokens
        [batch, L, text width])."""
        features, text_tokens = self.text(tokens)
        return (l2_normalize(features) if normalize else features), text_tokens

    def decode(self, image_tokens: jax.Array, text_tokens: jax.Array) -> jax.Array:
        """Image and text tokens -> next-token logits [batch, L, vocab_size]."""
        return self.text_decoder(image_tokens, text_tokens)

    def decode_step(
        self,
        tokens: jax.Array,
        position: jax.Array,
        buffer: jax.Array,
        image_tokens: jax.Array | None = None,
    ) -> jax.Array:
        """Generation (`cached=True`, apply with `mutable=["cache"]`): the next-token
        logits [batch, n, vocab_size] after the n tokens [batch, n] at `position`
        onwards, with the keys and values of the tokens before them cached.

        `buffer` int [batch, cache_length] is the token buffer (the tokens so far,
        padding after): it sizes the cache on the first call and gives the text
        tower's padding mask (`decoding_mask`). The first call passes the image
        tokens (`encode_image`), whose keys and values are cached; later calls None.
        """
        if not self.cached:
            raise ValueError(
                "decode_step needs the model's generation form: clone(cached=True)"
            )
        mask = decoding_mask(buffer)
        text_tokens = self.text(tokens, mask, position)
        return self.text_decoder(
            image_tokens, text_tokens, jnp.ones_like(mask), position
        )

    def __call__(
        self,
        images: jax.Array,
        tokens: jax.Array,
        train: bool = False,
        patch_keys: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Unit-norm embeddings (float32), the log scale (and bias), and the caption
        logits [batch, L - 1, vocab] of OpenCLIP's teacher forcing: the text tokens of
        `tokens[:, :-1]` predict the labels `tokens[:, 1:]`. The logits stay in the
        compute dtype (`[B, L, 49408]` is large); a loss upcasts them. `patch_keys`
        is the train step's (CLIP's patch dropout); CoCa has none, so it must be
        None."""
        if patch_keys is not None:
            raise ValueError("CoCa has no patch dropout: patch_keys must be None")
        image_emb, image_tokens = self.encode_image(images, train=train)
        text_emb, text_tokens = self.encode_text(tokens)
        out = {
            "image_emb": image_emb,
            "text_emb": text_emb,
            "logit_scale": self.logit_scale,
            "logits": self.decode(image_tokens, text_tokens[:, :-1]),
        }
        if self.has_logit_bias:
            out["logit_bias"] = self.logit_bias
        return out
