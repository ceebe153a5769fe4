"""OpenAI CLIP's ModifiedResNet image tower, weight-compatible with OpenCLIP.

Three changes from a torchvision ResNet: a 3-conv stem with an average pool, anti-
aliased strides (an average pool before the strided path instead of a strided conv),
and an attention pool instead of global average pooling.

The module tree mirrors OpenCLIP's `modified_resnet.py` name for name, so a torch key
maps to a Flax path by splitting on "." (docs/convert.md, "The mapping"):

    conv1 bn1 conv2 bn2 conv3 bn3                    the stem
    layer{1..4}/{block}/conv1 bn1 conv2 bn2 conv3 bn3   Bottlenecks, block = "0", "1", ...
    layer{1..4}/0/downsample/0 (conv) and /1 (BN)    only where the shape changes
    attnpool/positional_embedding, q_proj k_proj v_proj c_proj

Leaf conversions: a conv `weight` [out, in, kh, kw] is `kernel` [kh, kw, in, out]
(permute 2, 3, 1, 0); a linear `weight` [out, in] is `kernel` [in, out] (transpose);
BatchNorm `weight`/`bias` are `scale`/`bias` in `params`, and `running_mean`/
`running_var` are `mean`/`var` in the `batch_stats` collection (`num_batches_tracked`
has no counterpart).

Two known differences from torch's BatchNorm, both invisible at inference: Flax updates
`running_var` with the biased batch variance (torch uses the unbiased one, a factor
n / (n - 1) with n = batch * height * width), and its `momentum` is torch's 1 - momentum.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxclip.models.layers import Dtype, constrain, head_width, logical, matmul

EXPANSION = 4  # Bottleneck output channels = planes * 4
BN_EPS = 1e-5  # torch BatchNorm2d default
BN_MOMENTUM = 0.9  # Flax convention; torch's momentum=0.1

# torch's default init for Conv2d/Linear weights, kaiming_uniform(a=sqrt(5)), is
# uniform(+-1/sqrt(fan_in)): a variance scale of 1/3. OpenCLIP keeps it for the convs.
torch_default_kernel = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_default_bias(fan_in: int) -> nn.initializers.Initializer:
    """torch's default Linear bias init, uniform(+-1/sqrt(fan_in))."""
    bound = fan_in**-0.5

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv(nn.Module):
    """A bias-free conv with torch's padding (kernel // 2 on each side).

    The parameter is `kernel` [kh, kw, in, out], as `nn.Conv` names and shapes it. A
    1x1 conv with stride 1 is a matmul over the channels and runs as one: on the CPU,
    XLA's convolution takes several times longer than the same product as a dot, most
    of all in the weight gradient (`bench/conv.py`; docs/performance.md).
    """

    features: int
    kernel_size: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        size = self.kernel_size
        kernel = self.param(
            "kernel",
            logical(torch_default_kernel, (None, None, "conv_in", "conv_out")),
            (size, size, x.shape[-1], self.features),
            jnp.float32,
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        if size == 1 and self.stride == 1:  # a matmul over the channels
            return matmul(x, kernel[0, 0])
        pad = size // 2
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            (self.stride, self.stride),
            ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


def batch_norm(train: bool, dtype: Dtype, name: str, zero_init: bool = False):
    """BatchNorm2d: statistics and running averages in float32, output in `dtype`.

    No `axis_name`: the training step runs under `jax.jit` on a batch that is one
    global array sharded over devices, so the mean and variance over axis 0 are already
    global (XLA inserts the cross-device reductions). Under `shard_map`/`pmap` this would
    need an axis name; we never run the towers that way.
    """
    scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPS,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=logical(scale_init, ("conv_out",)),
        bias_init=logical(nn.initializers.zeros, ("conv_out",)),
        name=name,
    )


def avg_pool(x: jax.Array, size: int) -> jax.Array:
    """torch's AvgPool2d(size): kernel = stride = size, no padding, floor."""
    return nn.avg_pool(x, (size, size), strides=(size, size)) if size > 1 else x


