"""A tfds builder for image-text pairs, and a converter from tar shards or CSV.

    python -m jaxclip.data.tfds_builder --source=webdataset \\
        --path='shards/{00000..00127}.tar' --name=my_pairs --data_dir=/data/tfds

writes the tfds dataset `my_pairs` (version 1.0.0, split `train`) in the array_record
format, which the `tfds` source reads with random access through `tfds.data_source`
(`--config.data.source=tfds --config.data.path=my_pairs
--config.data.tfds_data_dir=/data/tfds`). Neither step needs TensorFlow.

Features: `image` (the original encoded bytes, not re-encoded), `caption` (text) and
`key` (the sample's key in the input). Bad samples are left out, counted by reason
and reported, with the same checks as the training pipeline's.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxclip.data.sources import BAD_REASONS, CsvSource, TarShardSource
from jaxclip.data.transforms import (
    DEFAULT_MAX_IMAGE_PIXELS,
    caption_text,
    unreadable_reason,
)

VERSION = "1.0.0"


class ImageTextPairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Image-text pairs from any iterable of raw records (see `sources.py`).

    Use `make_builder(name, records, data_dir)`: the dataset's name is the user's.
    """

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Image-text pairs converted by jaxclip."}

    def __init__(
        self,
        *,
        records: Callable[[], Iterable[dict[str, Any]]] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        **kwargs: Any,
    ):
        self._records = records
        self._max_image_pixels = max_image_pixels
        self.skipped = np.zeros(len(BAD_REASONS), np.int64)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Image-text pairs (jaxclip).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "caption": tfds.features.Text(),
                    "key": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # nothing to download: the records are local
        if self._records is None:
            raise ValueError("ImageTextPairs needs records= to be prepared")
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
        seen = set()
        for record in self._records():
            reason = record.get("error")
            caption, caption_reason = caption_text(record.get("caption"))
            reason = reason or caption_reason
            if reason is None:
                reason = check_image(record.get("image"), self._max_image_pixels)
            if reason is not None:
                self.skipped[BAD_REASONS.index(reason)] += 1
                continue
            key = record["key"]
            while key in seen:  # tfds needs unique keys; inputs may repeat theirs
                key += "+"
            seen.add(key)
            yield (
                key,
                {"image": record["image"], "caption": caption, "key": record["key"]},
            )


def check_image(data: bytes | None, max_image_pixels: int) -> str | None:
    """None if `data` decodes as an image, else the reason (from BAD_REASONS).

    JPEGs are decoded at 1/8 scale: every byte of the entropy-coded data is still
    read, so a truncated or corrupt file fails as it would at full size.
    """
    if data is None:
        return "missing_image"
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return "decompression_bomb"
    except Exception:
        return unreadable_reason(data)
    if image.size[0] * image.size[1] > max_image_pixels:
        return "decompression_bomb"
    try:
        image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
        image.load()
    except Exception:
        return "corrupt_image"
    return None


def make_builder(
    name: str,
    records: Callable[[], Iterable[dict[str, Any]]] | None,
    data_dir: str,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> ImageTextPairs:
    """An `ImageTextPairs` builder named `name`, writing array_record to `data_dir`."""
    builder_class = type(
        "ImageTextPairsNamed", (ImageTextPairs,), {"name": name}, skip_registration=True
    )
    return builder_class(
        records=records,
        max_image_pixels=max_image_pixels,
        data_dir=data_dir,
        file_format="array_record",
    )


def convert(
    source: str,
    path: str,
    name: str,
    data_dir: str,
    csv_image_column: str = "filepath",
    csv_caption_column: str = "title",
    csv_separator: str = "",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict[str, int]:
    """Convert tar shards (`source='webdataset'`) or a CSV/TSV to a tfds dataset.

    Returns how many samples were skipped, by reason.
    """
    if source == "webdataset":
        reader = TarShardSource(path)
    elif source == "csv":
        reader = CsvSource(path, csv_image_column, csv_caption_column, csv_separator)
    else:
        raise ValueError(f"source={source!r}; expected 'webdataset' or 'csv'")

    def records() -> Iterator[dict[str, Any]]:
        return (reader[index] for index in range(len(reader)))

    builder = make_builder(name, records, data_dir, max_image_pixels)
    builder.download_and_prepare()
    return {reason: int(n) for reason, n in zip(BAD_REASONS, builder.skipped) if n}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert webdataset tar shards or a CSV/TSV of image paths and "
        "captions to a tfds dataset (array_record)."
    )
    parser.add_argument("--source", choices=("webdataset", "csv"), required=True)
    parser.add_argument(
        "--path",
        required=True,
        help="tar shards (list, brace pattern, directory) or CSV",
    )
    parser.add_argument("--name", required=True, help="the tfds dataset name to write")
    parser.add_argument("--data_dir", required=True, help="tfds data directory")
    parser.add_argument("--csv_image_column", default="filepath")
    parser.add_argument("--csv_caption_column", default="title")
    parser.add_argument("--csv_separator", default="")
    parser.add_argument(
        "--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS
    )
    args = parser.parse_args(argv)
    try:
        skipped = convert(
            args.source,
            args.path,
            args.name,
            args.data_dir,
            args.csv_image_column,
            args.csv_caption_column,
            args.csv_separator,
            args.max_image_pixels,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    total = sum(skipped.values())
    details = ", ".join(f"{reason} {n}" for reason, n in skipped.items())
    print(
        f"wrote tfds dataset {args.name!r} to {args.data_dir}; skipped {total} "
        f"bad samples" + (f" ({details})" if details else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
