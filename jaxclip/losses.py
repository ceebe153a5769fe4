"""Contrastive losses: softmax (CLIP) and sigmoid (SigLIP), OpenCLIP's distillation
loss (a student's softmax against a frozen teacher's), plus retrieval accuracy; and
CoCa's caption loss (token cross-entropy, `caption_loss`).

The losses take globally sharded, L2-normalised embeddings `[batch, dim]` and the
learnable LOG of the logit scale. `impl` picks the implementation: "dense" builds the
whole `[batch, batch]` logit matrix and is the reference; "ring" (below) never holds
more than a `[chunk_size, local_batch]` piece of the logits per device, runs under
`jax.shard_map` over the batch axes of the mesh in context, and gives the same loss
and gradients.

Logits and their softmax / log-sigmoid statistics are always computed in float32,
whatever the embedding dtype: at logit scale 100 a bf16 logit is off by up to 0.5.
"""

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxclip.data.tokenizer import PAD_TOKEN
from jaxclip.ring import PRECISION, Ring, better, matmul32


def _check_embeddings(image_emb: jax.Array, text_emb: jax.Array, prefix="") -> None:
    """Refuse embeddings that are not a matching pair of `[batch, dim]` arrays.

    `prefix` goes before the arguments' names in the message ("teacher_").
    """
    names = f"{prefix}image_emb and {prefix}text_emb"
    if jnp.ndim(image_emb) != 2 or jnp.ndim(text_emb) != 2:
        raise ValueError(
            f"{names} must be 2-D [batch, dim], got shapes "
            f"{jnp.shape(image_emb)} and {jnp.shape(text_emb)}"
        )
    if jnp.shape(image_emb) != jnp.shape(text_emb):
        raise ValueError(
            f"{names} must have the same shape [batch, dim], got "
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
    return jnp.matmul(image, text.T, precision=PRECISION, out_sharding=out_sharding)


def _scaled_logits(
    image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array | float
) -> jax.Array:
    """`exp(logit_scale) * image_emb @ text_emb.T` in float32, `[batch, batch]`."""
    scale = jnp.exp(jnp.asarray(logit_scale).astype(jnp.float32))
    return scale * _similarities(image_emb, text_emb)


def _clip_loss_dense(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array | float,
    chunk_size: int = 0,
) -> jax.Array:
    """Softmax CLIP loss on the whole logit matrix (`chunk_size` is for the ring)."""
    del chunk_size
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
    chunk_size: int = 0,
) -> jax.Array:
    """Sigmoid SigLIP loss on the whole logit matrix (`chunk_size` is for the ring)."""
    del chunk_size
    logits = _scaled_logits(image_emb, text_emb, logit_scale)
    logits = logits + jnp.asarray(logit_bias).astype(jnp.float32)
    batch = logits.shape[0]
    labels = 2.0 * jnp.eye(batch, dtype=jnp.float32) - 1.0  # +1 matched, -1 not
    return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / batch


def _cross_entropy(teacher_logits, student_logits, axis):
    """`-sum(softmax(teacher) * log_softmax(student))` along `axis`."""
    teacher_probs = jax.nn.softmax(teacher_logits, axis=axis)
    return -jnp.sum(teacher_probs * jax.nn.log_softmax(student_logits, axis=axis), axis)


def _distill_loss_dense(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array | float,
    teacher_image_emb: jax.Array,
    teacher_text_emb: jax.Array,
    teacher_logit_scale: jax.Array | float,
    chunk_size: int = 0,
) -> jax.Array:
    """Distillation loss on the whole logit matrices (`chunk_size` is for the ring)."""
    del chunk_size
    student = _scaled_logits(image_emb, text_emb, logit_scale)
    # The teacher is frozen (the ring's backward pass gives it zeros too).
    teacher = jax.lax.stop_gradient(
        _scaled_logits(teacher_image_emb, teacher_text_emb, teacher_logit_scale)
    )
    image_to_text = jnp.mean(_cross_entropy(teacher, student, axis=1))
    text_to_image = jnp.mean(_cross_entropy(teacher, student, axis=0))
    return 0.5 * (image_to_text + text_to_image)


# Implementations by name; the ring versions add themselves at the end of the module.
_CLIP_LOSS_IMPLS: dict[str, Callable[..., jax.Array]] = {"dense": _clip_loss_dense}
_SIGLIP_LOSS_IMPLS: dict[str, Callable[..., jax.Array]] = {"dense": _siglip_loss_dense}
_DISTILL_LOSS_IMPLS: dict[str, Callable[..., jax.Array]] = {
    "dense": _distill_loss_dense
}


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
    chunk_size: int = 0,
) -> jax.Array:
    """Softmax CLIP loss: mean of image→text and text→image cross-entropy.

    Logits are `exp(logit_scale) * image_emb @ text_emb.T`, `[batch, batch]`, with
    the matching pairs on the diagonal; each direction is averaged over the batch.
    `chunk_size` (ring only) splits each device's tile into row chunks; 0 means
    whole tiles. Returns a float32 scalar.
    """
    _check_embeddings(image_emb, text_emb)
    _check_scalar("logit_scale", logit_scale)
    impl_fn = _lookup(_CLIP_LOSS_IMPLS, impl)
    return impl_fn(image_emb, text_emb, logit_scale, chunk_size)


