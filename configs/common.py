"""What the recipes share. configs/ is a folder of files, not a package: a recipe loads
this one with `common = load_beside(__file__, "common.py")` (jaxclip.config)."""

from __future__ import annotations

import ml_collections

from jaxclip.config import base_config


def clip_paper(model_name: str) -> ml_collections.ConfigDict:
    """The CLIP paper's large-scale setup: global batch 32,768, AdamW (0.9, 0.98, eps
    1e-6), weight decay 0.2, 2,000 warm-up steps then cosine decay, bf16 compute, on
    LAION-400M webdataset shards.

    The recipes built on it target a TPU v5p-128 slice (`v5p:4x4x4`: 64 chips, 512
    samples per chip); each step compiled for it, and its per-chip memory, is in
    docs/tpu.md (`python -m jaxclip.aot --config=configs/<recipe>.py
    --topology=v5p:4x4x4`).
    """
    config = base_config()
    config.model.name = model_name
    config.model.dtype = "bfloat16"
    config.data.source = "webdataset"
    config.data.path = "/data/laion400m/{00000..41407}.tar"
    config.train.batch_size = 32768
    config.train.steps = 32 * 12_500  # 32 epochs of 400M samples at 32k
    config.optim.lr = 5e-4
    config.optim.warmup_steps = 2000
    config.optim.weight_decay = 0.2
    config.mesh.shape = (1, -1, 1)  # FSDP over every device
    config.loss.impl = "ring"  # never materialise the 32k x 32k logit matrix
    config.loss.chunk_size = 512  # and hold at most [512, local batch] per tile
    config.checkpoint.every_steps = 2000
    config.log.every_steps = 100
    return config


def small_cpu_run() -> ml_collections.ConfigDict:
    """A small CLIP (`demo-vit`, 32x32 images) trained from scratch on the CPU: batch
    128, AdamW at 1e-3 after 50 warm-up steps, weight decay 0.1, the last 2
    checkpoints kept. A recipe sets its data, steps and evaluators."""
    config = base_config()
    config.model.name = "demo-vit"  # 32x32 images, 4x4 patches of 8 pixels
    config.model.scan = False  # unrolled layers: faster steps on the CPU
    config.train.batch_size = 128
    config.optim.lr = 1e-3
    config.optim.warmup_steps = 50
    config.optim.weight_decay = 0.1
    config.checkpoint.keep = 2
    return config
