"""Building blocks shared by the towers: norms, attention, MLP, residual blocks, stacks.

Parameter names and shapes follow OpenCLIP's `transformer.py` so that weights convert
mechanically (docs/convert.md, "The mapping"). Every parameter carries logical axis
names; the rules in `jaxclip/sharding.py` map them onto the device mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# The logical axis names used by the models. `sharding.py` maps them to mesh axes.
#   batch    examples                     length   tokens / patches
#   embed    residual stream width        mlp      MLP hidden width
#   heads    attention heads              kv       per-head width
#   vocab    text vocabulary              layers   stacked layer axis (from nn.scan)
#   conv_in / conv_out   convolution channels
LN_EPS = 1e-5  # OpenAI / OpenCLIP LayerNorm epsilon; SigLIP's towers use 1e-6.


def logical(init: Callable, axes: tuple[str | None, ...]) -> Callable:
    """An initializer whose parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, axes)


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Annotate an activation with logical axis names (no-op without rules)."""
    return nn.with_logical_constraint(x, axes)


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI's approximation x * sigmoid(1.702 x), used by the original checkpoints."""
    return x * jax.nn.sigmoid(1.702 * x)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, PyTorch's nn.GELU default: x * (1 + erf(x / sqrt 2)) / 2."""
    return bias_gelu(x, jnp.zeros((), x.dtype))


@jax.custom_vjp
def bias_gelu(x: jax.Array, bias: jax.Array) -> jax.Array:
    """GELU(x + bias), exact (erf) form, with bias broadcast over leading axes.

    Faster than `jax.nn.gelu(x + bias)` on the CPU, the same numbers: `lax.erf` is a
    cheap rational approximation where `jax.nn.gelu`'s `erfc` becomes exponentials and
    selects, and the hand-written backward keeps only the matmul output `x` (alive
    anyway) instead of the biased input and a derivative factor: the forward pass
    writes one tensor, the backward reads two and writes one.
    """
    h = x + bias
    return h * (0.5 + 0.5 * jax.lax.erf(h * _SQRT_HALF))


def _bias_gelu_fwd(x: jax.Array, bias: jax.Array):
    return bias_gelu(x, bias), (x, bias)


def _bias_gelu_bwd(residuals: tuple[jax.Array, jax.Array], grad: jax.Array):
    # The barrier stops XLA from sharing erf(...) with the forward pass, which would
    # store it as an extra [tokens, hidden] buffer; recomputing it is cheaper.
    x, bias = jax.lax.optimization_barrier(residuals)
    h = x + bias
    cdf = 0.5 + 0.5 * jax.lax.erf(h * _SQRT_HALF)
    pdf = jnp.exp(-0.5 * h * h) * _INV_SQRT_2PI
    grad_x = grad * (cdf + h * pdf)
    grad_bias = jnp.sum(
        grad_x, axis=tuple(range(grad_x.ndim - bias.ndim)), dtype=jnp.float32
    )
    return grad_x, grad_bias.reshape(bias.shape).astype(bias.dtype)


bias_gelu.defvjp(_bias_gelu_fwd, _bias_gelu_bwd)
_SQRT_HALF = 0.5**0.5
_INV_SQRT_2PI = (2 * 3.141592653589793) ** -0.5


def _lookup(table: Mapping[str, Any], kind: str, name: str) -> Any:
    """`table[name]`, or a ValueError that lists the names `table` knows."""
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; expected one of {sorted(table)}")
    return table[name]


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU's tanh approximation (torch's `GELU(approximate='tanh')`), SigLIP's."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation named `name` (a key of `ACTIVATIONS`)."""
    return _lookup(ACTIVATIONS, "activation", name)