def siglip_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array | float,
    logit_bias: jax.Array | float,
    *,
    impl: str = "dense",
    chunk_size: int = 0,
) -> jax.Array:
    """Sigmoid SigLIP loss: `-sum(log_sigmoid(labels * logits)) / batch`.

    Logits are `exp(logit_scale) * image_emb @ text_emb.T + logit_bias`; labels are
    +1 on the diagonal and -1 elsewhere. The sum runs over all pairs and is divided
    by the batch size, as in big_vision and OpenCLIP's SigLipLoss. `chunk_size` is as
    for `clip_loss`. Returns a float32 scalar.
    """
    _check_embeddings(image_emb, text_emb)
    _check_scalar("logit_scale", logit_scale)
    _check_scalar("logit_bias", logit_bias)
    impl_fn = _lookup(_SIGLIP_LOSS_IMPLS, impl)
    return impl_fn(image_emb, text_emb, logit_scale, logit_bias, chunk_size)


def distill_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    logit_scale: jax.Array | float,
    teacher_image_emb: jax.Array,
    teacher_text_emb: jax.Array,
    teacher_logit_scale: jax.Array | float,
    *,
    impl: str = "dense",
    chunk_size: int = 0,
) -> jax.Array:
    """OpenCLIP's `DistillClipLoss` term: the student's cross-entropy to the teacher.

    With student logits `z = exp(logit_scale) * image_emb @ text_emb.T` and teacher
    logits `y` likewise from the teacher's embeddings and log scale (both
    `[batch, batch]`), the loss is the mean over rows of
    `-sum_j softmax_j(y) * log_softmax_j(z)` (image→text) and the same over columns
    (text→image), averaged. The teacher's embedding dim may differ from the
    student's; its inputs get no gradient (it is frozen). `chunk_size` is as for
    `clip_loss`. Returns a float32 scalar.
    """
    _check_embeddings(image_emb, text_emb)
    _check_embeddings(teacher_image_emb, teacher_text_emb, "teacher_")
    if jnp.shape(teacher_image_emb)[0] != jnp.shape(image_emb)[0]:
        raise ValueError(
            "the teacher's batch must be the student's, got teacher embeddings "
            f"{jnp.shape(teacher_image_emb)} and student embeddings "
            f"{jnp.shape(image_emb)}"
        )
    _check_scalar("logit_scale", logit_scale)
    _check_scalar("teacher_logit_scale", teacher_logit_scale)
    impl_fn = _lookup(_DISTILL_LOSS_IMPLS, impl)
    teacher = (teacher_image_emb, teacher_text_emb, teacher_logit_scale)
    return impl_fn(image_emb, text_emb, logit_scale, *teacher, chunk_size)


def contrastive_accuracy(
    image_emb: jax.Array,
    text_emb: jax.Array,
    *,
    impl: str = "dense",
    chunk_size: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Top-1 retrieval accuracy within the batch, `(image→text, text→image)`.

    image→text is the fraction of rows whose largest logit is on the diagonal,
    text→image the same for columns; ties go to the lower index. A positive logit
    scale changes no argmax, so none is taken. Float32 scalars, for logging.
    `impl='ring'` finds the same argmaxes without the `[batch, batch]` matrix.
    """
    _check_embeddings(image_emb, text_emb)
    if impl == "ring":
        return _accuracy_ring(image_emb, text_emb, chunk_size)
    if impl != "dense":
        raise ValueError(f"impl={impl!r}; expected one of ['dense', 'ring']")
    similarities = _similarities(image_emb, text_emb)
    targets = jnp.arange(similarities.shape[0])
    image_to_text = jnp.mean(jnp.argmax(similarities, axis=1) == targets)
    text_to_image = jnp.mean(jnp.argmax(similarities, axis=0) == targets)
    return image_to_text.astype(jnp.float32), text_to_image.astype(jnp.float32)


# --- Caption loss (CoCa) ---------------------------------------------------------------
#
# The logits `[batch, length, vocab]` are the largest array of a CoCa step
# (`[B, 75, 49408]`). Every statistic below is a reduction over the vocabulary that
# XLA fuses with the float32 upcast, and the custom VJP keeps only the logits as they
# came (bf16 or float32) and a `[batch, length]` log-sum-exp for the backward pass,
# which builds the logits' gradient in one fused pass in their own dtype. Plain
# autodiff of log_softmax would keep float32 `[B, L, vocab]` residuals instead.

# OpenCLIP's CoCa pad id, the tokenizers' padding: labels equal to it are ignored
PAD_ID = PAD_TOKEN


def _label_mask(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """bool `[batch, length, vocab]`, True at each position's label (an iota compare
    that XLA fuses into its consumer; no gather along a possibly sharded vocab)."""
    vocab_ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return vocab_ids == labels[..., None]


def _token_losses_forward(logits, labels, label_smoothing):
    """Per-token smoothed cross-entropy, float32 `[batch, length]`, and the
    log-sum-exps its backward pass needs."""
    logits32 = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits32, axis=-1)
    label_logit = jnp.sum(jnp.where(_label_mask(logits, labels), logits32, 0.0), -1)
    mean_logit = jnp.mean(logits32, axis=-1)
    # torch's label smoothing: (1 - e) * -log p(label) + e * mean_j -log p(j)
    losses = lse - (1.0 - label_smoothing) * label_logit - label_smoothing * mean_logit
    return losses, lse


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _token_losses(
    logits: jax.Array, labels: jax.Array, label_smoothing: float
) -> jax.Array:
    return _token_losses_forward(logits, labels, label_smoothing)[0]


def _token_losses_fwd(logits, labels, label_smoothing):
    losses, lse = _token_losses_forward(logits, labels, label_smoothing)
    return losses, (logits, labels, lse)


def _token_losses_bwd(label_smoothing, residuals, grad):
    logits, labels, lse = residuals
    vocab = logits.shape[-1]
    # d loss / d logit_j = softmax_j - (1 - e) [j = label] - e / vocab
    target = jnp.where(_label_mask(logits, labels), 1.0 - label_smoothing, 0.0)
    probs = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    d_logits = (probs - target - label_smoothing / vocab) * grad[..., None]
    return d_logits.astype(logits.dtype), None


_token_losses.defvjp(_token_losses_fwd, _token_losses_bwd)


def count_labels(tokens: jax.Array) -> jax.Array:
    """The number of non-pad labels of token rows `[..., L]` (the labels are
    `tokens[..., 1:]`), int32: the caption loss's denominator."""
    return jnp.sum(tokens[..., 1:] != PAD_ID, dtype=jnp.int32)


