"""ViT-B-32, following the CLIP paper: global batch 32,768, AdamW (0.9, 0.98, eps 1e-6),
weight decay 0.2, 2,000 warm-up steps, cosine decay, bf16 compute.

Target: a TPU v5p-128 slice (`v5p:4x4x4`: 64 chips, 512 samples per chip), with no
remat: ViT-B-32's 50 tokens leave room; the step compiled for it and its per-chip memory
are in docs/tpu.md:

    python -m jaxclip.aot --config=configs/vit_b32.py --topology=v5p:4x4x4

    python -m jaxclip.train --config=configs/vit_b32.py --workdir=/path/to/workdir \
        --config.data.path='/data/shards/{00000..41407}.tar'
"""

from __future__ import annotations

import ml_collections

from jaxclip.config import clip_paper_recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """ViT-B-32 recipe; `arg` is unused."""
    del arg
    return clip_paper_recipe("ViT-B-32")
