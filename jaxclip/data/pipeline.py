"""Host-side input pipelines: per-process batches with a saveable iterator state.

For now this serves the built-in shapes data; the grain pipelines over tar shards, CSV
and tfds plug in behind the same interface (`next()`, `get_state()`, `set_state()`).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from jaxclip.data import shapes
from jaxclip.data.tokenizer import tokenize


class ShapesIterator:
    """Batches of the built-in shapes data, a pure function of (seed, batch index).

    Every process draws the same global batch and keeps its own rows, so the samples a
    step sees do not depend on the number of processes. The state is the index of the
    next batch, so a restored iterator continues exactly where the saved one stopped.
    """

    def __init__(
        self,
        seed: int,
        global_batch_size: int,
        image_size: int,
        context_length: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if global_batch_size % process_count:
            raise ValueError(
                f"train.batch_size={global_batch_size} is not divisible by the "
                f"{process_count} processes"
            )
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.image_size = image_size
        self.context_length = context_length
        self.local_batch_size = global_batch_size // process_count
        self.local_rows = slice(
            process_index * self.local_batch_size,
            (process_index + 1) * self.local_batch_size,
        )
        self.index = 0

    def __iter__(self) -> ShapesIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        drawn = shapes.draw_batch(
            self.seed, self.index, self.global_batch_size, self.image_size
        )
        self.index += 1
        captions = drawn["captions"][self.local_rows]
        return {
            "images": drawn["images"][self.local_rows],
            "tokens": tokenize(captions, self.context_length),
        }

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position in the stream."""
        return {"source": "shapes", "seed": self.seed, "index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue from a position returned by `get_state`."""
        if state.get("source") != "shapes" or state.get("seed") != self.seed:
            raise ValueError(
                f"data state {state} was saved by a different input pipeline "
                f"(expected source 'shapes' with seed {self.seed})"
            )
        self.index = int(state["index"])


def make_train_iterator(
    config: ml_collections.ConfigDict, image_size: int, context_length: int
) -> ShapesIterator:
    """The training input pipeline named by `data.source`."""
    if config.data.source != "shapes":
        raise ValueError(f"data.source={config.data.source!r}; available: 'shapes'")
    return ShapesIterator(
        seed=config.seed,
        global_batch_size=config.train.batch_size,
        image_size=image_size,
        context_length=context_length,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
