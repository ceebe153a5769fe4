"""Building blocks shared by the towers: norms, attention, MLP, residual blocks, stacks.

Parameter names and shapes follow OpenCLIP's `transformer.py` so that weights convert
mechanically (see DESIGN.md §2.2). Every parameter carries logical axis names; the
rules in `jaxclip/sharding.py` map them onto the device mesh.
"""

from __future__ import annotations

from collections.abc import Callable
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
LN_EPS = 1e-5  # OpenAI / OpenCLIP LayerNorm epsilon (Flax's default is 1e-6).


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
    """Exact (erf) GELU, PyTorch's nn.GELU default."""
    return jax.nn.gelu(x, approximate=False)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Look up an activation by config name."""
    table = {"gelu": gelu, "quick_gelu": quick_gelu, "relu": jax.nn.relu}
    if name not in table:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(table)}"
        )
    return table[name]


def layer_norm(x: jax.Array, name: str, dtype: Dtype = jnp.float32) -> jax.Array:
    """LayerNorm with eps 1e-5, computed in float32 and cast back (as OpenCLIP does).

    Call it inside a compact method; it adds the submodule `name` with `scale`/`bias`.
    """
    norm = nn.LayerNorm(
        epsilon=LN_EPS,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        scale_init=logical(nn.initializers.ones, ("embed",)),
        bias_init=logical(nn.initializers.zeros, ("embed",)),
        name=name,
    )
    return norm(x.astype(jnp.float32)).astype(dtype)


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

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(
                f"width {width} is not divisible by heads {self.num_heads}"
            )
        head_dim = width // self.num_heads
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
        qkv = jnp.einsum("bld,dthk->tblhk", x, in_proj_kernel.astype(self.dtype))
        qkv = qkv + in_proj_bias.astype(self.dtype)[:, None, None]
        out = jax.nn.dot_product_attention(
            qkv[0], qkv[1], qkv[2], is_causal=self.causal
        )
        out = constrain(out, ("batch", "length", "heads", "kv"))  # [b, l, heads, k]
        out = jnp.einsum("blhk,hkd->bld", out, out_proj_kernel.astype(self.dtype))
        return out + out_proj_bias.astype(self.dtype)


class Mlp(nn.Module):
    """Two-layer MLP `c_fc -> act -> c_proj`, hidden width 4x."""

    mlp_ratio: float = 4.0
    act: str = "gelu"
    dtype: Dtype = jnp.float32
    fc_std: float | None = None
    proj_std: float | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        hidden = int(width * self.mlp_ratio)
        x = nn.Dense(
            hidden,
            dtype=self.dtype,
            kernel_init=logical(
                nn.initializers.normal(self.fc_std or (2 * width) ** -0.5),
                ("embed", "mlp"),
            ),
            bias_init=logical(nn.initializers.zeros, ("mlp",)),
            name="c_fc",
        )(x)
        x = constrain(activation(self.act)(x), ("batch", "length", "mlp"))
        return nn.Dense(
            width,
            dtype=self.dtype,
            kernel_init=logical(
                nn.initializers.normal(self.proj_std or width**-0.5), ("mlp", "embed")
            ),
            bias_init=logical(nn.initializers.zeros, ("embed",)),
            name="c_proj",
        )(x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    num_heads: int
    causal: bool = False
    act: str = "gelu"
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    num_layers: int = 12  # only for the initialisation scale of residual projections

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        width = x.shape[-1]
        # OpenCLIP's text-tower init: residual projections shrink with depth.
        proj_std = width**-0.5 * (2 * self.num_layers) ** -0.5
        x = constrain(x, ("batch", "length", "embed"))
        y = layer_norm(x, "ln_1", self.dtype)
        y = MultiHeadAttention(
            self.num_heads, self.causal, self.dtype, proj_std=proj_std, name="attn"
        )(y)
        x = x + y
        y = layer_norm(x, "ln_2", self.dtype)
        y = Mlp(self.mlp_ratio, self.act, self.dtype, proj_std=proj_std, name="mlp")(y)
        x = constrain(x + y, ("batch", "length", "embed"))
        return x, None  # (carry, per-layer output) as nn.scan expects


# Named rematerialisation policies, selectable by config (`model.remat`).
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Transformer(nn.Module):
    """A stack of residual blocks with one parameter layout: stacked on a `layers` axis.

    `scan=True` runs a `lax.scan` loop (fast compiles for deep models); `scan=False`
    fully unrolls the same scan, which is faster per step on the CPU. The parameters are
    identical either way, so checkpoints do not depend on the switch.
    """

    width: int
    num_layers: int
    num_heads: int
    causal: bool = False
    act: str = "gelu"
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    scan: bool = True
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"model.remat={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}"
            )
        block = ResidualAttentionBlock
        if self.remat != "none":
            block = nn.remat(
                block, policy=REMAT_POLICIES[self.remat], prevent_cse=False
            )
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.num_layers,
            unroll=1 if self.scan else self.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(
            self.num_heads,
            self.causal,
            self.act,
            self.mlp_ratio,
            self.dtype,
            self.num_layers,
            name="resblocks",
        )(x, None)
        return x
