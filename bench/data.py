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


def cpu_seconds() -> float:
    """CPU time of this process and all its children (worker processes), so far."""
    import psutil

    total = 0.0
    process = psutil.Process()
    for member in [process, *process.children(recursive=True)]:
        try:
            times = member.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def timed_pass(iterator, warmup: int, batches: int) -> tuple[float, float]:
    """(samples/s, samples per CPU-second) over `batches` batches, after `warmup`
    batches (worker start-up).

    On a shared machine the wall-clock rate depends on the neighbours' load; the CPU
    time spent per sample (in all of the pipeline's processes) hardly does.
    """
    for _ in range(warmup):
        first = next(iterator)
    batch_size = len(first[0] if isinstance(first, tuple | list) else first["images"])
    cpu_start, start = cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
    return batches * batch_size / wall, batches * batch_size / cpu


def best_of(passes) -> tuple[float, float]:
    """The best wall-clock rate and the best CPU efficiency of several passes."""
    passes = list(passes)
    return max(p[0] for p in passes), max(p[1] for p in passes)


def bench_jaxclip(
    paths, args, crop: str, workers: int, threads: int
) -> tuple[float, float]:
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
        return best_of(
            timed_pass(iterator, warmup, batches) for _ in range(args.repeats)
        )
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


def bench_openclip(paths, args, workers: int) -> tuple[float, float]:
    loader = openclip_loader(paths, args, workers)
    # A pass of the loader is one epoch; each worker stops at its own shards' end
    # and drops its last partial batch.
    warmup = workers + 1
    batches = args.samples // args.batch - 2 * max(1, workers) - warmup
    passes = []
    for _ in range(args.repeats):
        iterator = iter(loader)
        passes.append(timed_pass(iterator, warmup, batches))
        del iterator
    return best_of(passes)


def throughput(function, count: int, repeats: int = 1) -> tuple[float, float]:
    """(items/s of wall-clock time, items per CPU-second) of `function()`, best of
    `repeats` runs. CPU time includes every thread (HF tokenizers' Rust threads)."""
    walls, cpus = [], []
    for _ in range(repeats):
        cpu_start, start = time.process_time(), time.perf_counter()
        function()
        walls.append(count / (time.perf_counter() - start))
        cpus.append(count / (time.process_time() - cpu_start))
    return max(walls), max(cpus)


def bench_tokenizers(args) -> list[tuple[str, tuple[float, float]]]:
    captions = make_captions(args.captions, np.random.default_rng(1))

    def batched(tokenize):
        def run():
            for at in range(0, len(captions), args.batch):  # as the pipeline calls it
                tokenize(captions[at : at + args.batch])

        return run

    reference = tokenizer.default_tokenizer()
    rows = [
        (
            "jaxclip reference (SimpleTokenizer)",
            throughput(lambda: [reference.encode(c) for c in captions[:5000]], 5000),
        )
    ]
    fast = tokenizer.FastTokenizer()
    cold = throughput(batched(lambda texts: fast(texts, 77)), len(captions))
    rows.append(("jaxclip fast, first pass (cold)", cold))
    contenders = [("jaxclip fast (warm)", batched(lambda texts: fast(texts, 77)))]
    if args.openclip:
        tokenize = import_open_clip().get_tokenizer("ViT-B-32")
        tokenize(captions[:100])
        contenders.append(("OpenCLIP tokenizer", batched(tokenize)))
    # Alternate the contenders, so both see the same mix of the neighbours' load.
    results = {name: [] for name, _ in contenders}
    for _ in range(args.repeats):
        for name, run in contenders:
            results[name].append(throughput(run, len(captions)))
    rows += [(name, best_of(passes)) for name, passes in results.items()]
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
    worker_counts = [int(w) for w in args.workers.split(",") if w]  # "": none

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

        rows = []  # (pipeline, workers, (samples/s, samples per CPU-second))
        for workers in worker_counts:
            for crop in ("random_resized", "random_square"):
                result = bench_jaxclip(paths, args, crop, workers, args.threads)
                rows.append((f"jaxclip {crop}", workers, result))
            if args.openclip:
                rows.append(
                    (
                        "OpenCLIP (webdataset + DataLoader)",
                        workers,
                        bench_openclip(paths, args, workers),
                    )
                )
            if workers == 0:  # the decoding threads alone, in the main process
                result = bench_jaxclip(paths, args, "random_resized", 0, 2)
                rows.append(("jaxclip random_resized, 2 threads", 0, result))

        print(
            f"{'pipeline':<36} {'workers':>7} {'samples/s':>10} {'vs OpenCLIP':>12} "
            f"{'per CPU-s':>10} {'vs OpenCLIP':>12}"
        )
        reference = {w: r for name, w, r in rows if name.startswith("OpenCLIP")}
        for name, workers, (rate, efficiency) in rows:
            versus = ("", "")
            if workers in reference:
                versus = (
                    f"{rate / reference[workers][0]:.2f}x",
                    f"{efficiency / reference[workers][1]:.2f}x",
                )
            print(
                f"{name:<36} {workers:>7} {rate:>10.1f} {versus[0]:>12} "
                f"{efficiency:>10.1f} {versus[1]:>12}"
            )

        print(
            f"\n{'tokenizer (batches of ' + str(args.batch) + ')':<40} "
            f"{'captions/s':>11} {'per CPU-s':>11}"
        )
        token_rows = bench_tokenizers(args)
        for name, (per_second, per_cpu_second) in token_rows:
            print(f"{name:<40} {per_second:>11,.0f} {per_cpu_second:>11,.0f}")
        if args.openclip:
            ours, theirs = token_rows[2][1], token_rows[-1][1]
            print(
                f"fast (warm) / OpenCLIP: {ours[0] / theirs[0]:.1f}x in captions/s, "
                f"{ours[1] / theirs[1]:.1f}x per CPU-second"
            )

        ours = [result for name, _, result in rows if name.startswith("jaxclip")]
        if not ours:
            return
        best_wall = max(wall for wall, _ in ours)
        best_cpu = max(per_cpu for _, per_cpu in ours)
        cores = args.host_cores or os.cpu_count() or 1
        print(
            f"\nChips fed, at {args.chip_rate:,.0f} samples/s per chip: measured here, "
            f"{best_wall:,.0f} samples/s feeds {best_wall / args.chip_rate:.2f}; at "
            f"{best_cpu:,.0f} samples per CPU-second, a host whose {cores} cores all "
            f"decode feeds about {best_cpu * cores / args.chip_rate:.1f}."
        )


if __name__ == "__main__":
    main()
