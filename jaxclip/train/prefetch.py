"""Device prefetch: host batches copied to the devices ahead of the step that uses them.

The train loop asks for the next batch right after it dispatches a step, so with JAX's
asynchronous dispatch the host-to-device copies (and the host pipeline's work) overlap
the running step. `size` > 1 keeps more batches in flight, which smooths a jittery
input pipeline at the cost of device memory.

The iterator state saved in checkpoints must be that of the batches the steps have
consumed, not of those fetched ahead, so each prefetched batch carries the state the
host iterator had right after producing it.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import jax
from jax.sharding import Mesh

from jaxclip import sharding


class DevicePrefetcher:
    """Wraps a host iterator with `get_state`/`set_state`; yields sharded global batches
    (as `[k, B/k, ...]` micro-batches when `accum_steps` = k > 1: see `shard_batch`)."""

    def __init__(self, iterator: Any, mesh: Mesh, size: int = 1, accum_steps: int = 1):
        # `size` (train.prefetch) and `accum_steps` are checked with the config.
        self.iterator = iterator
        self.mesh = mesh
        self.size = size
        self.accum_steps = accum_steps  # > 1: batches arrive as micro-batches
        self._queue: collections.deque[tuple[dict[str, jax.Array], Any]] = (
            collections.deque()
        )
        self._state = iterator.get_state()

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        self.fill(1)
        batch, self._state = self._queue.popleft()
        return batch

    def fill(self, count: int | None = None) -> None:
        """Copy batches to the devices until `count` (default: `size`) are in flight."""
        while len(self._queue) < (self.size if count is None else count):
            host_batch = next(self.iterator)
            state = self.iterator.get_state()
            batch = sharding.shard_batch(host_batch, self.mesh, self.accum_steps)
            self._queue.append((batch, state))

    def get_state(self) -> Any:
        """The host iterator's state after the last batch handed out."""
        return self._state

    def set_state(self, state: Any) -> None:
        """Restore the host iterator and drop what was fetched ahead."""
        self.iterator.set_state(state)
        self._queue.clear()
        self._state = state

    def metrics(self) -> dict[str, int]:
        """The host iterator's counters (skipped samples by reason) for the logs."""
        return self.iterator.metrics()

    def close(self) -> None:
        """Drop the batches in flight and stop the host pipeline's workers."""
        self._queue.clear()
        self.iterator.close()
