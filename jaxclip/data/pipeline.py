"""The training input pipeline from the config: `make_train_iterator`.

The data layer, by job:

- `sources.py`: random-access readers of raw records (tar shards, CSV/TSV, tfds, the
  built-in shapes; `digits.py` for scikit-learn's digits);
- `transforms.py`: decode, crop and resize a record; `tokenizer.py`: captions to ids;
- `dataset.py`: the grain dataset, sources -> this process's batches;
- `iterator.py`: `DataIterator` and its checkpointed state;
- `checks.py`: the config's data fields checked at start (`DATA_SOURCES`);
- this module: the sources and settings the config names (`data.source`, `data.*`),
  and the iterator built from them. Every source, the shapes demo data included,
  goes through the same grain dataset.

`DataIterator`, `build_dataset`, `checkpoint_state` and `describe_skipped` are
importable from here too.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import ml_collections

from jaxclip.data.checks import MIXABLE_SOURCES
from jaxclip.data.dataset import build_dataset
from jaxclip.data.digits import DigitsSource
from jaxclip.data.iterator import DataIterator, checkpoint_state, describe_skipped
from jaxclip.data.sources import CsvSource, ShapesSource, TarShardSource, TfdsSource
from jaxclip.data.tokenizer import VOCAB_SIZE, TokenizerSpec
from jaxclip.data.transforms import ImageTextTransform

__all__ = [
    "DataIterator",
    "build_dataset",
    "checkpoint_state",
    "describe_skipped",
    "make_train_iterator",
    "mix_entries",
    "open_source",
    "shapes_iterator",
]


def open_source(
    kind: str,
    path: str,
    config: ml_collections.ConfigDict,
    image_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Any:
    """The random-access source `kind` (one of checks.MIXABLE_SOURCES) over `path`,
    with the config's options."""
    data = config.data
    if kind == "webdataset":
        return TarShardSource(path, process_index, process_count)
    if kind == "csv":
        return CsvSource(
            path, data.csv_image_column, data.csv_caption_column, data.csv_separator
        )
    if kind == "tfds":
        return TfdsSource(
            path,
            data.tfds_data_dir,
            data.tfds_split,
            data.tfds_image_key,
            data.tfds_caption_key,
        )
    if kind == "shapes":
        # Drawn a global batch at a time: alone, batch k is draw_batch(seed, k, B).
        return ShapesSource(config.seed, image_size, config.train.batch_size)
    if kind == "digits":  # scikit-learn's bundled scans; data.path is not used
        return DigitsSource("train", image_size)
    raise ValueError(f"unknown data source {kind!r}; expected one of {MIXABLE_SOURCES}")


def mix_entries(config: ml_collections.ConfigDict) -> list[tuple[str, str, float]]:
    """(source, path, weight) for each source the config reads."""
    if config.data.source == "mix":
        return [(str(k), str(p), float(w)) for k, p, w in config.data.mix]
    return [(config.data.source, config.data.path, 1.0)]


def make_train_iterator(
    config: ml_collections.ConfigDict,
    image_size: int,
    context_length: int,
    with_keys: bool = False,
    vocab_size: int = VOCAB_SIZE,
) -> DataIterator:
    """The training input pipeline named by `data.source`, for this process, for a
    model of that image size, text context and text vocabulary (`vocab_size`, which
    sizes the 'clip' tokenizer: `TokenizerSpec.for_vocabulary`).

    Expects a validated config (`config.validate_config`: among others, that
    train.batch_size divides between the processes).
    """
    process_index, process_count = jax.process_index(), jax.process_count()
    entries = mix_entries(config)
    sources = [
        open_source(kind, path, config, image_size, process_index, process_count)
        for kind, path, _ in entries
    ]
    weights = [weight for _, _, weight in entries]
    data, local_batch = config.data, config.train.batch_size // process_count

    def dataset(start_batch: int = 0) -> grain.IterDataset:
        return build_dataset(
            sources,
            weights,
            seed=config.seed,
            batch_size=local_batch,
            transform=ImageTextTransform(
                image_size, data.crop, tuple(data.crop_scale), data.max_image_pixels
            ),
            tokenizer=TokenizerSpec.for_model(data, vocab_size),
            context_length=context_length,
            process_index=process_index,
            process_count=process_count,
            shuffle=data.shuffle,
            threads=data.threads,
            workers=data.workers,
            prefetch=data.prefetch,
            start=start_batch * local_batch,
        )

    # One endless source is read in global order (see dataset.py).
    global_order = len(sources) == 1 and getattr(sources[0], "infinite", False)
    return DataIterator(
        dataset(),
        data.source,
        _fingerprint(config, entries, sources),
        process_index,
        process_count,
        with_keys,
        restart=dataset if global_order else None,
    )


def _fingerprint(
    config: ml_collections.ConfigDict,
    entries: list[tuple[str, str, float]],
    sources: list[Any],
) -> dict[str, Any]:
    """What the sample order depends on; a resume with other values is refused."""
    return {
        "sources": [kind for kind, _, _ in entries],
        "lengths": [min(len(source), 2**62) for source in sources],
        "weights": [weight for _, _, weight in entries],
        "seed": config.seed,
        "batch_size": config.train.batch_size,
        "shuffle": config.data.shuffle,
        "workers": config.data.workers,
    }


def shapes_iterator(
    seed: int,
    batch_size: int,
    image_size: int,
    context_length: int,
    vocab_size: int = VOCAB_SIZE,
) -> DataIterator:
    """The built-in shapes data as `data.source='shapes'` gives it, with the default
    data settings: batch k is `shapes.draw_batch(seed, k, batch_size)`, tokenized
    for a text tower of `vocab_size` embeddings."""
    from jaxclip.config import base_config  # the config module imports this layer

    config = base_config()
    config.seed = seed
    config.data.source = "shapes"
    config.train.batch_size = batch_size
    return make_train_iterator(
        config, image_size, context_length, vocab_size=vocab_size
    )
