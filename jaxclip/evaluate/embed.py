"""Embedding an evaluation set on every process, each reading only its own share.

OpenCLIP evaluates on rank 0 alone, which is slow and leaves the other ranks waiting
at the next collective. Here every process takes part: the set is cut into global
batches of `batch_size` rows; within a batch, each process reads and decodes only
the rows its own devices hold (process p: rows [p·b, (p+1)·b) with b = batch_size /
process_count, in the usual device order), the devices embed the global batch
together, and the embeddings are gathered so that every process ends with the same
[n, d] array. The last batch is padded and the padding dropped.

Embeddings are row-wise functions of their inputs, so the result does not depend on
how many processes or devices share the work. `map_rows` is the same loop for any
function of a batch that keeps its dtype (the captioning evaluator's token ids).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxclip import sharding


def global_batch_size(requested: int, mesh: Mesh) -> int:
    """`requested` rounded up to a multiple of the batch shards and the processes."""
    multiple = int(np.lcm(sharding.batch_shards(mesh), jax.process_count()))
    return -(-max(requested, 1) // multiple) * multiple


def embed_rows(
    encode: Callable[[jax.Array], jax.Array],
    load: Callable[[int, int], np.ndarray],
    num_rows: int,
    batch_size: int,
    mesh: Mesh,
) -> np.ndarray:
    """float32 [num_rows, d]: `encode` over rows 0..num_rows-1, on every process.

    `load(start, stop)` gives rows start..stop-1 (uint8 images or int32 tokens); each
    process calls it only for the rows its own devices hold. `encode` is a jitted
    function of a global batch sharded over the mesh's batch axes.
    """
    return map_rows(encode, load, num_rows, batch_size, mesh).astype(np.float32)


def map_rows(
    function: Callable[[jax.Array], jax.Array],
    load: Callable[[int, int], np.ndarray],
    num_rows: int,
    batch_size: int,
    mesh: Mesh,
) -> np.ndarray:
    """`function` over rows 0..num_rows-1 in global batches, as `embed_rows` (which
    it serves), with the dtype `function` gives: e.g. generated token ids."""
    if num_rows < 1:
        raise ValueError("nothing to embed: the evaluation set is empty")
    batch = global_batch_size(batch_size, mesh)
    first, last = _local_rows(batch, mesh)
    example = np.asarray(load(0, 1))
    row_sharding = sharding.batch_sharding(mesh, example.ndim)
    outputs = []
    for start in range(0, num_rows, batch):
        block = np.zeros((last - first, *example.shape[1:]), example.dtype)
        lo, hi = min(start + first, num_rows), min(start + last, num_rows)
        if hi > lo:
            block[: hi - lo] = load(lo, hi)
        rows = jax.make_array_from_callback(
            (batch, *example.shape[1:]),
            row_sharding,
            lambda index, block=block: block[_shift(index[0], first, batch)],
        )
        # Dispatch now, gather later: the next share loads while this one runs.
        outputs.append((function(rows), min(batch, num_rows - start)))
    gathered = [_to_host(out)[:valid] for out, valid in outputs]
    return np.concatenate(gathered)


def _local_rows(batch: int, mesh: Mesh) -> tuple[int, int]:
    """The range of a global batch's rows that this process's devices hold."""
    index_map = sharding.batch_sharding(mesh).addressable_devices_indices_map((batch,))
    ranges = [index[0].indices(batch)[:2] for index in index_map.values()]
    return min(lo for lo, _ in ranges), max(hi for _, hi in ranges)


def _shift(rows: slice, offset: int, batch: int) -> slice:
    """A slice of the global batch as a slice of this process's block."""
    lo, hi, _ = rows.indices(batch)
    return slice(lo - offset, hi - offset)


def _to_host(array: jax.Array) -> np.ndarray:
    """The whole global array on this process (a collective across processes)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
