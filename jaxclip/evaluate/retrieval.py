"""Image↔text retrieval metrics (R@k, mean and median rank), sharded over devices.

OpenCLIP scores every image against every caption in one `[N_images, N_texts]`
matrix, which runs out of memory at scale. Here the embeddings are sharded over the
batch axes `('data', 'fsdp')` of the mesh and ranks come from the ring of
`jaxclip/ring.py`: each device keeps its query rows, key blocks travel round the
ring with `ppermute`, and a device scores its queries against `block_size` keys at a
time. Per device the memory is the local queries and keys (`N / R` rows each, `R` the
number of batch shards), the travelling key block (`N_keys / R` rows, two while one
is sent on), and `[N_queries / R, block_size]` float32 scores plus a few masks of
that shape: never the whole matrix, at most a `block_size`-wide piece of one
device's `[N_queries / R, N_keys]` strip of it at a time. Ranks come back to every
device: 4 bytes per query.

Ranks are 1-based (rank 1: a correct item comes first). Ties are broken by index: a
candidate with the same score as the correct one is ahead of it iff its index is
lower, i.e. the rank is the position in a stable descending sort by score. With
`s*` the score of the best-placed correct candidate `k*`,
`rank = 1 + #{wrong k: s_k > s*} + #{wrong k: s_k == s*, k < k*}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxclip.ring import Ring, better, matmul32
from jaxclip.sharding import batch_axes, batch_shards, make_mesh

_NO_INDEX = np.iinfo(np.int32).max  # "no correct key seen yet"; loses every tie


def retrieval_metrics(
    image_emb: np.ndarray | jax.Array,
    text_emb: np.ndarray | jax.Array,
    text_to_image: np.ndarray | Sequence[int],
    *,
    mesh: Mesh | None = None,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = 1024,
    normalize: bool = True,
) -> dict[str, float]:
    """Recall@k, mean and median rank of image→text and text→image retrieval.

    Args:
      image_emb: `[N_images, dim]` image embeddings (NumPy or jax, any float dtype).
      text_emb: `[N_texts, dim]` caption embeddings.
      text_to_image: `[N_texts]` ints, the image each caption describes. An image may
        have any number of captions (5 in COCO and Flickr30k), but at least one: an
        image without a caption has no correct answer, and is refused (ValueError).
      mesh: the mesh to shard over; None takes the mesh in context
        (`jax.set_mesh`), else one device.
      ks: the k of each Recall@k.
      block_size: how many keys a device scores at once; its largest temporary is
        `[N_queries / R, block_size]` float32.
      normalize: L2-normalise the embeddings (in float32) first, so the scores are
        cosine similarities. Pass False for embeddings already normalised, to rank
        by their exact dot products.

    image→text ranks each image by its best-placed caption; text→image ranks each
    caption by its image. Scores are float32 at full precision; ties are broken by
    index (module docstring). Returns Python floats under the keys
    `image_to_text/R@{k}` for each k, `image_to_text/mean_rank`,
    `image_to_text/median_rank` (`np.median` of the 1-based ranks: halfway between
    the middle two for an even count, where VSE++ rounds down) and the same for
    `text_to_image/`. The rows are split over the mesh's 'data' and 'fsdp' axes and
    replicated over any other. Call it outside `jax.jit`: it checks values on the
    host.
    """
    num_images, num_texts = _check_shapes(image_emb, text_emb, text_to_image)
    text_to_image = _check_text_to_image(text_to_image, num_images)
    ks = _check_options(ks, block_size)
    mesh = _resolve_mesh(mesh)
    layout = partial(_layout, mesh=mesh, normalize=normalize, block_size=block_size)
    images = layout(image_emb, "image_emb", np.arange(num_images, dtype=np.int32))
    texts = layout(text_emb, "text_emb", text_to_image)
    ring = Ring.of(mesh)
    image_ranks = _ranks_against(images, texts, mesh, ring)
    text_ranks = _ranks_against(texts, images, mesh, ring)
    return {
        **_summary("image_to_text", np.asarray(image_ranks)[:num_images], ks),
        **_summary("text_to_image", np.asarray(text_ranks)[:num_texts], ks),
    }


class _Side(NamedTuple):
    """One side of the retrieval (images or captions), laid out for `_ranks`."""

    embeddings: jax.Array  # [rows, dim] float32, padded, split over the batch axes
    groups: np.ndarray  # [rows] int32: the image each row is or describes; -1 padding
    chunks: int  # how many chunks each device's share splits into when used as keys


def _layout(
    embeddings, name: str, groups: np.ndarray, *, mesh, normalize, block_size
) -> _Side:
    """`embeddings` and their `groups` padded and sharded, once their values pass."""
    shards = batch_shards(mesh)
    # One padding serves both roles: a multiple of R for queries, of R * chunks for keys.
    chunks = _key_chunks(len(groups), shards, block_size)
    rows = _padded_rows(len(groups), shards, chunks)
    padded = _prepare(embeddings, name, mesh, normalize, rows)
    # Padded rows belong to group -1, which no key and no query matches.
    return _Side(padded, _pad(groups, rows, -1), chunks)


def _ranks_against(queries: _Side, keys: _Side, mesh: Mesh, ring: Ring) -> jax.Array:
    """0-based ranks of `queries` among `keys` (see `_ranks`), padding included."""
    return _ranks(
        queries.embeddings,
        keys.embeddings,
        queries.groups,
        keys.groups,
        mesh=mesh,
        ring=ring,
        num_chunks=keys.chunks,
    )


# --- Input checks ----------------------------------------------------------------------


def _check_shapes(image_emb, text_emb, text_to_image) -> tuple[int, int]:
    """Refuse embeddings that are not `[N, dim]` with one dim, or a mapping of wrong length."""
    image_shape, text_shape = np.shape(image_emb), np.shape(text_emb)
    if len(image_shape) != 2 or len(text_shape) != 2:
        raise ValueError(
            "image_emb and text_emb must be 2-D [count, dim], got shapes "
            f"{image_shape} and {text_shape}"
        )
    if image_shape[1] != text_shape[1]:
        raise ValueError(
            f"image_emb and text_emb must have the same dim, got {image_shape[1]} "
            f"and {text_shape[1]} (shapes {image_shape} and {text_shape})"
        )
    if image_shape[0] == 0 or text_shape[0] == 0:
        raise ValueError(
            f"need at least one image and one caption, got shapes {image_shape} "
            f"and {text_shape}"
        )
    if np.shape(text_to_image) != (text_shape[0],):
        raise ValueError(
            f"text_to_image must have shape [N_texts] = ({text_shape[0]},), one image "
            f"index per caption, got shape {np.shape(text_to_image)}"
        )
    return image_shape[0], text_shape[0]


def _check_text_to_image(text_to_image, num_images: int) -> np.ndarray:
    """`text_to_image` as int32, once it names a valid image per caption and every image
    has a caption."""
    mapping = np.asarray(text_to_image)
    if not np.issubdtype(mapping.dtype, np.integer):
        raise ValueError(f"text_to_image must hold integers, got dtype {mapping.dtype}")
    bad = np.flatnonzero((mapping < 0) | (mapping >= num_images))
    if bad.size:
        raise ValueError(
            f"text_to_image must lie in [0, {num_images}) (N_images), but caption "
            f"{bad[0]} names image {mapping[bad[0]]} ({bad.size} captions out of range)"
        )
    uncaptioned = np.flatnonzero(np.bincount(mapping, minlength=num_images) == 0)
    if uncaptioned.size:
        raise ValueError(
            f"{uncaptioned.size} image(s) have no caption in text_to_image, e.g. "
            f"{uncaptioned[:5].tolist()}: image→text retrieval needs at least one "
            "correct caption per image; drop those images first"
        )
    return mapping.astype(np.int32)


def _check_options(ks: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Refuse an empty or non-positive `ks`, or a non-positive `block_size`."""
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int | np.integer) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    if not isinstance(block_size, int | np.integer) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    return tuple(int(k) for k in ks)


