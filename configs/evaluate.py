"""The standard zero-shot and retrieval benchmarks, for `python -m jaxclip.evaluate`.

The argument picks benchmarks (comma-separated); point each at your copy of the data:

    python -m jaxclip.evaluate --config=configs/evaluate.py:imagenet,coco \\
        --checkpoint=/weights/ViT-B-32 \\
        --config.evals.imagenet.path=/data/imagenet/val \\
        --config.evals.coco.path=/data/coco/dataset_coco.json \\
        --config.evals.coco.data_dir=/data/coco

- `imagenet` (zero-shot): ImageNet-1k validation as class folders (wnid order),
  OpenAI's class names and the CLIP paper's 80 prompts.
- `cifar10`, `cifar100` (zero-shot): the tfds test split (`data_dir`), with the CLIP
  repository's class names and prompts.
- `coco`, `flickr30k` (retrieval): the Karpathy split JSON (`path`) and the image
  root (`data_dir`); test split, 5,000 / 1,000 images with 5 captions each.

The same entries can go into a training recipe's `config.evals` to run during
training.
"""

from __future__ import annotations

import ml_collections

from jaxclip.config import base_config
from jaxclip.evaluate import evaluators

BENCHMARKS = {
    "imagenet": lambda: evaluators.spec(
        "zeroshot",
        "folder",
        path="/data/imagenet/val",
        classnames="imagenet",
        templates="imagenet",
    ),
    "cifar10": lambda: evaluators.spec(
        "zeroshot", "tfds", path="cifar10", classnames="cifar10", templates="cifar10"
    ),
    "cifar100": lambda: evaluators.spec(
        "zeroshot", "tfds", path="cifar100", classnames="cifar100", templates="cifar100"
    ),
    "coco": lambda: evaluators.spec(
        "retrieval",
        "karpathy",
        path="/data/coco/dataset_coco.json",
        data_dir="/data/coco",
    ),
    "flickr30k": lambda: evaluators.spec(
        "retrieval",
        "karpathy",
        path="/data/flickr30k/dataset_flickr30k.json",
        data_dir="/data/flickr30k/flickr30k-images",
    ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Evaluators for the benchmarks named in `arg` (default: imagenet)."""
    names = [name.strip() for name in (arg or "imagenet").split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmarks {unknown}; known: {sorted(BENCHMARKS)}")
    config = base_config()
    for name in names:
        config.evals[name] = BENCHMARKS[name]()
    return config
