"""Input pipeline throughput: jaxclip's grain pipeline against OpenCLIP's, and the
tokenizers alone.

    python bench/data.py                      # 2,000 samples in 8 shards, batch 64
    python bench/data.py --no-openclip        # jaxclip only

It writes webdataset tar shards of realistic JPEGs (photos from scikit-image's bundled
samples, cut to random 256-640 px sizes, quality 85: about 40 kB at 448x448 on
average) with generated captions, then reports samples/s for one process:

- jaxclip: `data.crop='random_resized'` (OpenCLIP's RandomResizedCrop(0.9, 1.0)) and
  the CLIP paper's `random_square`, at 224 px, uint8 out (normalised on the device),
  tokenized with the fast CLIP tokenizer. "workers" are grain worker processes
  (`data.workers`), each with `data.threads` decoding threads; with 0 workers the
  decoding threads run in the main process.
- OpenCLIP: the train pipeline of `open_clip_train.data.get_wds_dataset` (webdataset,
  shuffle buffers, `decode('pilrgb')`, ViT-B-32's train transform at 224 px, the
  OpenCLIP tokenizer, `wds.batched`), read through `wds.WebLoader` (a torch
  DataLoader) with `num_workers` processes.

Needs scikit-image (the photos); the OpenCLIP rows need open_clip_torch, webdataset
and torchvision. Timings on a shared machine are noisy: each row is the best of
`--repeats` passes over the data after a warm-up batch.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxclip.data import tokenizer  # noqa: E402
from jaxclip.data.pipeline import DataIterator, build_dataset  # noqa: E402
from jaxclip.data.sources import TarShardSource  # noqa: E402
from jaxclip.data.tokenizer import TokenizerSpec  # noqa: E402
from jaxclip.data.transforms import ImageTextTransform  # noqa: E402

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
)


def caption_words(count: int = 20_000) -> list[str]:
    """Whole words of the CLIP vocabulary, most frequent first (merge order)."""
    merges = tokenizer.default_tokenizer().merges
    words = []
    for first, second in merges:
        token = first + second
        if token.endswith("</w>") and token[:-4].isalpha() and token[:-4].isascii():
            words.append(token[:-4])
    return words[:count]


def make_captions(count: int, rng: np.random.Generator) -> list[str]:
    """Caption-like text: 5-20 Zipf-distributed words, some numbers and commas."""
    words = caption_words()
    weights = 1.0 / (np.arange(len(words)) + 10.0)
    weights /= weights.sum()
    captions = []
    for _ in range(count):
        chosen = rng.choice(words, size=rng.integers(5, 21), p=weights).tolist()
        if rng.random() < 0.3:
            chosen.insert(int(rng.integers(len(chosen))), str(rng.integers(1, 2025)))
        if rng.random() < 0.3:
            chosen[int(rng.integers(len(chosen)))] += ","
        captions.append(" ".join(chosen).capitalize())
    return captions


def write_shards(directory: str, samples: int, shards: int, seed: int = 0) -> list[str]:
    """`shards` tar files holding `samples` JPEG + caption pairs in all."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    captions = make_captions(samples, rng)
    paths, sizes = [], []
    per_shard = -(-samples // shards)
    for shard in range(shards):
        path = os.path.join(directory, f"{shard:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for number in range(
                shard * per_shard, min(samples, (shard + 1) * per_shard)
            ):
                photo = photos[number % len(photos)]
                width, height = (int(v) for v in rng.integers(256, 641, 2))
                # A random window of the photo with the target's aspect ratio.
                window_h = min(photo.shape[0], int(photo.shape[1] * height / width))
                window_w = int(window_h * width / height)
                top = int(rng.integers(0, photo.shape[0] - window_h + 1))
                left = int(rng.integers(0, photo.shape[1] - window_w + 1))
                image = Image.fromarray(photo).resize(
                    (width, height),
                    Image.Resampling.BICUBIC,
                    box=(left, top, left + window_w, top + window_h),
                )
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=85)
                sizes.append((width * height, len(buffer.getvalue())))
                for name, content in (
                    (f"{number:09d}.jpg", buffer.getvalue()),
                    (f"{number:09d}.txt", captions[number].encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(content)
                    tar.addfile(info, io.BytesIO(content))
        paths.append(path)
    pixels, nbytes = np.mean(sizes, axis=0)
    print(
        f"{samples} samples in {shards} shards: mean {np.sqrt(pixels):.0f}^2 px, "
        f"{nbytes / 1e3:.1f} kB per JPEG"
    )
    return paths


def timed_pass(iterator, warmup: int, batches: int) -> float:
    """Samples/s over `batches` batches, after `warmup` batches (worker start-up)."""
    for _ in range(warmup):
        first = next(iterator)
    batch_size = len(first[0] if isinstance(first, tuple | list) else first["images"])
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def bench_jaxclip(paths, args, crop: str, workers: int, threads: int) -> float:
    source = TarShardSource(paths)
    dataset = build_dataset(
        [source],
        None,
        seed=0,
        batch_size=args.batch,
        transform=ImageTextTransform(args.size, crop),
        tokenizer=TokenizerSpec("clip"),
        context_length=77,
        threads=threads,
        workers=workers,
        prefetch=2,
    )
    iterator = DataIterator(dataset, "webdataset", {})
    warmup = workers + 1  # one batch from every worker
    batches = len(source) // args.batch - warmup
    try:
        return max(timed_pass(iterator, warmup, batches) for _ in range(args.repeats))
    finally:
        iterator.close()


def import_open_clip():
    """open_clip, with torchvision importable on a CPU-only torch.

    PyPI's torchvision wheels are built against CUDA torch; on the CPU build its
    detection operators (nms, roi_align) fail to register, which aborts `import
    torchvision`. The transforms used here are pure Python/PIL and never touch those
    operators, so the failed registrations are skipped instead.
    """
    import torch
    import torch.library

    register_fake = torch.library.register_fake

    def tolerant(op, *args, **kwargs):
        decorator = register_fake(op, *args, **kwargs)

        def apply(function):
            try:
                return decorator(function)
            except RuntimeError:
                return function

        return apply

    torch.library.register_fake = tolerant
    try:
        import open_clip
        import torchvision  # noqa: F401
    finally:
        torch.library.register_fake = register_fake
    torch.set_num_threads(1)  # as each DataLoader worker does
    return open_clip


def openclip_loader(paths, args, workers: int):
    """OpenCLIP's training pipeline over webdataset shards (get_wds_dataset)."""
    import webdataset as wds

    open_clip = import_open_clip()
    preprocess = open_clip.image_transform(args.size, is_train=True)  # ViT-B-32's
    tokenize = open_clip.get_tokenizer("ViT-B-32")

    def has_caption_and_image(sample):
        has_caption = "txt" in sample
        has_image = any(k in sample for k in ("png", "jpg", "jpeg", "webp"))
        return has_caption and has_image

    pipeline = wds.DataPipeline(
        wds.SimpleShardList(paths),
        wds.detshuffle(bufsize=2000, initial=500, seed=0),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(bufsize=5000, initial=1000),
        wds.select(has_caption_and_image),
        wds.decode("pilrgb", handler=wds.warn_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=preprocess, text=lambda text: tokenize(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(args.batch, partial=False),
    )
    return wds.WebLoader(
        pipeline,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def bench_openclip(paths, args, workers: int) -> float:
    loader = openclip_loader(paths, args, workers)
    # A pass of the loader is one epoch; each worker stops at its own shards' end
    # and drops its last partial batch.
    warmup = workers + 1
    batches = args.samples // args.batch - 2 * max(1, workers) - warmup
    best = 0.0
    for _ in range(args.repeats):
        iterator = iter(loader)
        best = max(best, timed_pass(iterator, warmup, batches))
        del iterator
    return best


def bench_tokenizers(args) -> list[tuple[str, float]]:
    captions = make_captions(args.captions, np.random.default_rng(1))
    rows = []
    reference = tokenizer.default_tokenizer()
    start = time.perf_counter()
    for caption in captions[:5000]:
        reference.encode(caption)
    rows.append(
        (
            "jaxclip reference (SimpleTokenizer.encode)",
            5000 / (time.perf_counter() - start),
        )
    )

    fast = tokenizer.FastTokenizer()
    start = time.perf_counter()
    fast(captions, 77)
    rows.append(
        (
            "jaxclip fast, first pass (cold)",
            len(captions) / (time.perf_counter() - start),
        )
    )
    best = 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        for at in range(0, len(captions), args.batch):  # as the pipeline calls it
            fast(captions[at : at + args.batch], 77)
        best = max(best, len(captions) / (time.perf_counter() - start))
    rows.append((f"jaxclip fast (batches of {args.batch}, warm)", best))
    if args.openclip:
        open_clip = import_open_clip()
        tokenize = open_clip.get_tokenizer("ViT-B-32")
        tokenize(captions[:100])
        best = 0.0
        for _ in range(args.repeats):
            start = time.perf_counter()
            for at in range(0, len(captions), args.batch):
                tokenize(captions[at : at + args.batch])
            best = max(best, len(captions) / (time.perf_counter() - start))
        rows.append((f"OpenCLIP tokenizer (batches of {args.batch})", best))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", default="0,1,2", help="worker counts to measure")
    parser.add_argument(
        "--threads", type=int, default=1, help="jaxclip threads per worker"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--captions", type=int, default=50_000)
    parser.add_argument(
        "--chip_rate",
        type=float,
        default=2000.0,
        help="samples/s one accelerator chip trains at (ViT-B/32, "
        "224 px: roughly an A100 or a TPU v4 chip); give your own",
    )
    parser.add_argument(
        "--host_cores",
        type=int,
        default=0,
        help="cores of a training host, to scale the per-core rate (0: this machine's)",
    )
    parser.add_argument("--no-openclip", dest="openclip", action="store_false")
    parser.add_argument("--data_dir", default="", help="reuse shards written here")
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as scratch:
        directory = args.data_dir or scratch
        paths = sorted(
            os.path.join(directory, name)
            for name in os.listdir(directory)
            if name.endswith(".tar")
        )
        if not paths:
            paths = write_shards(directory, args.samples, args.shards)
        print(f"{os.cpu_count()} CPU cores; batch {args.batch}, {args.size} px\n")

        rows = []  # (pipeline, workers, samples/s)
        for workers in worker_counts:
            for crop in ("random_resized", "random_square"):
                rate = bench_jaxclip(paths, args, crop, workers, args.threads)
                rows.append((f"jaxclip {crop}", workers, rate))
            if args.openclip:
                rows.append(
                    (
                        "OpenCLIP (webdataset + DataLoader)",
                        workers,
                        bench_openclip(paths, args, workers),
                    )
                )
            if workers == 0:  # the decoding threads alone, in the main process
                rate = bench_jaxclip(paths, args, "random_resized", 0, 2)
                rows.append(("jaxclip random_resized, 2 threads", 0, rate))

        print(f"{'pipeline':<40} {'workers':>7} {'samples/s':>10} {'vs OpenCLIP':>12}")
        openclip_rate = {w: r for name, w, r in rows if name.startswith("OpenCLIP")}
        for name, workers, rate in rows:
            ratio = rate / openclip_rate[workers] if workers in openclip_rate else None
            shown = f"{ratio:.2f}x" if ratio else ""
            print(f"{name:<40} {workers:>7} {rate:>10.1f} {shown:>12}")

        print(f"\n{'tokenizer':<48} {'captions/s':>11}")
        token_rows = bench_tokenizers(args)
        for name, rate in token_rows:
            print(f"{name:<48} {rate:>11,.0f}")
        if args.openclip:
            warm = token_rows[2][1]
            print(f"fast / OpenCLIP: {warm / token_rows[-1][1]:.1f}x")

        best = max(rate for name, _, rate in rows if name.startswith("jaxclip"))
        cores = os.cpu_count() or 1
        host_cores = args.host_cores or cores
        per_core = best / cores
        print(
            f"\nFeeding chips at {args.chip_rate:,.0f} samples/s each: this machine's "
            f"best, {best:,.0f} samples/s on {cores} cores, feeds "
            f"{best / args.chip_rate:.2f} chips; at {per_core:,.0f} samples/s per "
            f"core, a {host_cores}-core host feeds {per_core * host_cores / args.chip_rate:.1f}."
        )


if __name__ == "__main__":
    main()