def caption_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    num_labels: jax.Array | int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """CoCa's caption loss and token accuracy, `(loss, accuracy)` float32 scalars.

    `logits` `[batch, length, vocab]` (any float dtype; computed in float32) predict
    `labels` int `[batch, length]`; labels equal to `PAD_ID` count for nothing. The
    loss is the token cross-entropy with torch's `label_smoothing` (`(1 - e)` times
    the label's, plus `e` times the mean over the vocabulary's), summed over the
    non-pad labels and divided by `num_labels` (default: their count here), as
    OpenCLIP's `CoCaLoss` (`CrossEntropyLoss(ignore_index=pad_id)`) over the global
    batch. Accuracy is the fraction of non-pad labels that are the logits' argmax
    (ties go to the lower id), over `num_labels` too. With the whole batch's count
    as `num_labels`, micro-batches' results add up to the whole batch's.
    """
    if jnp.ndim(logits) != 3 or jnp.shape(logits)[:2] != jnp.shape(labels):
        raise ValueError(
            "logits must be [batch, length, vocab] and labels [batch, length], got "
            f"shapes {jnp.shape(logits)} and {jnp.shape(labels)}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
    valid = labels != PAD_ID
    if num_labels is None:
        num_labels = jnp.sum(valid, dtype=jnp.int32)
    # An all-pad batch has no labels: its loss is 0, not 0 / 0.
    denominator = jnp.maximum(num_labels, 1).astype(jnp.float32)
    losses = _token_losses(logits, labels, float(label_smoothing))
    loss = jnp.sum(jnp.where(valid, losses, 0.0)) / denominator
    hits = (jnp.argmax(logits, axis=-1) == labels) & valid
    accuracy = jnp.sum(hits, dtype=jnp.float32) / denominator
    return loss, accuracy


# --- Ring implementations ------------------------------------------------------------
#
# Embeddings are sharded over the batch axes of the mesh in context. Under shard_map,
# each device keeps its image rows while text blocks go round the ring (jaxclip/ring.py),
# so after R steps every image block has met every text block. One ring serves both
# directions: row statistics stay with the image rows, column statistics ride with
# their text block and come home with it. The backward pass runs the ring again from
# the saved log-sum-exps, recomputing each tile once; the text gradient rides with its
# block. Within a step, a device's tile is processed `chunk_size` image rows at a time.


def _ring_fn(body, in_specs, out_specs):
    """`body` under shard_map over the mesh in context."""
    mesh = jax.sharding.get_abstract_mesh()
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _tile(image: jax.Array, text: jax.Array) -> jax.Array:
    """Float32 similarities of image rows with a text block, `[rows, b]`."""
    return matmul32(image, text.T)


def _row_chunks(rows: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """`[b, ...]` -> `[num_chunks, chunk, ...]`, zero-padded, and a validity mask.

    A tile is processed one chunk of image rows at a time, so no device ever holds a
    `[b, b]` buffer, only `[chunk, b]`. `chunk_size <= 0` means one chunk.
    """
    count = rows.shape[0]
    chunk = count if chunk_size <= 0 else min(chunk_size, count)
    num_chunks = -(-count // chunk)
    pad = num_chunks * chunk - count
    padded = jnp.pad(rows, [(0, pad)] + [(0, 0)] * (rows.ndim - 1))
    valid = jnp.arange(num_chunks * chunk) < count
    return padded.reshape(num_chunks, chunk, *rows.shape[1:]), valid.reshape(
        num_chunks, chunk
    )


def _unchunk(chunked: jax.Array, count: int) -> jax.Array:
    """Inverse of `_row_chunks`: `[num_chunks, chunk, ...]` -> `[count, ...]`."""
    return chunked.reshape(-1, *chunked.shape[2:])[:count]


def _tile_backward(grads, d_logits, chunk_rows, block, ok, index, scale):
    """Back through a chunk's logits `scale * _tile(chunk_rows, block) (+ bias)`.

    `grads` is `(d_block [b, d], d_chunks [num_chunks, chunk, d])`; the chunk's row
    gradient is added to `d_chunks[index]` in place (as scan outputs instead, XLA kept
    one `[b, d]` buffer per ring step alive), the block's to `d_block`. `ok` masks
    the chunk's padded rows. Returns the new `grads` and `d_logits` with the padded
    rows zeroed.
    """
    d_block, d_chunks = grads
    d_logits = jnp.where(ok[:, None], d_logits, 0.0)
    d_rows = scale * matmul32(d_logits, block)
    d_block += scale * jnp.matmul(d_logits.T, chunk_rows, precision=PRECISION)
    return (d_block, d_chunks.at[index].add(d_rows)), d_logits


def _siglip_labels(row_ids: jax.Array, width: int, step) -> jax.Array:
    """SigLIP labels of a tile: +1 for matched pairs (only at step 0, the home block),
    -1 elsewhere. `row_ids` are the local indices of the tile's rows."""
    matched = (row_ids[:, None] == jnp.arange(width)[None, :]) & (step == 0)
    return jnp.where(matched, 1.0, -1.0)


def _softmax_stats(logits, averaged, axis):
    """A tile's part of an online softmax along `axis`: `(max, sum of e, *sums of
    e * x for x in averaged)`, e = exp(logits - max). `averaged` are arrays shaped like
    `logits`, whose softmax-weighted means the sums give once divided by the sum of e.
    """
    top = logits.max(axis=axis)
    weights = jnp.exp(logits - jnp.expand_dims(top, axis))
    sums = (jnp.sum(weights * x, axis=axis) for x in averaged)
    return (top, weights.sum(axis=axis), *sums)


def _merge_softmax(stats, tile):
    """Online softmax: running `(max, *sums)` with a tile's, rescaled to the new max."""
    running_max, *running_sums = stats
    tile_max, *tile_sums = tile
    new_max = jnp.maximum(running_max, tile_max)
    old, new = jnp.exp(running_max - new_max), jnp.exp(tile_max - new_max)
    return (new_max, *(r * old + t * new for r, t in zip(running_sums, tile_sums)))


def _lse(stats) -> jax.Array:
    """The log-sum-exp of online softmax statistics `(max, sum, ...)`."""
    return stats[0] + jnp.log(stats[1])


def _ring_softmax_stats(ring, tile_logits, averaged, rows, block, chunk_size):
    """Online row and column softmax statistics of logit matrices, over the ring.

    Runs inside shard_map. `rows` (a tuple of this device's `[local, d_k]` float32
    arrays) stay; `block` (a tuple of text-side `[local, d_k]` arrays, the device's
    own) goes round. `tile_logits(chunk_rows, block)` gives a tuple of float32 logit
    tiles `[chunk, local]`, one for each matrix; `averaged[k]` lists the matrices whose
    softmax-weighted sums under matrix k are kept too (see `_softmax_stats`).
    Returns `(row_stats, col_stats)`: per matrix, `(max, sum, *weighted sums)`, each
    `[local]`; the column statistics are those of this device's own block.
    """
    local = rows[0].shape[0]
    chunks = tuple(_row_chunks(r, chunk_size)[0] for r in rows)
    valid = _row_chunks(rows[0], chunk_size)[1]

    def tile_stats(block, col_stats, xs):
        # One [chunk, b] piece of each tile: its rows are complete over this block;
        # the block's column statistics are updated online.
        chunk_rows, ok = xs
        tiles = tile_logits(chunk_rows, block)
        row_stats, new_col_stats = [], []
        for logits, stats, indices in zip(tiles, col_stats, averaged):
            others = [tiles[k] for k in indices]  # finite on padded rows: zero rows
            row_stats.append(_softmax_stats(logits, others, axis=1))
            masked = jnp.where(ok[:, None], logits, -jnp.inf)
            tile = _softmax_stats(masked, others, axis=0)
            new_col_stats.append(_merge_softmax(stats, tile))
        return tuple(new_col_stats), tuple(row_stats)

    def step(_, row_stats, block, col_stats):
        col_stats, tile = jax.lax.scan(
            partial(tile_stats, block), col_stats, (chunks, valid)
        )
        tile = jax.tree.map(lambda x: _unchunk(x, local), tile)
        row_stats = tuple(map(_merge_softmax, row_stats, tile))
        return row_stats, col_stats

    # Built from the local rows, so that shard_map types them as per-device values.
    neg_inf = jnp.full_like(rows[0][:, 0], -jnp.inf)
    zero = jnp.zeros_like(neg_inf)
    empty = tuple((neg_inf, zero, *(zero for _ in indices)) for indices in averaged)
    # Two steps per loop iteration, as in the backward pass (`_ring_logit_grads`).
    return ring.run(step, empty, block, empty, unroll=2)


def _ring_logit_grads(
    ring, d_logits_fn, rows, block, residuals, scale, chunk_size, grad
):
    """The ring of a softmax loss's backward pass: each tile recomputed once, and
    back through the student's logits `scale * rows[0] @ block[0].T`.

    Runs inside shard_map. `rows`, `block` are as for `_ring_softmax_stats`;
    `residuals` is `(row_residuals, col_residuals)`, trees of `[local]` arrays (the
    log-sum-exps): the row ones stay, the column ones ride with their block.
    `d_logits_fn(chunk_rows, block, chunk_residuals, block_residuals)` gives the
    cotangent of the student's logit tile `[chunk, local]` and that tile.
    Returns this device's float32 `(d_rows [local, d], d_block [local, d],
    d_log_scale)`, the gradients w.r.t. `rows[0]`, its own `block[0]` and the log
    scale, before any psum.
    """
    row_residuals, col_residuals = residuals
    local = rows[0].shape[0]
    chunks = tuple(_row_chunks(r, chunk_size)[0] for r in rows)
    valid = _row_chunks(rows[0], chunk_size)[1]
    residual_chunks = jax.tree.map(
        lambda r: _row_chunks(r, chunk_size)[0], row_residuals
    )

    def tile_grads(block, block_residuals, grads, xs):
        chunk_rows, ok, chunk_residuals, index = xs
        d_logits, logits = d_logits_fn(
            chunk_rows, block, chunk_residuals, block_residuals
        )
        grads, d_logits = _tile_backward(
            grads, d_logits, chunk_rows[0], block[0], ok, index, scale
        )
        return grads, jnp.sum(d_logits * logits)

    def step(_, carry, block, riders):
        d_chunks, d_log_scale = carry
        block_residuals, d_block = riders
        (d_block, d_chunks), d_scale_parts = jax.lax.scan(
            partial(tile_grads, block, block_residuals),
            (d_block, d_chunks),
            (chunks, valid, residual_chunks, jnp.arange(len(valid))),
        )
        carry = (d_chunks, d_log_scale + jnp.sum(d_scale_parts))
        return carry, (block_residuals, d_block)

    # The block's gradient accumulates and travels in float32.
    carry = (jnp.zeros_like(chunks[0]), jnp.zeros((), jnp.float32))
    riders = (col_residuals, jnp.zeros_like(block[0], jnp.float32))
    # Two steps per loop iteration: with one, XLA:TPU copies the travelling block
    # and gradient back into the loop's carry each step, three [b, d] buffers
    # more (docs/tpu.md).
    (d_chunks, d_log_scale), (_, d_block) = ring.run(
        step, carry, block, riders, wait_for=grad, unroll=2
    )
    return _unchunk(d_chunks, local), d_block, d_log_scale


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _clip_loss_ring(image_emb, text_emb, logit_scale, chunk_size=0):
    return _clip_ring_forward(image_emb, text_emb, logit_scale, chunk_size)[0]


def _clip_ring_forward(image_emb, text_emb, logit_scale, chunk_size):
    """Loss plus the per-row and per-column log-sum-exps (the only residuals)."""
    ring = Ring.of()
    batch = image_emb.shape[0]
    rows = P(ring.axes, None)

    def body(image, text, log_scale):
        # Text blocks travel in the embedding dtype; tiles are computed in float32.
        image = image.astype(jnp.float32)
        scale = jnp.exp(log_scale.astype(jnp.float32))

        def tile_logits(chunk_rows, block):
            return (scale * _tile(chunk_rows[0], block[0]),)

        (row_stats,), (col_stats,) = _ring_softmax_stats(
            ring, tile_logits, ((),), (image,), (text,), chunk_size
        )
        row_lse, col_lse = _lse(row_stats), _lse(col_stats)
        matched = scale * jnp.sum(image * text.astype(jnp.float32), axis=1)
        local_loss = jnp.sum(row_lse - matched) + jnp.sum(col_lse - matched)
        loss = jax.lax.psum(local_loss, ring.axes) / (2 * batch)
        return loss, row_lse, col_lse

    fn = _ring_fn(body, (rows, rows, P()), (P(), P(ring.axes), P(ring.axes)))
    loss, row_lse, col_lse = fn(image_emb, text_emb, logit_scale)
    return loss, (image_emb, text_emb, logit_scale, row_lse, col_lse)


def _clip_ring_backward(chunk_size, residuals, grad):
    image_emb, text_emb, logit_scale, row_lse, col_lse = residuals
    ring = Ring.of()
    batch = image_emb.shape[0]
    rows = P(ring.axes, None)

    def body(image, text, log_scale, row_lse, col_lse, grad):
        image_dtype, text_dtype = image.dtype, text.dtype
        image = image.astype(jnp.float32)  # text blocks travel in their own dtype
        scale = jnp.exp(log_scale.astype(jnp.float32))
        weight = grad / (2 * batch)  # dL/dlogits = weight * (row softmax + col softmax)

        def d_logits(chunk_rows, block, chunk_lse, block_lse):
            logits = scale * _tile(chunk_rows[0], block[0])
            softmaxes = jnp.exp(logits - chunk_lse[:, None]) + jnp.exp(
                logits - block_lse[None, :]
            )
            return weight * softmaxes, logits

        d_image, d_block, d_log_scale = _ring_logit_grads(
            ring,
            d_logits,
            (image,),
            (text,),
            (row_lse, col_lse),
            scale,
            chunk_size,
            grad,
        )
        # The matched pairs' -logit terms: -(grad / B) per row and per column.
        text = text.astype(jnp.float32)
        d_image -= 2 * weight * scale * text
        d_text = d_block - 2 * weight * scale * image
        d_log_scale -= 2 * weight * scale * jnp.sum(image * text)
        d_log_scale = jax.lax.psum(d_log_scale, ring.axes).astype(log_scale.dtype)
        return d_image.astype(image_dtype), d_text.astype(text_dtype), d_log_scale

    in_specs = (rows, rows, P(), P(ring.axes), P(ring.axes), P())
    fn = _ring_fn(body, in_specs, (rows, rows, P()))
    return fn(image_emb, text_emb, logit_scale, row_lse, col_lse, grad)


_clip_loss_ring.defvjp(_clip_ring_forward, _clip_ring_backward)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _siglip_loss_ring(image_emb, text_emb, logit_scale, logit_bias, chunk_size=0):
    return _siglip_ring_forward(
        image_emb, text_emb, logit_scale, logit_bias, chunk_size
    )[0]


def _siglip_ring_forward(image_emb, text_emb, logit_scale, logit_bias, chunk_size):
    ring = Ring.of()
    batch = image_emb.shape[0]
    rows = P(ring.axes, None)

    def body(image, text, log_scale, bias):
        image = image.astype(jnp.float32)  # text blocks travel in their own dtype
        scale = jnp.exp(log_scale.astype(jnp.float32))
        bias = bias.astype(jnp.float32)
        chunks, valid = _row_chunks(image, chunk_size)
        row_ids, _ = _row_chunks(jnp.arange(image.shape[0]), chunk_size)

        def step(ring_step, total, block, riders):
            def tile_loss(acc, xs):
                chunk_rows, ok, ids = xs
                logits = scale * _tile(chunk_rows, block) + bias
                labels = _siglip_labels(ids, block.shape[0], ring_step)
                terms = jnp.where(ok[:, None], jax.nn.log_sigmoid(labels * logits), 0.0)
                return acc + jnp.sum(terms), None

            total, _ = jax.lax.scan(tile_loss, total, (chunks, valid, row_ids))
            return total, riders

        total = jnp.zeros_like(image[0, 0])  # per-device, like the rows it sums
        total, _ = ring.run(step, total, text)
        return -jax.lax.psum(total, ring.axes) / batch

    fn = _ring_fn(body, (rows, rows, P(), P()), P())
    loss = fn(image_emb, text_emb, logit_scale, logit_bias)
    return loss, (image_emb, text_emb, logit_scale, logit_bias)


def _siglip_ring_backward(chunk_size, residuals, grad):
    image_emb, text_emb, logit_scale, logit_bias = residuals
    ring = Ring.of()
    batch = image_emb.shape[0]
    rows = P(ring.axes, None)

    def body(image, text, log_scale, bias, grad):
        image_dtype, text_dtype = image.dtype, text.dtype
        image = image.astype(jnp.float32)  # text blocks travel in their own dtype
        scale = jnp.exp(log_scale.astype(jnp.float32))
        bias32 = bias.astype(jnp.float32)
        local = image.shape[0]
        chunks, valid = _row_chunks(image, chunk_size)
        row_ids, _ = _row_chunks(jnp.arange(local), chunk_size)

        def step(ring_step, carry, block, d_block):
            def tile_grads(grads, xs):
                chunk_rows, ok, ids, index = xs
                similarity = _tile(chunk_rows, block)
                logits = scale * similarity + bias32
                labels = _siglip_labels(ids, block.shape[0], ring_step)
                # d/dlogits of -log_sigmoid(labels * logits) / B, times the cotangent.
                d_logits = -(grad / batch) * labels * jax.nn.sigmoid(-labels * logits)
                grads, d_logits = _tile_backward(
                    grads, d_logits, chunk_rows, block, ok, index, scale
                )
                sums = (scale * jnp.sum(d_logits * similarity), jnp.sum(d_logits))
                return grads, sums

            d_chunks, d_log_scale, d_bias = carry
            (d_block, d_chunks), (d_scale_parts, d_bias_parts) = jax.lax.scan(
                tile_grads,
                (d_block, d_chunks),
                (chunks, valid, row_ids, jnp.arange(len(chunks))),
            )
            d_log_scale += jnp.sum(d_scale_parts)
            d_bias += jnp.sum(d_bias_parts)
            return (d_chunks, d_log_scale, d_bias), d_block

        zero = jnp.zeros((), jnp.float32)
        carry = (jnp.zeros_like(chunks), zero, zero)
        d_block = jnp.zeros_like(text, jnp.float32)
        (d_chunks, d_log_scale, d_bias), d_block = ring.run(
            step, carry, text, d_block, wait_for=grad
        )
        d_image = _unchunk(d_chunks, local)
        d_log_scale = jax.lax.psum(d_log_scale, ring.axes).astype(log_scale.dtype)
        d_bias = jax.lax.psum(d_bias, ring.axes).astype(bias.dtype)
        return (
            d_image.astype(image_dtype),
            d_block.astype(text_dtype),
            d_log_scale,
            d_bias,
        )

    fn = _ring_fn(body, (rows, rows, P(), P(), P()), (rows, rows, P(), P()))
    return fn(image_emb, text_emb, logit_scale, logit_bias, grad)


_siglip_loss_ring.defvjp(_siglip_ring_forward, _siglip_ring_backward)


def _distill_tiles(scale, teacher_scale, chunk_rows, block):
    """Student and teacher logit tiles `[chunk, b]` of a distillation ring step."""
    (image, teacher_image), (text, teacher_text) = chunk_rows, block
    student = scale * _tile(image, text)
    return student, teacher_scale * _tile(teacher_image, teacher_text)


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def _distill_loss_ring(
    image_emb,
    text_emb,
    logit_scale,
    teacher_image_emb,
    teacher_text_emb,
    teacher_logit_scale,
    chunk_size=0,
):
    return _distill_ring_forward(
        image_emb,
        text_emb,
        logit_scale,
        teacher_image_emb,
        teacher_text_emb,
        teacher_logit_scale,
        chunk_size,
    )[0]


def _distill_ring_forward(
    image_emb,
    text_emb,
    logit_scale,
    teacher_image_emb,
    teacher_text_emb,
    teacher_logit_scale,
    chunk_size,
):
    """Loss plus the row and column log-sum-exps of student and teacher logits.

    The student and teacher text blocks travel the ring together. Per row (and per
    column) it keeps the student's log-sum-exp and the teacher's softmax statistics
    with the teacher-weighted sum of student logits, so that the cross-entropy is
    `lse(z) - sum(softmax(y) * z)`.
    """
    ring = Ring.of()
    batch = image_emb.shape[0]
    rows, lse = P(ring.axes, None), P(ring.axes)

    def body(image, text, log_scale, teacher_image, teacher_text, teacher_log_scale):
        # Text blocks travel in the embedding dtype; tiles are computed in float32.
        scale = jnp.exp(log_scale.astype(jnp.float32))
        teacher_scale = jnp.exp(teacher_log_scale.astype(jnp.float32))
        local_rows = (image.astype(jnp.float32), teacher_image.astype(jnp.float32))
        tile_logits = partial(_distill_tiles, scale, teacher_scale)
        # Student logits: log-sum-exp only; teacher: also its softmax-weighted sum of
        # the student logits (matrix 0).
        row_stats, col_stats = _ring_softmax_stats(
            ring, tile_logits, ((), (0,)), local_rows, (text, teacher_text), chunk_size
        )

        def cross_entropy(stats):
            # Per row (or column): lse(z) - sum(softmax(y) * z), summed.
            student, (_, teacher_sum, weighted_student) = stats
            return jnp.sum(_lse(student) - weighted_student / teacher_sum)

        local_loss = cross_entropy(row_stats) + cross_entropy(col_stats)
        loss = jax.lax.psum(local_loss, ring.axes) / (2 * batch)
        lses = [_lse(stats) for stats in (*row_stats, *col_stats)]
        return loss, *lses

    fn = _ring_fn(body, (rows, rows, P(), rows, rows, P()), (P(), lse, lse, lse, lse))
    inputs = (
        image_emb,
        text_emb,
        logit_scale,
        teacher_image_emb,
        teacher_text_emb,
        teacher_logit_scale,
    )
    loss, *lses = fn(*inputs)
    return loss, (*inputs, *lses)


def _distill_ring_backward(chunk_size, residuals, grad):
    *inputs, row_lse_z, row_lse_y, col_lse_z, col_lse_y = residuals
    image_emb = inputs[0]
    ring = Ring.of()
    batch = image_emb.shape[0]
    rows, lse = P(ring.axes, None), P(ring.axes)

    def body(
        image,
        text,
        log_scale,
        teacher_image,
        teacher_text,
        teacher_log_scale,
        row_lse_z,
        row_lse_y,
        col_lse_z,
        col_lse_y,
        grad,
    ):
        image_dtype, text_dtype = image.dtype, text.dtype
        scale = jnp.exp(log_scale.astype(jnp.float32))
        teacher_scale = jnp.exp(teacher_log_scale.astype(jnp.float32))
        local_rows = (image.astype(jnp.float32), teacher_image.astype(jnp.float32))
        weight = grad / (2 * batch)

        def d_logits(chunk_rows, block, chunk_lses, block_lses):
            # dL/dz = weight * (student softmax - teacher softmax), rows and columns.
            student, teacher = _distill_tiles(scale, teacher_scale, chunk_rows, block)
            (row_z, row_y), (col_z, col_y) = chunk_lses, block_lses
            by_row = jnp.exp(student - row_z[:, None]) - jnp.exp(
                teacher - row_y[:, None]
            )
            by_col = jnp.exp(student - col_z[None, :]) - jnp.exp(
                teacher - col_y[None, :]
            )
            return weight * (by_row + by_col), student

        residuals = ((row_lse_z, row_lse_y), (col_lse_z, col_lse_y))
        d_image, d_text, d_log_scale = _ring_logit_grads(
            ring,
            d_logits,
            local_rows,
            (text, teacher_text),
            residuals,
            scale,
            chunk_size,
            grad,
        )
        d_log_scale = jax.lax.psum(d_log_scale, ring.axes).astype(log_scale.dtype)
        # The teacher is frozen: its cotangents are zeros, made here so that they
        # come out sharded like the teacher's inputs.
        teacher = (teacher_image, teacher_text, teacher_log_scale)
        d_teacher = jax.tree.map(jnp.zeros_like, teacher)
        student = d_image.astype(image_dtype), d_text.astype(text_dtype), d_log_scale
        return *student, *d_teacher

    in_specs = (rows, rows, P(), rows, rows, P(), lse, lse, lse, lse, P())
    fn = _ring_fn(body, in_specs, (rows, rows, P(), rows, rows, P()))
    return fn(*inputs, row_lse_z, row_lse_y, col_lse_z, col_lse_y, grad)


_distill_loss_ring.defvjp(_distill_ring_forward, _distill_ring_backward)


def _accuracy_ring(image_emb, text_emb, chunk_size):
    """Both in-batch argmaxes with the ring: forward only, `[chunk, b]` at a time."""
    ring = Ring.of()
    batch = image_emb.shape[0]
    rows = P(ring.axes, None)

    def body(image, text):
        image = image.astype(jnp.float32)
        local = image.shape[0]
        own = ring.index() * local + jnp.arange(local)
        chunks, valid = _row_chunks(image, chunk_size)
        row_ids, _ = _row_chunks(own, chunk_size)

        def keep_better(best, value, index):
            wins = better(value, index, *best)
            return jnp.where(wins, value, best[0]), jnp.where(wins, index, best[1])

        def step(ring_step, row_best, block, col_best):
            block_ids = ring.source(ring_step) * local + jnp.arange(local)

            def tile_argmax(col_best, xs):
                chunk_rows, ok, ids = xs
                sims = jnp.where(ok[:, None], _tile(chunk_rows, block), -jnp.inf)
                row_value, row_arg = sims.max(axis=1), jnp.argmax(sims, axis=1)
                col_value, col_arg = sims.max(axis=0), jnp.argmax(sims, axis=0)
                col_best = keep_better(col_best, col_value, ids[col_arg])
                return col_best, (row_value, block_ids[row_arg])

            col_best, (tile_value, tile_index) = jax.lax.scan(
                tile_argmax, col_best, (chunks, valid, row_ids)
            )
            tile = _unchunk(tile_value, local), _unchunk(tile_index, local)
            return keep_better(row_best, *tile), col_best

        # Built from the local rows, so that shard_map types them as per-device values.
        none_yet = (
            jnp.full_like(image[:, 0], -jnp.inf),
            jnp.full_like(image[:, 0], jnp.iinfo(jnp.int32).max, dtype=jnp.int32),
        )
        row_best, col_best = ring.run(step, none_yet, text, none_yet)
        image_to_text = jnp.sum(row_best[1] == own).astype(jnp.float32)
        text_to_image = jnp.sum(col_best[1] == own).astype(jnp.float32)
        hits = jax.lax.psum(jnp.stack([image_to_text, text_to_image]), ring.axes)
        return hits / batch

    accuracy = _ring_fn(body, (rows, rows), P())(image_emb, text_emb)
    return accuracy[0], accuracy[1]


_CLIP_LOSS_IMPLS["ring"] = _clip_loss_ring
_SIGLIP_LOSS_IMPLS["ring"] = _siglip_loss_ring
_DISTILL_LOSS_IMPLS["ring"] = _distill_loss_ring

# The config's choices, owned here: `loss.name` picks a loss, `loss.impl` one of the
# implementations (every loss has the same ones).
LOSS_NAMES = ("clip", "siglip")
LOSS_IMPLS = tuple(_CLIP_LOSS_IMPLS)
