"""Small data sets for the data-pipeline tests, written from scratch in each test.

Every sample's image is a flat colour and its caption a sentence, both derived from
its number, so a test can check that a pipeline pairs them correctly without
trusting any code under test.
"""

from __future__ import annotations

import csv
import io
import os
import tarfile

import numpy as np
from PIL import Image


def colour_of(number: int) -> tuple[int, int, int]:
    """A colour unique to `number` < 216, channels 40 apart (JPEG keeps them apart)."""
    return (
        40 + 40 * (number % 6),
        40 + 40 * (number // 6 % 6),
        40 + 40 * (number // 36 % 6),
    )


def caption_of(number: int) -> str:
    return f"sample number {number}"


def encode_image(
    colour: tuple[int, int, int],
    width: int = 48,
    height: int = 40,
    fmt: str = "JPEG",
) -> bytes:
    """A flat-colour image, encoded."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[...] = colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(
        buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {})
    )
    return buffer.getvalue()


def write_tar(path: str | os.PathLike, members: list[tuple[str, bytes]]) -> None:
    """An uncompressed tar holding `members` (name, content) in order."""
    with tarfile.open(path, "w") as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))


def sample_members(number: int, fmt: str = "jpg", with_json: bool = True) -> list:
    key = f"{number:06d}"
    pil_format = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    members = [
        (
            f"{key}.{fmt}",
            encode_image(colour_of(number), 40 + number % 7, 36, pil_format),
        ),
        (f"{key}.txt", caption_of(number).encode()),
    ]
    if with_json:
        members.append((f"{key}.json", b'{"url": "x"}'))
    return members


def write_shards(
    directory: str | os.PathLike, num_shards: int, per_shard: int
) -> list[str]:
    """`num_shards` webdataset shards of `per_shard` samples, numbered in order."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    formats = ("jpg", "png", "jpeg", "webp")
    for shard in range(num_shards):
        members = []
        for row in range(per_shard):
            number = shard * per_shard + row
            members += sample_members(number, formats[number % len(formats)])
        path = os.path.join(directory, f"{shard:05d}.tar")
        write_tar(path, members)
        paths.append(path)
    return paths


def write_csv(directory: str | os.PathLike, count: int, separator: str = ",") -> str:
    """A CSV (or TSV) with image paths relative to it, images in a subfolder."""
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    name = "pairs.tsv" if separator == "\t" else "pairs.csv"
    path = os.path.join(directory, name)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=separator)
        writer.writerow(["filepath", "title"])
        for number in range(count):
            relative = f"images/{number:04d}.png"
            with open(os.path.join(directory, relative), "wb") as image:
                image.write(encode_image(colour_of(number), 30, 44, "PNG"))
            writer.writerow([relative, caption_of(number)])
    return path


def number_from_caption(caption: str) -> int:
    return int(caption.rsplit(" ", 1)[1])


def mean_colour(image: np.ndarray) -> np.ndarray:
    return image.reshape(-1, 3).astype(np.float64).mean(axis=0)


def write_bad_shards(directory: str | os.PathLike) -> tuple[list[str], list[int]]:
    """Two shards holding one bad sample of every kind among good ones.

    Returns (paths, numbers of the good samples). The first shard breaks in the
    middle of its fourth sample; the second ends with good samples, so an unshuffled
    pass over both reaches the end of the data exactly at a batch boundary when the
    batch size divides the good count (8).
    """
    os.makedirs(directory, exist_ok=True)
    first = os.path.join(directory, "00000.tar")
    members = [m for number in range(4) for m in sample_members(number)]
    write_tar(first, members)
    with open(first, "rb") as f:
        data = f.read()
    cut = data.index(encode_image(colour_of(3), 40 + 3 % 7, 36)) + 20
    with open(first, "wb") as f:
        f.write(data[:cut])  # samples 0-2 survive; 3 is lost mid-image

    noisy = np.random.default_rng(0).integers(0, 256, (120, 160, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, "JPEG", quality=90)
    truncated_jpeg = buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3]
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((1000, 1200), np.uint8)).save(buffer, "PNG")
    large_png = buffer.getvalue()  # 1.2 megapixels, a few kB
    second = os.path.join(directory, "00001.tar")
    write_tar(
        second,
        [
            *sample_members(10),
            ("corrupt.jpg", truncated_jpeg),
            ("corrupt.txt", b"a corrupt image"),
            ("text.jpg", b"not an image at all"),
            ("text.txt", b"a member that is not an image"),
            *sample_members(11),
            ("nocaption.jpg", encode_image((1, 2, 3))),
            ("empty.jpg", encode_image((1, 2, 3))),
            ("empty.txt", b"  \n"),
            ("latin1.jpg", encode_image((1, 2, 3))),
            ("latin1.txt", b"caf\xe9"),
            ("bomb.png", large_png),
            ("bomb.txt", b"too many pixels"),
            ("noimage.txt", b"a caption without an image"),
            ("noimage.json", b"{}"),
            *sample_members(12),
            *sample_members(13),
            *sample_members(14),
        ],
    )
    return [first, second], [0, 1, 2, 10, 11, 12, 13, 14]


# Each kind of bad sample in `write_bad_shards`, once per pass over the data (with
# `max_image_pixels` below 1.2 megapixels).
BAD_SHARD_SKIPS = {
    "truncated_tar": 1,
    "corrupt_image": 1,
    "not_an_image": 1,
    "missing_caption": 1,
    "empty_caption": 1,
    "bad_caption_encoding": 1,
    "decompression_bomb": 1,
    "missing_image": 1,
}


def train_sentencepiece(sentences: list[str], prefix: str, vocab_size: int) -> str:
    """A SentencePiece model of `sentences` (pad id 0, unk 1, EOS 2, no BOS), written
    as `prefix.model`; returns its path."""
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=prefix,
        vocab_size=vocab_size,
        pad_id=0,
        unk_id=1,
        bos_id=-1,
        eos_id=2,
        minloglevel=2,
    )
    return prefix + ".model"
