"""Contrastive losses: softmax (CLIP) and sigmoid (SigLIP), plus retrieval accuracy.

Both losses take globally sharded, L2-normalised embeddings `[batch, dim]` and the
learnable LOG of the logit scale. `impl` picks the implementation: "dense" builds the
whole `[batch, batch]` logit matrix and is the reference; a memory-efficient "ring"
version with the same signature and the same numbers registers itself later.

Logits and their softmax / log-sigmoid statistics are always computed in float32,
whatever the embedding dtype: at logit scale 100 a bf16 logit is off by up to 0.5.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# Float32 passes on TPU too; the default precision there would multiply in bf16.
_PRECISION = jax.lax.Precision.HIGHEST


def _check_embeddings(image_emb: jax.Array, text_emb: jax.Array) -> None:
    """Refuse embeddings that are not a matching pair of `[batch, dim]` arrays."""
    if jnp.ndim(image_emb) != 2 or jnp.ndim(text_emb) != 2:
        raise ValueError(
            "image_emb and text_emb must be 2-D [batch, dim], got shapes "
            f"{jnp.shape(image_emb)} and {jnp.shape(text_emb)}"
        )
    if jnp.shape(image_emb) != jnp.shape(text_emb):
        raise ValueError(
            "image_emb and text_emb must have the same shape [batch, dim], got "
            f"{jnp.shape(image_emb)} and {jnp.shape(text_emb)}"
        )


def _check_scalar(name: str, value: jax.Array | float) -> None:
    """Refuse a temperature or bias that is not a scalar."""
    if jnp.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")


def _similarities(image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
    """Float32 cosine similarities `[batch_images, batch_texts]`."""
    image = jnp.asarray(image_emb).astype(jnp.float32)
    text = jnp.asarray(text_emb).astype(jnp.float32)
    # On a mesh with explicit axes both operands are sharded over the batch, and
    # rows and columns cannot both take the same mesh axis: keep the rows sharded
    # like the images and the columns whole (the texts get all-gathered).
    sharding = jax.typeof(image).sharding
    out_sharding = None
    if sharding.mesh.axis_names:
        out_sharding = NamedSharding(sharding.mesh, P(sharding.spec[0], None))
    return jnp.matmul(image, text.T, precision=_PRECISION, out_sharding=out_sharding)


def _scaled_logits(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array | float
) -> jax.Array:
    """`exp(logit_scale) * image_emb @ text_emb.T` in float32, `[batch, batch]`."""
    scale = jnp.exp(jnp.asarray(logit_scale).astype(jnp.float32))
    return scale * _similarities(image_emb, text_emb)


def _clip_loss_dense(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array | float
) -> jax.Array:
    """Softmax CLIP loss on the whole logit matrix."""
    logits = _scaled_logits(image_emb, text_emb, logit_scale)
    batch = logits.shape[0]
    # A mask, not jnp.diagonal: the gather behind it has no unambiguous sharding
    # when the rows are sharded over an explicit mesh axis.
    matched = jnp.eye(batch, dtype=bool)
    image_to_text = jnp.where(matched, jax.nn.log_softmax(logits, axis=1), 0.0)
    text_to_image = jnp.where(matched, jax.nn.log_softmax(logits, axis=0), 0.0)
    return -0.5 * (jnp.sum(image_to_text) + jnp.sum(text_to_image)) / batch


def _siglip_loss_dense(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array | float,
    logit_bias: jax.Array | float,
) -> jax.Array:
    """Sigmoid SigLIP loss on the whole logit matrix."""
    logits = _scaled_logits(image_emb, text_emb, logit_scale)
    logits = logits + jnp.asarray(logit_bias).astype(jnp.float32)
    batch = logits.shape[0]
    labels = 2.0 * jnp.eye(batch, dtype=jnp.float32) - 1.0  # +1 matched, -1 not
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / batch


# Implementations by name; the ring version adds itself to both.
_CLIP_LOSS_IMPLS: dict[str, Callable[..., jax.Array]] = {"dense": _clip_loss_dense}
_SIGLIP_LOSS_IMPLS: dict[str, Callable[..., jax.Array]] = {"dense": _siglip_loss_dense}


def _lookup(impls: dict[str, Callable[..., jax.Array]], impl: str) -> Callable:
    """The implementation called `impl`, or a ValueError listing the known ones."""
    if impl not in impls:
        raise ValueError(f"impl={impl!r} is not one of {sorted(impls)}")
    return impls[impl]


def clip_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array | float,
    *,
    impl: str = "dense",
) -> jax.Array:
    """Softmax CLIP loss: mean of image→text and text→image cross-entropy.

    Logits are `exp(logit_scale) * image_emb @ text_emb.T`, `[batch, batch]`, with
    the matching pairs on the diagonal; each direction is averaged over the batch.
    Returns a float32 scalar.
    """
    _check_embeddings(image_emb, text_emb)
    _check_scalar("logit_scale", logit_scale)
    return _lookup(_CLIP_LOSS_IMPLS, impl)(image_emb, text_emb, logit_scale)


def siglip_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array | float,
    logit_bias: jax.Array | float,
    *,
    impl: str = "dense",
) -> jax.Array:
    """Sigmoid SigLIP loss: `-sum(log_sigmoid(labels * logits)) / batch`.

    Logits are `exp(logit_scale) * image_emb @ text_emb.T + logit_bias`; labels are
    +1 on the diagonal and -1 elsewhere. The sum runs over all pairs and is divided
    by the batch size, as in big_vision and OpenCLIP's SigLipLoss. Returns a float32
    scalar.
    """
    _check_embeddings(image_emb, text_emb)
    _check_scalar("logit_scale", logit_scale)
    _check_scalar("logit_bias", logit_bias)
    impl_fn = _lookup(_SIGLIP_LOSS_IMPLS, impl)
    return impl_fn(image_emb, text_emb, logit_scale, logit_bias)


def contrastive_accuracy(
    image_emb: jax.Array, text_emb: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Top-1 retrieval accuracy within the batch, `(image→text, text→image)`.

    image→text is the fraction of rows whose largest logit is on the diagonal,
    text→image the same for columns; ties go to the lower index. A positive logit
    scale changes no argmax, so none is taken. Float32 scalars, for logging.
    """
    _check_embeddings(image_emb, text_emb)
    similarities = _similarities(image_emb, text_emb)
    targets = jnp.arange(similarities.shape[0])
    image_to_text = jnp.mean(jnp.argmax(similarities, axis=1) == targets)
    text_to_image = jnp.mean(jnp.argmax(similarities, axis=0) == targets)
    return image_to_text.astype(jnp.float32), text_to_image.astype(jnp.float32)