# --- Layout: mesh, padding, chunks -----------------------------------------------------


def _resolve_mesh(mesh: Mesh | None) -> Mesh:
    """The given mesh, else the one in context, else a mesh of the first device."""
    if mesh is not None:
        return mesh
    mesh = jax.sharding.get_mesh()
    if isinstance(mesh, Mesh) and mesh.axis_names:
        return mesh
    return make_mesh((1, 1, 1), jax.devices()[:1])


def _row_spec(mesh: Mesh, *trailing) -> P:
    """Rows split over the batch axes (whole if the mesh has none)."""
    axes = batch_axes(mesh)
    return P(axes if axes else None, *trailing)


def _key_chunks(count: int, shards: int, block_size: int) -> int:
    """How many chunks of at most `block_size` keys each device's key block takes."""
    local = -(-count // shards)
    return -(-local // block_size)


def _padded_rows(count: int, shards: int, chunks: int) -> int:
    """The least multiple of `shards * chunks` that holds `count` rows, chunks even-sized.

    Chunks of `ceil(local / chunks)` keys waste at most `chunks - 1` rows a device,
    where rounding up to a multiple of `block_size` could waste almost a block.
    """
    local = -(-count // shards)
    return shards * chunks * -(-local // chunks)


def _pad(values: np.ndarray, rows: int, fill: int) -> np.ndarray:
    """`values` padded at the end to `rows` entries of `fill`."""
    return np.pad(values, (0, rows - len(values)), constant_values=fill)


def _normalized(embeddings: jax.Array, normalize: bool, rows: int):
    """Float32 (unit) rows zero-padded to `rows`, whether all are finite, and the
    index and squared norm of the shortest row."""
    values = jnp.asarray(embeddings).astype(jnp.float32)
    squared_norms = jnp.sum(values * values, axis=1)
    if normalize:
        # Divide by the correctly rounded root (not rsqrt): rows whose norm is a power
        # of two normalise exactly, which the tests' exact ties rely on.
        values = values / jnp.sqrt(squared_norms)[:, None]
    shortest = jnp.argmin(squared_norms)
    finite = jnp.all(jnp.isfinite(values))
    padded = jnp.pad(values, ((0, rows - values.shape[0]), (0, 0)))
    return padded, finite, shortest, squared_norms[shortest]


def _prepare(embeddings, name: str, mesh: Mesh, normalize: bool, rows: int):
    """Float32 (normalised) embeddings padded to `rows`, split over the batch axes,
    once their values pass the checks."""
    sharding = NamedSharding(mesh, _row_spec(mesh, None))
    replicated = NamedSharding(mesh, P())
    prepare = jax.jit(
        partial(_normalized, normalize=normalize, rows=rows),
        out_shardings=(sharding, replicated, replicated, replicated),
    )
    padded, finite, shortest, squared_norm = prepare(embeddings)
    if normalize and float(squared_norm) == 0.0:
        raise ValueError(
            f"{name} row {int(shortest)} is all zeros and cannot be L2-normalised"
        )
    if not bool(finite):
        raise ValueError(f"{name} holds NaN or infinite values (after normalising)")
    return padded


# --- The sharded kernel ----------------------------------------------------------------


@partial(jax.jit, static_argnames=("mesh", "ring", "num_chunks"))
def _ranks(
    queries: jax.Array,
    keys: jax.Array,
    query_group: jax.Array,
    key_group: jax.Array,
    *,
    mesh: Mesh,
    ring: Ring,
    num_chunks: int,
) -> jax.Array:
    """0-based rank of each query's best-placed matching key, replicated, `[N_queries]`.

    A key matches a query iff their groups are equal; keys of group -1 are padding and
    never count. `queries` `[Nq, d]` and `keys` `[Nk, d]` are float32, padded so each
    of the R batch shards holds `Nq / R` queries and `num_chunks` equal chunks of keys.
    `ring` is `Ring.of(mesh)`, taken outside the jit so that its loop-or-unrolled
    choice (jaxclip/ring.py) is part of the compiled function's key.
    """
    rows, entries = _row_spec(mesh, None), _row_spec(mesh)
    fn = jax.shard_map(
        partial(_local_ranks, ring=ring, num_chunks=num_chunks),
        mesh=mesh,
        in_specs=(rows, entries, rows, entries),
        out_specs=entries,
    )
    ranks = fn(queries, query_group, keys, key_group)
    # Replicated, so that every process can read them: 4 bytes a query.
    return jax.lax.with_sharding_constraint(ranks, NamedSharding(mesh, P()))


def _local_ranks(queries, query_group, keys, key_group, *, ring: Ring, num_chunks: int):
    """One device's ranks (inside shard_map): its queries stay put, key blocks go round
    the ring twice.

    Pass 1 finds each query's best matching key (highest score, then lowest index),
    pass 2 counts the non-matching keys ahead of it. Per device that is one travelling
    key block and `[Nq / R, Nk / (R * num_chunks)]` scores at a time.
    """
    # Built from the local rows, so that shard_map types them as per-device values.
    none_yet = (
        jnp.full_like(query_group, -jnp.inf, dtype=jnp.float32),
        jnp.full_like(query_group, _NO_INDEX),
    )
    block = (keys, key_group)
    best_match = partial(_best_match, queries, query_group)
    best, _ = ring.run(_over_chunks(best_match, ring, num_chunks), none_yet, block)
    # Pass 2's sends wait for pass 1, so XLA cannot merge them with pass 1's (same
    # operands) and keep those blocks alive across the pass.
    count_ahead = partial(_count_ahead, queries, query_group, best)
    ahead, _ = ring.run(
        _over_chunks(count_ahead, ring, num_chunks),
        jnp.zeros_like(query_group),
        block,
        wait_for=best[1],
    )
    return ahead


def _over_chunks(chunk_fn, ring: Ring, num_chunks: int):
    """A ring step: `chunk_fn(carry, chunk)` scanned over the chunks of the block held
    now, the block itself riding on unchanged."""

    def step(step, carry, block, riders):
        carry, _ = jax.lax.scan(
            chunk_fn, carry, _chunked(block, step, ring, num_chunks)
        )
        return carry, riders

    return step


def _chunked(block, step, ring: Ring, num_chunks: int):
    """The held key block as `num_chunks` chunks of (keys, groups, global key ids)."""
    keys, group = block
    local_keys = keys.shape[0]
    # The block that left ring position source(step) holds its own key rows.
    first = ring.source(step) * local_keys
    ids = first + jnp.arange(local_keys, dtype=jnp.int32)
    return (
        keys.reshape(num_chunks, -1, keys.shape[1]),
        group.reshape(num_chunks, -1),
        ids.reshape(num_chunks, -1),
    )


def _scores_and_matches(queries, query_group, chunk):
    """Scores `[q, c]` of the local queries against a chunk, which keys are real (not
    padding), which match each query's group, and the chunk's key ids."""
    keys, group, ids = chunk
    # Pass 2 compares its scores with the best one pass 1 found, so both must compute
    # them bit for bit alike. The barrier keeps the dot a plain dot in both, whatever
    # each pass would fuse into it (a GPU compiler could pick a different kernel, with
    # another summation order, for each).
    scores = jax.lax.optimization_barrier(matmul32(queries, keys.T))
    real = group[None, :] >= 0
    matches = real & (group[None, :] == query_group[:, None])
    return scores, real, matches, ids


def _best_match(queries, query_group, best, chunk):
    """Pass 1 over one chunk: the best (score, key id) of a matching key so far."""
    scores, _, matches, ids = _scores_and_matches(queries, query_group, chunk)
    masked = jnp.where(matches, scores, -jnp.inf)
    value = masked.max(axis=1)
    at_value = matches & (masked == value[:, None])
    index = jnp.where(at_value, ids[None, :], _NO_INDEX).min(axis=1)
    wins = better(value, index, *best)
    best_value, best_index = best
    return (
        jnp.where(wins, value, best_value),
        jnp.where(wins, index, best_index),
    ), None


def _count_ahead(queries, query_group, best, ahead, chunk):
    """Pass 2 over one chunk: add the non-matching keys placed ahead of the best match."""
    scores, real, matches, ids = _scores_and_matches(queries, query_group, chunk)
    best_value, best_index = best[0][:, None], best[1][:, None]
    # Matching keys are never ahead of the best match, by its definition; leaving them
    # out keeps that true whatever the rounding.
    before = (scores > best_value) | (
        (scores == best_value) & (ids[None, :] < best_index)
    )
    hits = before & real & ~matches
    return ahead + jnp.sum(hits, axis=1, dtype=jnp.int32), None


def _summary(
    direction: str, ranks: np.ndarray, ks: tuple[int, ...]
) -> dict[str, float]:
    """Recall@k, mean and median of 0-based `ranks`, reported 1-based."""
    ranks = np.asarray(ranks, np.int64) + 1
    metrics = {f"{direction}/R@{k}": float(np.mean(ranks <= k)) for k in ks}
    metrics[f"{direction}/mean_rank"] = float(np.mean(ranks))
    metrics[f"{direction}/median_rank"] = float(np.median(ranks))
    return metrics