def layer_norm(
    x: jax.Array, name: str, dtype: Dtype = jnp.float32, eps: float = LN_EPS
) -> jax.Array:
    """LayerNorm computed in float32 and cast back (as OpenCLIP does).

    Call it inside a compact method; it adds the submodule `name` with `scale`/`bias`.
    """
    return LayerNorm(eps, name=name)(x).astype(dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis, statistics in float32; params `scale`, `bias`.

    The same parameters as `nn.LayerNorm`, with a hand-written backward that keeps only
    the input and the per-row mean and 1/std: autodiff of the textbook formula keeps
    the normalised activations and broadcast copies of the gain as well.
    """

    eps: float = LN_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param(
            "scale", logical(nn.initializers.ones, ("embed",)), (width,), jnp.float32
        )
        bias = self.param(
            "bias", logical(nn.initializers.zeros, ("embed",)), (width,), jnp.float32
        )
        return _layer_norm(x, scale, bias, self.eps)


def _layer_norm_stats(
    x: jax.Array, eps: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    inv_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return centred, mean, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float
) -> jax.Array:
    """float32 [..., width] out of any input dtype."""
    centred, _, inv_std = _layer_norm_stats(x, eps)
    return centred * inv_std * scale + bias


def _layer_norm_fwd(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float):
    centred, mean, inv_std = _layer_norm_stats(x, eps)
    return centred * inv_std * scale + bias, (x, mean, inv_std, scale)


def _layer_norm_bwd(eps: float, residuals, grad: jax.Array):
    del eps  # 1/std is among the residuals
    x, mean, inv_std, scale = jax.lax.optimization_barrier(residuals)  # as above
    normed = (x.astype(jnp.float32) - mean) * inv_std
    batch_axes = tuple(range(grad.ndim - 1))
    grad_scale = jnp.sum(grad * normed, axis=batch_axes)
    grad_bias = jnp.sum(grad, axis=batch_axes)
    grad_normed = grad * scale
    grad_x = inv_std * (
        grad_normed
        - jnp.mean(grad_normed, axis=-1, keepdims=True)
        - normed * jnp.mean(grad_normed * normed, axis=-1, keepdims=True)
    )
    return grad_x.astype(x.dtype), grad_scale, grad_bias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def head_width(width: int, num_heads: int) -> int:
    """The width of one attention head, once `width` splits evenly into `num_heads`."""
    if width % num_heads:
        raise ValueError(f"width {width} is not divisible by heads {num_heads}")
    return width // num_heads


class MultiHeadAttention(nn.Module):
    """Self-attention with a fused q/k/v projection, like torch's nn.MultiheadAttention.

    `in_proj_kernel` is [width, 3, heads, head_dim] (torch: in_proj_weight [3*width,
    width]); `out_proj_kernel` is [heads, head_dim, width] (torch: out_proj.weight).
    """

    num_heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32
    attn_std: float | None = None
    proj_std: float | None = None
    # Generation (`decode_attention`): keys and values are kept in the `cache`
    # collection; `cross` marks a cross-attention whose context is cached.
    decode: bool = False
    cross: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        inputs_kv: jax.Array | None = None,
        mask: jax.Array | None = None,
        position: jax.Array | None = None,
    ) -> jax.Array:
        """Self-attention over `x` [batch, length, width]; with `inputs_kv`, `x` holds
        the queries and `inputs_kv` [batch, length_kv, width] the keys and values.

        `mask`: bool [batch, length, length_kv], True where a query may attend (on top
        of the causal mask, if any); every query must keep at least one key.
        With `decode`, see `decode_attention` (`position`: the first query's)."""
        width = x.shape[-1]
        head_dim = head_width(width, self.num_heads)
        attn_std = self.attn_std or width**-0.5
        proj_std = self.proj_std or width**-0.5
        in_proj_kernel = self.param(
            "in_proj_kernel",
            logical(nn.initializers.normal(attn_std), ("embed", None, "heads", "kv")),
            (width, 3, self.num_heads, head_dim),
        )
        in_proj_bias = self.param(
            "in_proj_bias",
            logical(nn.initializers.zeros, (None, "heads", "kv")),
            (3, self.num_heads, head_dim),
        )
        out_proj_kernel = self.param(
            "out_proj_kernel",
            logical(nn.initializers.normal(proj_std), ("heads", "kv", "embed")),
            (self.num_heads, head_dim, width),
        )
        out_proj_bias = self.param(
            "out_proj_bias", logical(nn.initializers.zeros, ("embed",)), (width,)
        )
        x = x.astype(self.dtype)
        kernel = in_proj_kernel.astype(self.dtype)
        bias = in_proj_bias.astype(self.dtype)
        if self.decode:
            out = self.decode_attention(x, inputs_kv, kernel, bias, mask, position)
            out = jnp.einsum("blhk,hkd->bld", out, out_proj_kernel.astype(self.dtype))
        elif inputs_kv is not None:
            query = jnp.einsum("bld,dhk->blhk", x, kernel[:, 0]) + bias[0]
            key_value = jnp.einsum(
                "bld,dthk->tblhk", inputs_kv.astype(self.dtype), kernel[:, 1:]
            )
            key_value = key_value + bias[1:, None, None]
            out = dot_product_attention(
                query, key_value[0], key_value[1], self.causal, mask
            )
            out = jnp.einsum("blhk,hkd->bld", out, out_proj_kernel.astype(self.dtype))
        elif jax.default_backend() == "cpu":
            # Heads-major [3, batch, heads, length, head_dim] straight out of the
            # projection: the attention matmuls then batch over (batch, heads)
            # without transposing q, k, v or the output.
            qkv = jnp.einsum("bld,dthk->tbhlk", x, kernel) + bias[:, None, :, None]
            out = heads_major_attention(qkv[0], qkv[1], qkv[2], self.causal, mask)
            out = constrain(out, ("batch", "heads", "length", "kv"))  # [b, h, l, k]
            out = jnp.einsum("bhlk,hkd->bld", out, out_proj_kernel.astype(self.dtype))
        else:
            qkv = jnp.einsum("bld,dthk->tblhk", x, kernel) + bias[:, None, None]
            out = dot_product_attention(qkv[0], qkv[1], qkv[2], self.causal, mask)
            out = constrain(out, ("batch", "length", "heads", "kv"))  # [b, l, h, k]
            out = jnp.einsum("blhk,hkd->bld", out, out_proj_kernel.astype(self.dtype))
        return out + out_proj_bias.astype(self.dtype)

    def decode_attention(
        self,
        x: jax.Array,
        inputs_kv: jax.Array | None,
        kernel: jax.Array,
        bias: jax.Array,
        mask: jax.Array | None,
        position: jax.Array | None,
    ) -> jax.Array:
        """Attention of the n new tokens `x` [batch, n, width] for generation, with the
        keys and values kept in the `cache` collection (apply with
        `mutable=["cache"]`); every cached array has the batch on its axis 0 (axis 1
        once stacked over layers). Returns [batch, n, heads, head_dim].

        Self-attention (causal by position): `mask` bool [batch, n, cache_length]
        says which cached keys the queries may see besides causality, and its last
        axis sizes the cache `key`/`value` [batch, cache_length, heads, head_dim],
        zeros when first made. The new keys and values are written at `position`
        (the first new token's), and query i sees the keys at positions up to
        `position + i`.

        Cross-attention (`cross`): the first call's context `inputs_kv` is projected
        once into `cross_key`/`cross_value`; later calls read them (pass None)."""
        query = jnp.einsum("bld,dhk->blhk", x, kernel[:, 0]) + bias[0]
        if self.cross:

            def project(name: str, index: int) -> jax.Array:
                if inputs_kv is None:
                    raise ValueError(
                        f"the first decoding call needs the context ({name})"
                    )
                kv = jnp.einsum(
                    "bld,dhk->blhk", inputs_kv.astype(self.dtype), kernel[:, index]
                )
                return kv + bias[index]

            key = self.variable("cache", "cross_key", project, "cross_key", 1).value
            value = self.variable(
                "cache", "cross_value", project, "cross_value", 2
            ).value
            return dot_product_attention(query, key, value, causal=False)
        if mask is None or position is None:
            raise ValueError("cached self-attention needs a mask and a position")
        batch, length = x.shape[:2]
        cache_shape = (batch, mask.shape[-1], *query.shape[2:])
        new = jnp.einsum("bld,dthk->tblhk", x, kernel[:, 1:]) + bias[1:, None, None]
        cached = []
        for name, values in (("key", new[0]), ("value", new[1])):
            cache = self.variable("cache", name, jnp.zeros, cache_shape, self.dtype)
            start = (0, position, 0, 0)
            cache.value = jax.lax.dynamic_update_slice(cache.value, values, start)
            cached.append(cache.value)
        queries = position + jnp.arange(length)
        causal = jnp.arange(cache_shape[1])[None, :] <= queries[:, None]
        return dot_product_attention(query, *cached, causal=False, mask=mask & causal)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    causal: bool,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention on [batch, length, heads, head_dim] through
    `jax.nn.dot_product_attention`; on GPUs in bf16/fp16, cuDNN's fused kernel.
    `mask`: optional bool [batch, length_q, length_kv], True where a query may attend.

    Logits and the softmax run in float32 whatever the compute dtype.
    """
    if mask is not None:
        return jax.nn.dot_product_attention(
            query, key, value, mask=mask[:, None], is_causal=causal
        )
    if jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(
                query, key, value, is_causal=causal, implementation="cudnn"
            )
        except Exception as error:  # cuDNN refuses this shape or head size
            _warn_once(f"cuDNN attention unavailable ({error}); using XLA's")
    return jax.nn.dot_product_attention(query, key, value, is_causal=causal)


def heads_major_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    causal: bool,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Softmax attention on [batch, heads, length, head_dim], the CPU's layout.

    The same numbers as `jax.nn.dot_product_attention`, computed for XLA:CPU: the
    scale folds into the (small) query rather than the (large) logits, and the causal
    mask is a constant added to the logits inside the softmax's fusion rather than a
    select over a broadcast boolean mask.
    """
    head_dim = query.shape[-1]
    query = query * jnp.asarray(head_dim**-0.5, query.dtype)
    logits = jnp.einsum(
        "bhqk,bhsk->bhqs", query, key, preferred_element_type=jnp.float32
    )
    if causal:
        logits = logits + causal_bias(query.shape[-2], key.shape[-2])
    if mask is not None:  # [batch, length_q, length_kv], True where allowed
        logits = jnp.where(mask[:, None], logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.einsum("bhqs,bhsk->bhqk", probs, value)


def causal_bias(queries: int, keys: int) -> jax.Array:
    """[queries, keys] float32: 0 where a query may attend, a huge negative elsewhere."""
    allowed = jnp.arange(keys)[None, :] <= jnp.arange(queries)[:, None]
    return jnp.where(allowed, 0.0, -1e30).astype(jnp.float32)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x @ kernel` for x [..., in] and kernel [in, out], as one 2-D matmul.

    Merging the leading axes first makes the weight gradient `x^T @ grad` a matmul
    over one contracted axis. XLA:CPU runs it several times slower with two or three
    contracted axes, and transposes the gradient for it (`bench/conv.py` measures the
    two forms on RN50's 1x1 convolutions).
    """
    out = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)
    return out.reshape(*x.shape[:-1], kernel.shape[-1])


class Dense(nn.Module):
    """`x @ kernel + bias`, then `act`: nn.Dense's parameters, with GELU's bias fused.

    kernel [in, out] and bias [out] carry the given logical axes, as in `nn.Dense`.
    """

    features: int
    axes: tuple[str, str]
    kernel_std: float
    act: str | None = None
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            logical(nn.initializers.normal(self.kernel_std), self.axes),
            (x.shape[-1], self.features),
            jnp.float32,
        )
        bias = self.param(
            "bias",
            logical(nn.initializers.zeros, self.axes[1:]),
            (self.features,),
            jnp.float32,
        )
        y = matmul(x.astype(self.dtype), kernel.astype(self.dtype))
        bias = bias.astype(self.dtype)
        if self.act == "gelu":
            return bias_gelu(y, bias)
        y = y + bias
        return activation(self.act)(y) if self.act else y


class Mlp(nn.Module):
    """Two-layer MLP `c_fc -> act -> c_proj`, hidden width `mlp_ratio` x the input's."""

    mlp_ratio: float = 4.0
    act: str = "gelu"
    dtype: Dtype = jnp.float32
    fc_std: float | None = None
    proj_std: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        hidden = int(width * self.mlp_ratio)
        x = Dense(
            hidden,
            ("embed", "mlp"),
            self.fc_std or (2 * width) ** -0.5,
            act=self.act,
            dtype=self.dtype,
            name="c_fc",
        )(x)
        x = constrain(x, ("batch", "length", "mlp"))
        return Dense(
            width,
            ("mlp", "embed"),
            self.proj_std or width**-0.5,
            dtype=self.dtype,
            name="c_proj",
        )(x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    `mask` (bool [batch, length, length], True where a query may attend) restricts the
    attention further than `causal` (CoCa's text tower masks padding this way)."""

    num_heads: int
    causal: bool = False
    act: str = "gelu"
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    num_layers: int = 12  # only for the initialisation scale of residual projections
    norm_eps: float = LN_EPS
    decode: bool = False  # generation: a key/value cache (`decode_attention`)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        position: jax.Array | None = None,
    ) -> tuple[jax.Array, None]:
        width = x.shape[-1]
        # OpenCLIP's text-tower init: residual projections shrink with depth.
        proj_std = width**-0.5 * (2 * self.num_layers) ** -0.5
        x = constrain(x, ("batch", "length", "embed"))
        y = layer_norm(x, "ln_1", self.dtype, self.norm_eps)
        y = MultiHeadAttention(
            self.num_heads,
            self.causal,
            self.dtype,
            proj_std=proj_std,
            decode=self.decode,
            name="attn",
        )(y, mask=mask, position=position)
        x = x + y
        y = layer_norm(x, "ln_2", self.dtype, self.norm_eps)
        y = Mlp(self.mlp_ratio, self.act, self.dtype, proj_std=proj_std, name="mlp")(y)
        x = constrain(x + y, ("batch", "length", "embed"))
        return x, None  # (carry, per-layer output) as nn.scan expects


class CrossAttentionBlock(nn.Module):
    """Pre-LN cross-attention block (OpenCLIP's `is_cross_attention=True`):
    x + attn(ln_1(x), ln_1_kv(context)), then x + mlp(ln_2(x)).

    `context` [batch, length_kv, width] holds the keys and values (CoCa: the image
    tokens); it has the queries' width. With `decode`, the first call's context is
    projected once and cached; later calls pass None."""

    num_heads: int
    act: str = "gelu"
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    num_layers: int = 12  # only for the initialisation scale of residual projections
    norm_eps: float = LN_EPS
    decode: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array | None
    ) -> tuple[jax.Array, None]:
        width = x.shape[-1]
        proj_std = width**-0.5 * (2 * self.num_layers) ** -0.5
        x = constrain(x, ("batch", "length", "embed"))
        query = layer_norm(x, "ln_1", self.dtype, self.norm_eps)
        if context is not None:
            context = layer_norm(context, "ln_1_kv", self.dtype, self.norm_eps)
        y = MultiHeadAttention(
            self.num_heads,
            dtype=self.dtype,
            proj_std=proj_std,
            decode=self.decode,
            cross=True,
            name="attn",
        )(query, context)
        x = x + y
        y = layer_norm(x, "ln_2", self.dtype, self.norm_eps)
        y = Mlp(self.mlp_ratio, self.act, self.dtype, proj_std=proj_std, name="mlp")(y)
        x = constrain(x + y, ("batch", "length", "embed"))
        return x, None


# Named rematerialisation policies. The config's `model.remat` is checked against
# these keys before anything compiles; `remat_policy` refuses an unknown name for a
# module built by hand.
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def remat_policy(name: str) -> Any:
    """The `jax.checkpoint` policy named `name` (a key of `REMAT_POLICIES`)."""
    return _lookup(REMAT_POLICIES, "remat policy", name)


class StackOptions(nn.Module):
    """How a stack of residual blocks computes, as keyword-only fields.

    `Transformer` and the towers that build one share these fields, so a tower passes
    them on unchanged (`tower_transformer`) and their defaults are written once.
    """

    _: dataclasses.KW_ONLY
    act: str = "gelu"
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    scan: bool = True  # False: unroll the layer loop (faster steps on the CPU)
    remat: str = "none"  # a key of REMAT_POLICIES
    norm_eps: float = LN_EPS  # every LayerNorm of the tower
    # generation: attention keeps a key/value cache (`MultiHeadAttention.decode`)
    decode: bool = False


def tower_transformer(tower: StackOptions, causal: bool) -> Transformer:
    """The block stack of a tower, named `transformer` as in OpenCLIP: the tower's
    `width`, `num_layers`, `num_heads` and its `StackOptions`. Call it inside the
    tower's compact method."""
    options = {
        field.name: getattr(tower, field.name)
        for field in dataclasses.fields(StackOptions)
        if field.name not in ("parent", "name")
    }
    return Transformer(
        tower.width,
        tower.num_layers,
        tower.num_heads,
        causal=causal,
        **options,
        name="transformer",
    )


class Transformer(StackOptions):
    """A stack of residual blocks with one parameter layout: stacked on a `layers` axis.

    `scan=True` runs a `lax.scan` loop (fast compiles for deep models); `scan=False`
    fully unrolls the same scan, which is faster per step on the CPU. The parameters are
    identical either way, so checkpoints do not depend on the switch.
    """

    width: int
    num_layers: int
    num_heads: int
    causal: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None = None,
        position: jax.Array | None = None,
    ) -> jax.Array:
        """x [batch, length, width]; `mask` as in `ResidualAttentionBlock`; with
        `decode`, `mask` and `position` as in `MultiHeadAttention.decode_attention`."""
        stack = scanned(ResidualAttentionBlock, self, self.num_layers)
        x, _ = stack(
            self.num_heads,
            self.causal,
            self.act,
            self.mlp_ratio,
            self.dtype,
            self.num_layers,
            self.norm_eps,
            self.decode,
            name="resblocks",
        )(x, mask, position)
        return x


def scanned(block: type[nn.Module], options: StackOptions, num_layers: int) -> Any:
    """`block` stacked `num_layers` times along a leading `layers` parameter axis, as
    `options.scan` and `options.remat` ask. Its call is `(carry, *broadcast) ->
    (carry, None)`: the other arguments (a mask, a context, a position, None) are the
    same in every layer. A generation cache (the `cache` collection) is stacked like
    the parameters."""
    if options.remat != "none":
        block = nn.remat(block, policy=remat_policy(options.remat), prevent_cse=False)
    return nn.scan(
        block,
        variable_axes={"params": 0, "cache": 0},
        split_rngs={"params": True},
        in_axes=nn.broadcast,
        length=num_layers,
        unroll=1 if options.scan else num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