class Downsample(nn.Module):
    """The shortcut when the shape changes: avgpool(stride) -> 1x1 conv ("0") -> BN ("1")."""

    features: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = avg_pool(x, self.stride)
        x = Conv(self.features, 1, dtype=self.dtype, name="0")(x)
        return batch_norm(train, self.dtype, name="1")(x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> avgpool(stride) -> 1x1 (x4 channels), plus the shortcut, then ReLU.

    All convs have stride 1; downsampling is the average pool (anti-aliasing).
    """

    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        out_features = self.planes * EXPANSION
        out = Conv(self.planes, 1, dtype=self.dtype, name="conv1")(x)
        out = nn.relu(batch_norm(train, self.dtype, "bn1")(out))
        out = Conv(self.planes, 3, dtype=self.dtype, name="conv2")(out)
        out = nn.relu(batch_norm(train, self.dtype, "bn2")(out))
        out = avg_pool(out, self.stride)
        out = Conv(out_features, 1, dtype=self.dtype, name="conv3")(out)
        # Zero-init the last BN scale so each block starts as (nearly) the identity,
        # as OpenCLIP's ModifiedResNet.init_parameters does.
        out = batch_norm(train, self.dtype, "bn3", zero_init=True)(out)
        if self.stride > 1 or x.shape[-1] != out_features:
            x = Downsample(out_features, self.stride, self.dtype, name="downsample")(
                x, train
            )
        return nn.relu(out + x)


class ResNetStage(nn.Module):
    """`blocks` Bottlenecks named "0", "1", ...; only the first one strides."""

    planes: int
    blocks: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        for index in range(self.blocks):
            stride = self.stride if index == 0 else 1
            x = Bottleneck(self.planes, stride, self.dtype, name=str(index))(x, train)
        return constrain(x, ("batch", None, None, None))


class AttentionPool2d(nn.Module):
    """One attention layer over the final feature map whose only query is its mean.

    Input [batch, height, width, channels] with height * width == spatial_size**2;
    output [batch, output_dim]. The softmax runs in float32.
    """

    spatial_size: int
    num_heads: int
    output_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        batch, height, width, channels = features.shape
        if height * width != self.spatial_size**2:
            raise ValueError(
                f"feature map {height}x{width} does not match the positional embedding "
                f"({self.spatial_size}x{self.spatial_size}); are the images "
                f"image_size={self.spatial_size * 32} pixels?"
            )
        head_dim = head_width(channels, self.num_heads)
        std = channels**-0.5  # OpenCLIP's init_parameters for q/k/v/c_proj

        # Row-major flattening, the same token order as torch's NCHW reshape.
        tokens = features.reshape(batch, height * width, channels)  # [b, hw, C]
        mean = jnp.mean(tokens, axis=1, keepdims=True, dtype=jnp.float32)
        tokens = jnp.concatenate([mean.astype(tokens.dtype), tokens], axis=1)
        positional_embedding = self.param(
            "positional_embedding",
            logical(nn.initializers.normal(std), ("length", "embed")),
            (self.spatial_size**2 + 1, channels),
            jnp.float32,
        )
        tokens = tokens.astype(self.dtype) + positional_embedding.astype(self.dtype)
        tokens = constrain(tokens, ("batch", "length", "embed"))  # [batch, 1 + hw, C]

        def projection(features: int, name: str, in_axis: str, out_axis: str):
            # The flat output axis of q/k/v is (heads, head_dim) merged, heads outer.
            return nn.Dense(
                features,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=logical(nn.initializers.normal(std), (in_axis, out_axis)),
                bias_init=logical(torch_default_bias(channels), (out_axis,)),
                name=name,
            )

        split = (batch, -1, self.num_heads, head_dim)
        query = projection(channels, "q_proj", "embed", "heads")(tokens[:, :1])
        key = projection(channels, "k_proj", "embed", "heads")(tokens)
        value = projection(channels, "v_proj", "embed", "heads")(tokens)
        query, key, value = (t.reshape(split) for t in (query, key, value))

        logits = jnp.einsum(
            "bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32
        ) * (head_dim**-0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        pooled = jnp.einsum("bhqk,bkhd->bqhd", weights, value)  # [batch, 1, heads, hd]
        pooled = pooled.reshape(batch, channels)
        out = projection(self.output_dim, "c_proj", "heads", "embed")(pooled)
        return constrain(out, ("batch", "embed"))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image encoder: images [batch, H, W, 3] -> embeddings [batch, output_dim].

    Images are float NHWC, already normalised. `dtype` is the compute dtype; parameters
    and BatchNorm statistics stay float32. `train=True` normalises with batch statistics
    and needs `mutable=["batch_stats"]` in `apply`.
    """

    layers: tuple[int, int, int, int]
    output_dim: int
    heads: int
    image_size: int = 224
    width: int = 64
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if len(self.layers) != 4:
            raise ValueError(f"layers={self.layers!r}; expected four stage depths")
        x = constrain(images.astype(self.dtype), ("batch", None, None, None))

        # The 3-conv stem: [b, H, W, 3] -> [b, H/4, W/4, width].
        stem_widths = (self.width // 2, self.width // 2, self.width)
        for index, features in enumerate(stem_widths, start=1):
            stride = 2 if index == 1 else 1
            x = Conv(features, 3, stride, self.dtype, name=f"conv{index}")(x)
            x = nn.relu(batch_norm(train, self.dtype, f"bn{index}")(x))
        x = avg_pool(x, 2)

        # Four stages: [b, H/4, W/4, width] -> [b, H/32, W/32, width * 32].
        for index, blocks in enumerate(self.layers):
            x = ResNetStage(
                planes=self.width * 2**index,
                blocks=blocks,
                stride=1 if index == 0 else 2,
                dtype=self.dtype,
                name=f"layer{index + 1}",
            )(x, train)

        return AttentionPool2d(
            spatial_size=self.image_size // 32,
            num_heads=self.heads,
            output_dim=self.output_dim,
            dtype=self.dtype,
            name="attnpool",
        )(x)
